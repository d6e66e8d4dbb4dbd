"""Reduced-precision inference: one switch, ``fp32`` (default, exact), ``bf16`` or ``int8``, for every model.

* ``fp32``: the model as it is; results equal the parity fixtures.
* ``bf16``: the model's compute methods (``forward``, ``embed``, ``embed_waveform``, ``step``, ``steps``) run under
  ``torch.autocast`` in bfloat16 (matmuls, convolutions and attention through oneDNN's AVX-512 BF16 kernels;
  norms and softmax stay float32 as autocast lists them); outputs and streaming state come back float32. The
  frontend (called separately) stays float32. Weights are not touched, so the model saves and loads as before.
* ``int8``: every plain ``nn.Linear`` except the classification head becomes an :class:`Int8Linear`: weights
  quantised once, symmetric per output channel; activations quantised per row at run time (dynamic, symmetric);
  the product is ``torch._int_mm`` (int8 x int8 -> int32, VNNI on CPU), rescaled by the row and column scales.
  Nothing of ``torch.ao.quantization`` (deprecated) is used. Everything else stays float32. On the CPU the row
  quantisation and the rescaling are single passes in C (:mod:`tympan.ops.native`; PyTorch ops without a
  compiler, the same results up to float rounding of the rescale). A module may quantise its own convolutions
  through a ``quantize_int8()`` method, called here (TymNet: its pointwise convolutions in int8 on AVX-512 VNNI).

Use :func:`with_precision` on a loaded model (``tympan tag/embed/listen --precision``, ``hear.load_model(...,
precision=...)``); ``bench_precision.py`` measures speed and drift against fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch
from torch import Tensor, nn

from tympan.ops import native

__all__ = ["PRECISIONS", "Int8Linear", "quantize_linears", "with_precision", "precision_of"]

PRECISIONS = ("fp32", "bf16", "int8")
_METHODS = ("forward", "embed", "embed_waveform", "step", "steps")
INT8_MAX = 127.0


# ------------------------------------------------------------------------------------------------------- int8


_KERNELS = native.NativeLibrary("int8_linear", r"""
#include <stdint.h>

/* Rows [r0, r1) of x [M, K] (row stride ldx): scale = max(max |x|, 1e-12) / 127, q = rint(x * (1 / scale)). */
void tympan_quantize_rows(int64_t r0, int64_t r1, int64_t K, const float *x, int64_t ldx, int8_t *q,
                          float *scale) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *xr = x + r * ldx;
        int8_t *qr = q + r * K;
        float m = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
            float a = xr[k] < 0.0f ? -xr[k] : xr[k];
            m = a > m ? a : m;
        }
        float s = (m > 1e-12f ? m : 1e-12f) / 127.0f;
        float inv = 1.0f / s;
        scale[r] = s;
        for (int64_t k = 0; k < K; ++k) {
            float v = __builtin_rintf(xr[k] * inv);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            qr[k] = (int8_t)v;
        }
    }
}

/* Rows [r0, r1): out = acc * row_scale * col_scale (+ bias), acc int32 [M, N]. */
void tympan_rescale_rows(int64_t r0, int64_t r1, int64_t N, const int32_t *acc, const float *row_scale,
                         const float *col_scale, const float *bias, float *out) {
    for (int64_t r = r0; r < r1; ++r) {
        const int32_t *ar = acc + r * N;
        float *o = out + r * N, s = row_scale[r];
        if (bias) {
            for (int64_t j = 0; j < N; ++j) o[j] = __builtin_fmaf((float)ar[j] * s, col_scale[j], bias[j]);
        } else {
            for (int64_t j = 0; j < N; ++j) o[j] = (float)ar[j] * s * col_scale[j];
        }
    }
}
""", {"tympan_quantize_rows": (None, [native.I64] * 3 + [native.PTR, native.I64, native.PTR, native.PTR]),
      "tympan_rescale_rows": (None, [native.I64] * 3 + [native.PTR] * 5)}, switch="TYMPAN_NATIVE_INT8")


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of a 2-D float tensor: (q [M, K] int8, scale [M, 1] float32), x ~= q * scale."""
    x = x.float()
    lib = _KERNELS.lib() if x.device.type == "cpu" else None
    if lib is not None and x.stride(1) == 1 and x.shape[1] > 0:
        m, k = x.shape
        q = torch.empty(m, k, dtype=torch.int8)
        scale = torch.empty(m, 1)
        native.parallel_ranges(m, lambda r0, r1: lib.tympan_quantize_rows(
            r0, r1, k, x.data_ptr(), x.stride(0), q.data_ptr(), scale.data_ptr()), min_items=16)
        return q, scale
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(INT8_MAX)
    q = torch.mul(x, scale.reciprocal()).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def rescale(acc: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``acc * row_scale * col_scale + bias`` as float32 (acc int32 [M, N], row_scale [M, 1], col_scale [N])."""
    lib = _KERNELS.lib() if acc.device.type == "cpu" else None
    if lib is not None and acc.is_contiguous():
        m, n = acc.shape
        out = torch.empty(m, n)
        native.parallel_ranges(m, lambda r0, r1: lib.tympan_rescale_rows(
            r0, r1, n, acc.data_ptr(), row_scale.data_ptr(), col_scale.data_ptr(),
            None if bias is None else bias.data_ptr(), out.data_ptr()), min_items=16)
        return out
    out = torch.mul(acc, row_scale)
    return torch.addcmul(bias, out, col_scale) if bias is not None else out.mul_(col_scale)


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (per output channel) and dynamically quantised int8 activations (per row).

    ``y = (q_x @ q_w^T) * s_x * s_w + bias`` with the integer product exact in int32. ``weight`` gives the
    dequantised float weight (for code that reads ``linear.weight`` directly), ``reference`` the same math in
    float64 (the test oracle).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        q, scale = quantize_rows(w)
        self.register_buffer("qweight_t", q.t().contiguous())  # [in, out]: _int_mm's fast layout
        self.register_buffer("weight_scale", scale[:, 0].contiguous())  # [out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear)

    @property
    def weight(self) -> Tensor:
        """The dequantised weight ``[out, in]`` (float32)."""
        return self.qweight_t.t().float() * self.weight_scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_zeros(*shape[:-1], self.out_features)
        q, scale = quantize_rows(rows)
        out = rescale(torch._int_mm(q, self.qweight_t), scale, self.weight_scale, self.bias)
        return out.view(*shape[:-1], self.out_features).to(x.dtype if x.is_floating_point() else torch.float32)

    def reference(self, x: Tensor) -> Tensor:
        """The same quantised math in float64 (exact integer products): the oracle for ``forward``."""
        rows = x.reshape(-1, self.in_features)
        q, scale = quantize_rows(rows)
        acc = q.double() @ self.qweight_t.double()
        out = acc * scale.double() * self.weight_scale.double()
        if self.bias is not None:
            out = out + self.bias.double()
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(model: nn.Module, skip: Callable[[str, nn.Linear], bool] | None = None,
                     min_features: int = 16) -> int:
    """Replace every plain ``nn.Linear`` (not subclasses) of ``model`` by :class:`Int8Linear` in place, except
    those ``skip(name, module)`` keeps and those narrower than ``min_features``. Returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or min(child.in_features, child.out_features) < min_features:
                continue
            if skip is not None and skip(full, child):
                continue
            setattr(module, child_name, Int8Linear(child))
            replaced += 1
    return replaced


# ------------------------------------------------------------------------------------------------------- bf16


def _to_float32(obj: Any) -> Any:
    """Cast the reduced-precision float tensors inside ``obj`` (tensors, tuples, lists, dicts, dataclasses) to fp32."""
    if isinstance(obj, Tensor):
        return obj.float() if obj.dtype in (torch.bfloat16, torch.float16) else obj
    if isinstance(obj, tuple):
        items = [_to_float32(o) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_to_float32(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_float32(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_float32(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _autocast_method(method: Callable, device_type: str) -> Callable:
    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = method(*args, **kwargs)
        return _to_float32(out)

    run.__tympan_autocast__ = True  # type: ignore[attr-defined]
    return run


def _model_device_type(model: nn.Module) -> str:
    for tensor in model.parameters():
        return tensor.device.type
    return "cpu"


# ------------------------------------------------------------------------------------------------------- entry


def precision_of(model: nn.Module) -> str:
    """The precision mode :func:`with_precision` put ``model`` in (``fp32`` for an untouched model)."""
    return getattr(model, "tympan_precision", "fp32")


def with_precision(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """Put ``model`` (in place; returned for chaining) in ``precision``: ``fp32`` (unchanged), ``bf16`` or ``int8``.

    Applying a mode to a model already in a reduced mode is refused (load the model again instead).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    current = precision_of(model)
    if precision == current:
        return model
    if current != "fp32":
        raise ValueError(f"the model is already in {current}; load it again to run it in {precision}")
    if precision == "bf16":
        device_type = _model_device_type(model)
        for name in _METHODS:
            method = getattr(model, name, None)
            if method is not None and callable(method):
                setattr(model, name, _autocast_method(method, device_type))
    elif precision == "int8":
        if _model_device_type(model) != "cpu":
            raise ValueError("precision int8 runs on the CPU (torch._int_mm); use bf16 on other devices")
        classifier = getattr(model, "classifier", None)
        frontend = getattr(model, "frontend", None)
        frontend_ids = {id(m) for m in frontend.modules()} if isinstance(frontend, nn.Module) else set()

        def skip(name: str, module: nn.Linear) -> bool:
            is_head = classifier is not None and (name == classifier or name.startswith(f"{classifier}."))
            return is_head or id(module) in frontend_ids

        quantize_linears(model, skip=skip)
        for module in model.modules():  # modules that quantise their own convolutions (TymNet's pointwise ones)
            hook = getattr(module, "quantize_int8", None)
            if callable(hook):
                hook()
    model.tympan_precision = precision
    return model

