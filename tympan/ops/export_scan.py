"""Export form of the selective scan: one traceable recurrence, no Python loop over data-dependent sizes.

The chunked scan (:mod:`tympan.ops.chunked_scan`) loops in Python over blocks and chunks whose count depends on
the sequence length, so ``torch.export`` either unrolls it for one length or stops at a data-dependent guard.
This form builds every decay ``a_t = exp(dt_t * A)`` and drive ``x_t = dt_t * u_t * B_t`` at once (time-major,
``[L, b, d, n]``), then runs the recurrence ``h_t = a_t * h_{t-1} + x_t`` with ``torch._higher_order_ops.scan``
(one ONNX ``Scan`` node after export), contracting each state with ``C_t`` inside the step so only ``y`` leaves
it. Same math and accumulation dtype as the other backends; :func:`tympan.ops.selective_scan` picks it by itself
while a model is being exported (:func:`exporting`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tympan.ops.selective_scan import _check_inputs, _finish, compute_dtype, discretization_step, grouped_state_matrix

__all__ = ["exporting", "selective_scan_export"]


def exporting() -> bool:
    """True while ``torch.export`` / ``torch.onnx.export`` traces a model (the export form must be used)."""
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())


def _step(h: Tensor, inputs: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """One recurrence step: ``h = a * h + x``, output ``<C, h>`` over the state axis."""
    a, x, c = inputs
    h = a * h + x
    return h, (h * c).sum(-1)


def selective_scan_export(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                          return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with ``torch._higher_order_ops.scan``; same contract as :func:`tympan.ops.selective_scan`."""
    from torch._higher_order_ops import scan

    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    b, d, length = u.shape
    n = A.shape[1]
    u_ = u.to(dtype)
    dt = discretization_step(delta.to(dtype), None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    Bg = grouped_state_matrix(B.to(dtype), b, d, length)  # [b, g, n, L]
    Cg = grouped_state_matrix(C.to(dtype), b, d, length)
    groups = Bg.shape[1]
    # time-major [L, b, g, d/g, n]: channel c belongs to group c // (d / g)
    dt_t = dt.permute(2, 0, 1).reshape(length, b, groups, d // groups, 1)
    dtu_t = (dt * u_).permute(2, 0, 1).reshape(length, b, groups, d // groups, 1)
    decay = torch.exp(dt_t * A.to(dtype).reshape(1, 1, groups, d // groups, n))
    drive = dtu_t * Bg.permute(3, 0, 1, 2).unsqueeze(3)
    contract = Cg.permute(3, 0, 1, 2).unsqueeze(3)  # [L, b, g, 1, n]: broadcast over a group's channels per step
    h0 = u_.new_zeros(b, groups, d // groups, n)
    last, ys = scan(_step, h0, (decay, drive, contract))  # ys: [L, b, g, d/g]
    y = ys.reshape(length, b, d).permute(1, 2, 0)
    y = _finish(y, u_, None if D is None else D.to(dtype), z, out_dtype)
    return (y, last.reshape(b, d, n)) if return_last_state else y
