"""Input checks at the frontends' entry points: what goes in is a finite float waveform batch.

Integer PCM (int8/16/32/64, uint8 offset binary) is scaled to [-1, 1) as the audio loaders do, so an int16
array gives the same features as the float file it came from; bool and complex inputs, empty batches, and NaN
or inf samples, and samples beyond +-1e6, are refused with an :class:`~tympan.errors.InputError`. Under tracing/compilation (ONNX or
torch.export) the data-dependent finiteness check is skipped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tympan.errors import InputError

__all__ = ["MAX_PEAK", "as_waveform"]

MAX_PEAK = 1e6  # beyond any PCM scale (Kaldi-style int16 floats reach 32768); larger powers overflow float32


def _tracing() -> bool:
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting() or (compiling is not None and compiling()))


def as_waveform(waveform: Any, name: str = "waveform") -> Tensor:
    """`waveform` (``[N]`` or ``[..., N]``, tensor or array) as a checked floating-point tensor."""
    if not isinstance(waveform, Tensor):
        try:
            waveform = torch.as_tensor(np.asarray(waveform))
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"{name}: expected an array of audio samples ({err})") from None
    dtype = waveform.dtype
    if dtype == torch.bool or dtype.is_complex:
        raise InputError(f"{name}: expected real audio samples, got dtype {dtype}")
    if waveform.dim() == 0:
        raise InputError(f"{name}: expected [N] or [..., N] samples, got a scalar")
    if waveform.numel() == 0:
        raise InputError(f"{name}: empty input of shape {tuple(waveform.shape)}")
    if dtype == torch.uint8:  # offset binary (8-bit WAV)
        waveform = (waveform.to(torch.float32) - 128.0) / 128.0
    elif not dtype.is_floating_point:
        scale = float(-torch.iinfo(dtype).min)
        waveform = (waveform.to(torch.float64) / scale).to(torch.float32)
    elif dtype not in (torch.float32, torch.float64):  # half precision: compute in float32
        waveform = waveform.to(torch.float32)
    if not _tracing():
        low, high = torch.aminmax(waveform.detach())  # one pass, no |x| temporary; NaN propagates to both
        peak = max(-float(low), float(high))
        if not math.isfinite(peak):
            raise InputError(f"{name}: non-finite samples (NaN or inf)")
        if peak > MAX_PEAK:
            raise InputError(f"{name}: samples up to {peak:.3g}, beyond +-{MAX_PEAK:g} (expected [-1, 1] floats or "
                             "integer PCM)")  # fmt: skip
    return waveform
