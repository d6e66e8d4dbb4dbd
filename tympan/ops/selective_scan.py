"""Selective scan (the Mamba S6 recurrence) in the layout of mamba_ssm's ``selective_scan_fn``.

Shapes (b batch, d channels, n state size, L length, g groups of channels sharing B/C)::

    u, delta, z : [b, d, L]        A : [d, n]        D, delta_bias : [d]
    B, C        : [d, n] (time-invariant), [b, n, L] or grouped [b, g, n, L]
                  (channel c uses group c // (d // g), as VMamba/DASS stack their K scan directions)

Math (zero-order hold on A, Euler on B), per batch b and channel c::

    dt    = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t            (h_{-1} = 0, h_t in R^n)
    y_t   = <C_t, h_t> + D * u_t ;   y *= silu(z)  if z is given

Everything is accumulated in float32 (float64 when an input is float64), like the CUDA kernels; ``y`` comes
back in ``u``'s dtype and the last state in the accumulation dtype. (VMamba's "oflex" kernel returns float32
for any input dtype: callers that mimic it cast ``y``.)

Backends: "chunked" (:mod:`tympan.ops.chunked_scan`: blocked, chunk-parallel, stable, hand-written backward;
runs on any device), "reference" (the sequential loop below, the test oracle), "cuda" (mamba_ssm's fused
kernel when importable), "auto" (the kernel for CUDA tensors when available, else "chunked"). While a model is
being exported (``torch.export`` / ``torch.onnx.export``), "auto" and "chunked" use the export form
(:mod:`tympan.ops.export_scan`: one ``scan`` higher-order op, an ONNX ``Scan``) instead.
"""

from __future__ import annotations

import importlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["auto", "reference", "chunked", "cuda"]
BACKENDS = ("auto", "reference", "chunked", "cuda")

__all__ = ["selective_scan", "selective_scan_reference", "cuda_kernel_available", "BACKENDS"]


# --------------------------------------------------------------------------------------------------- input checks


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  z: Tensor | None, delta_bias: Tensor | None) -> None:
    """Raise a one-line ValueError naming the first shape mismatch."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [batch, channels, length], got shape {tuple(u.shape)}")
    b, d, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be [{d}, d_state], got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 2:
            ok = t.shape == (d, n)
        elif t.dim() == 3:
            ok = t.shape == (b, n, length)
        elif t.dim() == 4:
            ok = t.shape[0] == b and t.shape[2:] == (n, length) and t.shape[1] > 0 and d % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be [{d}, {n}], [{b}, {n}, {length}] or [{b}, groups, {n}, {length}] "
                f"with groups dividing {d}; got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"selective_scan: {name} must be [{d}], got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs accumulate in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def discretization_step(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """dt = softplus(delta + bias) (torch softplus: identity above 20, as in the CUDA kernels) or delta + bias."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None].to(delta.dtype)
    return F.softplus(delta) if delta_softplus else delta


def grouped_state_matrix(M: Tensor, batch: int, channels: int, length: int) -> Tensor:
    """B or C as [b, g, n, L] (a time-invariant [d, n] becomes d groups of one channel, constant over time)."""
    if M.dim() == 2:
        return M[None, :, :, None].expand(batch, channels, M.shape[1], length)
    if M.dim() == 3:
        return M[:, None]
    return M


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """Add the D skip term, apply the SiLU(z) gate, cast to the output dtype."""
    if D is not None:
        y = y + u * D[:, None].to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------- reference loop


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                             z: Tensor | None = None, delta_bias: Tensor | None = None,
                             delta_softplus: bool = False,
                             return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The sequential recurrence, one Python step per time step: the numerics oracle (float64-capable)."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    b, d, length = u.shape
    n = A.shape[1]
    u_, A_ = u.to(dtype), A.to(dtype)
    dt = discretization_step(delta.to(dtype), None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    Bg = grouped_state_matrix(B.to(dtype), b, d, length)
    Cg = grouped_state_matrix(C.to(dtype), b, d, length)
    per_group = d // Bg.shape[1]
    Bc = Bg.repeat_interleave(per_group, dim=1)  # [b, d, n, L]
    Cc = Cg.repeat_interleave(per_group, dim=1)
    decay = torch.exp(dt[:, :, None, :] * A_[None, :, :, None])  # [b, d, n, L]
    drive = (dt * u_)[:, :, None, :] * Bc
    h = u_.new_zeros(b, d, n)
    ys = []
    for t in range(length):
        h = decay[..., t] * h + drive[..., t]
        ys.append((h * Cc[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_.new_zeros(b, d, 0)
    y = _finish(y, u_, None if D is None else D.to(dtype), z, out_dtype)
    return (y, h) if return_last_state else y


# ----------------------------------------------------------------------------------------------- CUDA kernels


def _cuda_selective_scan_fn():
    """mamba_ssm's fused CUDA kernel wrapper if importable, else None (never required)."""
    try:
        module = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except Exception:  # noqa: BLE001 - any import failure (missing package, broken build) means "not available"
        return None
    return getattr(module, "selective_scan_fn", None)


def cuda_kernel_available() -> bool:
    """True when mamba_ssm's ``selective_scan_fn`` imports (its CUDA kernels then serve CUDA tensors)."""
    return _cuda_selective_scan_fn() is not None


# ------------------------------------------------------------------------------------------------ entry point


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *,
                   backend: Backend = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan ``y`` [b, d, L] (and the last state [b, d, n] if ``return_last_state``); see module doc.

    ``backend``: "auto" (the CUDA kernel for CUDA tensors when mamba_ssm is importable, else "chunked"),
    "chunked" (vectorised, stable, differentiable pure PyTorch), "reference" (sequential loop), "cuda".
    """
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: backend must be one of {BACKENDS}, got {backend!r}")
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend == "reference":
        return selective_scan_reference(*args)
    if backend in ("auto", "cuda"):
        kernel = _cuda_selective_scan_fn() if u.is_cuda else None
        if kernel is not None:
            _check_inputs(u, delta, A, B, C, D, z, delta_bias)
            return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        if backend == "cuda":
            raise ValueError("selective_scan: backend='cuda' needs CUDA tensors and an importable mamba_ssm")
    from tympan.ops.export_scan import exporting, selective_scan_export

    if exporting():  # the chunked scan's Python loops over the length do not export
        return selective_scan_export(*args)
    from tympan.ops.chunked_scan import selective_scan_chunked

    return selective_scan_chunked(*args)
