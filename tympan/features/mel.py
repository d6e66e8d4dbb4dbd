"""STFT mel spectrogram and dB conversion equal to ``torchaudio.transforms.MelSpectrogram`` / ``AmplitudeToDB``.

Dasheng, SAT (64 mels, dB) and SSAM (80 mels, natural log) were trained on these torchaudio transforms;
torchaudio is being retired, so tympan owns exact re-implementations. Filter banks and windows are cached per
(options, device, dtype); :class:`Filterbank` applies a sparse triangular bank as a few dense band matmuls.
"""

from __future__ import annotations

import functools
import math
from functools import lru_cache
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor, nn

from tympan.errors import InputError
from tympan.ops import log_mel


_F = TypeVar("_F", bound=Callable[..., Any])


def constant_cache(maxsize: int = 64) -> Callable[[_F], _F]:
    """``lru_cache`` for builders of constant tensors (windows, filterbanks). They are built outside inference mode
    and autograd: a cache first filled under ``torch.inference_mode()`` (tagging) must still serve a later forward
    that needs gradients (training), which inference tensors cannot."""

    def wrap(fn: _F) -> _F:
        @lru_cache(maxsize=maxsize)
        @functools.wraps(fn)
        def cached(*args: Any, **kwargs: Any) -> Any:
            with torch.inference_mode(False), torch.no_grad():
                return fn(*args, **kwargs)

        return cached  # type: ignore[return-value]

    return wrap

__all__ = [
    "AmplitudeToDB",
    "Filterbank",
    "MelSpectrogram",
    "amplitude_to_db",
    "mel_filterbank",
    "mel_spectrogram",
    "mel_spectrogram_db",
    "stft_num_frames",
]

MEL_SCALES = ("htk", "slaney")
SPECTROGRAM_WINDOWS = ("hann", "hamming", "rectangular")


class Filterbank:
    """A ``[K, M]`` filter matrix applied to ``[..., K]`` inputs, skipping its zero blocks.

    Triangular mel filters are banded (filter ``j`` covers a short range of bins), so the columns are cut
    into groups of ``group_size`` filters, each multiplied only with the rows (bins) where the group is
    non-zero; the dense matmul is kept when that would not save at least a third of the work.
    """

    def __init__(self, matrix: Tensor, group_size: int = 16) -> None:
        self.matrix = matrix
        self.blocks: list[tuple[int, int, Tensor]] = []
        cost = 0
        for start, (lo, hi) in zip(range(0, matrix.shape[1], group_size), log_mel.group_ranges(matrix, group_size)):
            stop = min(start + group_size, matrix.shape[1])
            lo, hi = (0, 1) if hi <= lo else (lo, hi)  # all-zero group: keep one row so shapes work
            self.blocks.append((lo, hi, matrix[lo:hi, start:stop].contiguous()))
            cost += (hi - lo) * (stop - start)
        self.banded = cost < (2 * matrix.numel()) // 3

    @functools.cached_property
    def layout(self) -> tuple[Tensor, Tensor]:
        """The matrix as :func:`tympan.ops.log_mel.power_mel` reads it (padded to 16-band groups, their bin ranges)."""
        return log_mel.mel_layout(self.matrix)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.banded:
            return torch.matmul(x, self.matrix)
        return torch.cat([torch.matmul(x[..., lo:hi], block) for lo, hi, block in self.blocks], dim=-1)


def _hz_to_mel(freq: Tensor, mel_scale: str) -> Tensor:
    if mel_scale == "htk":
        return 2595.0 * torch.log10(1.0 + freq / 700.0)
    linear = freq / (200.0 / 3)
    log_part = 15.0 + torch.log(freq / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(freq >= 1000.0, log_part, linear)


def _mel_to_hz(mel: Tensor, mel_scale: str) -> Tensor:
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    linear = mel * (200.0 / 3)
    log_part = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (mel - 15.0))
    return torch.where(mel >= 15.0, log_part, linear)


@constant_cache(maxsize=64)
def mel_filterbank(
    n_freqs: int,
    f_min: float,
    f_max: float,
    n_mels: int,
    sample_rate: int,
    norm: str | None = None,
    mel_scale: str = "htk",
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Triangular mel filters ``[n_freqs, n_mels]`` as ``torchaudio.functional.melscale_fbanks``.

    Bin ``k`` sits at ``k * (sample_rate // 2) / (n_freqs - 1)`` Hz; filter edges are equally spaced on the
    ``mel_scale`` between ``f_min`` and ``f_max``; ``norm="slaney"`` scales each filter to unit area.
    Cached; do not modify in place.
    """
    if mel_scale not in MEL_SCALES:
        raise ValueError(f"unknown mel_scale {mel_scale!r}; expected one of {', '.join(MEL_SCALES)}")
    if norm not in (None, "slaney"):
        raise ValueError(f"unknown norm {norm!r}; expected None or 'slaney'")
    if not 0.0 <= f_min < f_max:
        raise ValueError(f"need 0 <= f_min < f_max, got f_min={f_min:g}, f_max={f_max:g}")
    # float32 throughout, the way torchaudio computes it (weak bins make log-mels sensitive to the last bits)
    bin_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    mel_min, mel_max = (_hz_to_mel(torch.tensor(f, dtype=torch.float64), mel_scale).item() for f in (f_min, f_max))
    edges = _mel_to_hz(torch.linspace(mel_min, mel_max, n_mels + 2), mel_scale)
    widths = edges[1:] - edges[:-1]
    offsets = edges.unsqueeze(0) - bin_freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    rising = (-1.0 * offsets[:, :-2]) / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    banks = torch.clamp_min(torch.minimum(rising, falling), 0.0)
    if norm == "slaney":
        banks = banks * (2.0 / (edges[2:] - edges[:-2]))
    return banks.to(device=device, dtype=dtype)


@constant_cache(maxsize=64)
def _filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int, norm: str | None,
                mel_scale: str, device: torch.device, dtype: torch.dtype) -> Filterbank:
    return Filterbank(mel_filterbank(n_freqs, f_min, f_max, n_mels, sample_rate, norm, mel_scale, device, dtype))


@constant_cache(maxsize=64)
def spectrogram_window(window: str, length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if window == "hann":
        return torch.hann_window(length, periodic=True, device=device, dtype=dtype)
    if window == "hamming":
        return torch.hamming_window(length, periodic=True, device=device, dtype=dtype)
    if window == "rectangular":
        return torch.ones(length, device=device, dtype=dtype)
    raise ValueError(f"unknown window {window!r}; expected one of {', '.join(SPECTROGRAM_WINDOWS)}")


def stft_num_frames(num_samples: int, n_fft: int, hop_length: int, center: bool = True) -> int:
    """Frames of ``torch.stft``: ``N // hop + 1`` when centred, else ``1 + (N - n_fft) // hop``."""
    if center:
        return num_samples // hop_length + 1
    return 0 if num_samples < n_fft else 1 + (num_samples - n_fft) // hop_length


def mel_spectrogram(
    waveform: Tensor,
    sample_rate: int = 16000,
    n_fft: int = 400,
    win_length: int | None = None,
    hop_length: int | None = None,
    f_min: float = 0.0,
    f_max: float | None = None,
    n_mels: int = 128,
    center: bool = True,
    pad_mode: str = "reflect",
    power: float = 2.0,
    window: str = "hann",
    mel_scale: str = "htk",
    norm: str | None = None,
) -> Tensor:
    """Mel spectrogram of ``[..., N]`` -> ``[..., n_mels, T]``, equal to ``torchaudio.transforms.MelSpectrogram``.

    Periodic ``window`` of ``win_length`` (default ``n_fft``) centred in ``n_fft``, hop ``hop_length``
    (default ``win_length // 2``), ``|STFT| ** power``, then the triangular mel bank (``f_max`` defaults to
    ``sample_rate / 2``). Differentiable; any leading batch shape. In inference the squaring and the mel product
    are one C pass (:func:`tympan.ops.log_mel.power_mel`; the FFT stays torch's).
    """
    return _mel_spectrogram(waveform, sample_rate, n_fft, win_length, hop_length, f_min, f_max, n_mels, center,
                            pad_mode, power, window, mel_scale, norm)


def mel_spectrogram_db(waveform: Tensor, sample_rate: int = 16000, n_fft: int = 400, win_length: int | None = None,
                       hop_length: int | None = None, f_min: float = 0.0, f_max: float | None = None, n_mels: int = 128,
                       top_db: float | None = 120.0, amin: float = 1e-10, batch_max: bool = True) -> Tensor:
    """``amplitude_to_db(mel_spectrogram(...), top_db, amin, batch_max)`` of a centred, reflect-padded, Hann power
    spectrogram (Dasheng's and SAT's frontend); in inference the squaring, mel product, dB and floor are one C pass."""
    return _mel_spectrogram(waveform, sample_rate, n_fft, win_length, hop_length, f_min, f_max, n_mels,
                            db=(amin, top_db, batch_max))


def _mel_spectrogram(waveform: Tensor, sample_rate: int, n_fft: int, win_length: int | None, hop_length: int | None,
                     f_min: float, f_max: float | None, n_mels: int, center: bool = True, pad_mode: str = "reflect",
                     power: float = 2.0, window: str = "hann", mel_scale: str = "htk", norm: str | None = None,
                     db: tuple[float, float | None, bool] | None = None) -> Tensor:
    win_length = win_length or n_fft
    hop_length = hop_length or win_length // 2
    f_max = float(sample_rate // 2) if f_max is None else float(f_max)
    if waveform.dim() == 0 or waveform.numel() == 0:
        raise InputError(f"waveform must be a non-empty [N] or [..., N], got shape {tuple(waveform.shape)}")
    if not waveform.is_floating_point() or waveform.dtype not in (torch.float32, torch.float64):
        waveform = waveform.float()
    if win_length > n_fft:
        raise ValueError(f"win_length ({win_length}) must not exceed n_fft ({n_fft})")
    num_samples = waveform.shape[-1]
    if center and pad_mode == "reflect" and num_samples <= n_fft // 2:
        raise InputError(f"waveform has {num_samples} samples; centred reflect padding needs more than n_fft // 2 = {n_fft // 2}")
    if not center and num_samples < n_fft:
        raise InputError(f"waveform has {num_samples} samples, fewer than one frame (n_fft = {n_fft})")
    leading = waveform.shape[:-1]
    stft = torch.stft(
        waveform.reshape(-1, num_samples), n_fft, hop_length, win_length,
        window=spectrogram_window(window, win_length, waveform.device, waveform.dtype),
        center=center, pad_mode=pad_mode, normalized=False, onesided=True, return_complex=True,
    )
    banks = _filterbank(n_fft // 2 + 1, float(f_min), f_max, n_mels, int(sample_rate), norm, mel_scale, waveform.device, waveform.dtype)
    mel = None
    if power == 2.0 and waveform.dtype == torch.float32 and waveform.device.type == "cpu":  # one C pass (inference)
        # amplitude_to_db's floor: the max over the last three axes of [*leading, M, T] (batch_max), else per matrix
        group = leading[-1] if db is not None and db[2] and len(leading) else 1
        mel = log_mel.power_mel(stft.transpose(-1, -2), banks.layout, n_mels, None if db is None else (db[0], db[1], group))
    if mel is None:
        if power == 2.0:
            squares = torch.view_as_real(stft).square()  # one pass over (re, im) pairs, then re^2 + im^2 (same sums)
            spectrum = squares[..., 0] + squares[..., 1]
        else:
            spectrum = stft.abs().pow(power)
        mel = banks(spectrum.transpose(-1, -2)).transpose(-1, -2).reshape(*leading, n_mels, -1)
        return mel if db is None else amplitude_to_db(mel, top_db=db[1], amin=db[0], batch_max=db[2])
    return mel.reshape(*leading, n_mels, mel.shape[-1])


def amplitude_to_db(x: Tensor, top_db: float | None = 120.0, amin: float = 1e-10, batch_max: bool = True, stype: str = "power") -> Tensor:
    """``10 log10(max(x, amin))`` (``20 log10`` for ``stype="magnitude"``), floored at ``max - top_db``.

    ``batch_max=True`` takes the max exactly as ``torchaudio.transforms.AmplitudeToDB`` does: over the last
    three axes, so a ``[B, F, T]`` batch shares ONE floor set by its loudest item (Dasheng and SAT were
    trained that way); ``batch_max=False`` floors every ``[F, T]`` matrix by its own max.
    """
    if stype not in ("power", "magnitude"):
        raise ValueError(f"unknown stype {stype!r}; expected 'power' or 'magnitude'")
    db = (10.0 if stype == "power" else 20.0) * torch.log10(torch.clamp_min(x, amin))
    if top_db is None:
        return db
    dims = (-3, -2, -1) if batch_max and db.dim() > 2 else (-2, -1)
    return torch.maximum(db, db.amax(dim=dims, keepdim=True) - top_db)


class MelSpectrogram(nn.Module):
    """Module wrapper of :func:`mel_spectrogram`: ``[..., N]`` -> ``[..., n_mels, T]``."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, win_length: int | None = None, hop_length: int | None = None,
                 f_min: float = 0.0, f_max: float | None = None, n_mels: int = 128, center: bool = True, pad_mode: str = "reflect",
                 power: float = 2.0, window: str = "hann", mel_scale: str = "htk", norm: str | None = None) -> None:
        super().__init__()
        if window not in SPECTROGRAM_WINDOWS:
            raise ValueError(f"unknown window {window!r}; expected one of {', '.join(SPECTROGRAM_WINDOWS)}")
        self.sample_rate, self.n_fft, self.n_mels = sample_rate, n_fft, n_mels
        self.win_length = win_length or n_fft
        self.hop_length = hop_length or self.win_length // 2
        self.f_min, self.f_max = f_min, f_max
        self.center, self.pad_mode, self.power, self.window = center, pad_mode, power, window
        self.mel_scale, self.norm = mel_scale, norm

    def num_frames(self, num_samples: int) -> int:
        return stft_num_frames(num_samples, self.n_fft, self.hop_length, self.center)

    def forward(self, waveform: Tensor) -> Tensor:
        return mel_spectrogram(waveform, self.sample_rate, self.n_fft, self.win_length, self.hop_length, self.f_min, self.f_max,
                               self.n_mels, self.center, self.pad_mode, self.power, self.window, self.mel_scale, self.norm)

    def extra_repr(self) -> str:
        return (f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, win_length={self.win_length}, hop_length={self.hop_length}, "
                f"f_min={self.f_min}, f_max={self.f_max}, n_mels={self.n_mels}, center={self.center}")


class AmplitudeToDB(nn.Module):
    """Module wrapper of :func:`amplitude_to_db`."""

    def __init__(self, top_db: float | None = 120.0, amin: float = 1e-10, batch_max: bool = True, stype: str = "power") -> None:
        super().__init__()
        self.top_db, self.amin, self.batch_max, self.stype = top_db, amin, batch_max, stype

    def forward(self, x: Tensor) -> Tensor:
        return amplitude_to_db(x, self.top_db, self.amin, self.batch_max, self.stype)

    def extra_repr(self) -> str:
        return f"top_db={self.top_db}, amin={self.amin}, batch_max={self.batch_max}, stype={self.stype!r}"
