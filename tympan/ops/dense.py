"""Inference products of many rows on oneDNN-prepacked weights, the exact GELU fused (the ViT blocks of AST, SSAST,
Dasheng and SAT's reference path).

``F.linear`` runs MKL's sgemm, which repacks the weight on every call, and ``F.gelu`` is then a second pass over a
large activation (AST-base: 1214 tokens x 3072). Here each ``nn.Linear`` weight is reordered once into oneDNN's
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, kept while the weight's storage and version are
unchanged, like :mod:`tympan.ops.small_gemm`'s panels) and the product runs as oneDNN's matmul with the bias and,
for ``fc1``, the erf GELU as post-ops (``torch.ops.mkldnn._linear_pointwise``, what inductor's CPU freezing emits).
AST-base's shapes on this 2-core AVX-512 CPU: qkv 23.1 -> 19.8 ms, proj 7.0 -> 6.5, fc1 + GELU 33.2 -> 27.5,
fc2 28.4 -> 25.8 (``benchmarks/bench_transformers.py`` has the whole model).

Numerics: another GEMM's summation order, within ~1e-6 relative of ``F.linear`` (and of the fixtures' tolerances);
oneDNN's erf GELU. Memory: the reordered copies double the linear weights held (AST-base: +330 MB).
``TYMPAN_DENSE=0`` (or ``ENABLED = False``) turns it off. Applies to a plain ``nn.Linear`` on float32 CPU inputs of
at least :data:`MIN_ROWS` rows, without autograd, autocast or tracing, when torch has oneDNN; otherwise
:func:`linear` returns ``None`` and the caller runs the module as written.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from tympan.ops import native
from tympan.ops.weights import DerivedCache

__all__ = ["apply", "available", "linear"]

ENABLED = os.environ.get("TYMPAN_DENSE", "1") != "0"
MIN_ROWS = 64  # below, F.linear (or small_gemm) is as fast and nothing is worth a packed copy

_packed: DerivedCache[Tensor] = DerivedCache()  # per nn.Linear: its weight reordered for oneDNN
_available: bool | None = None


def available() -> bool:
    """Whether torch has oneDNN's prepacked linear (checked once with a small product against ``F.linear``)."""
    global _available
    if _available is None:
        try:
            weight, x = torch.randn(8, 4), torch.randn(3, 4)
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight)
                out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            _available = bool(torch.backends.mkldnn.is_available()
                              and torch.allclose(out, x @ weight.t(), atol=1e-5, rtol=1e-5))
        except (AttributeError, RuntimeError):
            _available = False
    return _available


def _weight(module: nn.Linear) -> Tensor | None:
    """The module's weight reordered for oneDNN, cached while its storage and version are unchanged (``None`` for an
    inference-tensor weight, which keeps no version: reordering it on every call would cost more than it saves)."""
    weight = module.weight
    return _packed.get(module, [weight], lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach()))


def linear(module: nn.Module, x: Tensor, gelu: bool = False) -> Tensor | None:
    """``module(x)`` (``gelu``: ``F.gelu(module(x))``, exact) through oneDNN on the prepacked weight, or ``None`` when
    it does not apply (see the module doc): the caller then runs its modules."""
    if (not ENABLED or type(module) is not nn.Linear or x.dim() < 2 or x.numel() < MIN_ROWS * x.shape[-1]
            or torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu"
            or module.weight.dtype != torch.float32 or module.weight.device.type != "cpu"
            or torch.is_autocast_enabled("cpu") or native.tracing() or not available()):  # fmt: skip
        return None
    weight = _weight(module)
    if weight is None:
        return None
    bias = module.bias.detach() if module.bias is not None else None
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


def apply(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``, through :func:`linear` where it applies."""
    out = linear(module, x)
    return module(x) if out is None else out
