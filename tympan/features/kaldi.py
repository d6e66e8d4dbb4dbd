"""Kaldi-compatible log-mel filterbank (``compute-fbank-feats``), batched and differentiable in plain torch.

Reproduces ``torchaudio.compliance.kaldi.fbank`` (which follows Kaldi's ``FbankComputer``) with the same
arguments, on ``[N]`` or ``[..., N]`` waveforms at once: frames are strided views of the signal, every
per-frame step (dither, DC removal, pre-emphasis, window, zero padding) writes into one buffer, then one
batched ``rfft``, the power spectrum, a banded mel matmul and the log floor, over cache-sized blocks of
frames of the whole batch. Float32 operations follow torchaudio's order and its float32 window / mel-bank
arithmetic, so results agree to the last bits (weak low-frequency bins amplify any rounding difference).
Windows and mel banks are cached per (options, device, dtype). AST, SSAST and DASS were trained on this.
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tympan.errors import InputError
from tympan.features.checks import as_waveform
from tympan.features.mel import Filterbank, constant_cache

__all__ = [
    "KaldiFbank",
    "WINDOW_TYPES",
    "kaldi_fbank",
    "kaldi_frame_layout",
    "kaldi_mel_banks",
    "kaldi_num_frames",
    "kaldi_window",
]

WINDOW_TYPES = ("hamming", "hanning", "povey", "rectangular", "blackman")
# Kaldi floors energies at float32 machine epsilon whatever the compute dtype (torchaudio does the same).
_FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def _mel_scale(freq: Tensor) -> Tensor:
    return 1127.0 * torch.log(1.0 + freq / 700.0)


def _inverse_mel_scale(mel: Tensor) -> Tensor:
    return 700.0 * (torch.exp(mel / 1127.0) - 1.0)


def kaldi_frame_layout(sample_rate: float, frame_length: float, frame_shift: float, round_to_power_of_two: bool = True) -> tuple[int, int, int]:
    """(window size, window shift, FFT size) in samples for frame length/shift in milliseconds."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    window_size = int(sample_rate * frame_length * 0.001)
    window_shift = int(sample_rate * frame_shift * 0.001)
    if window_size < 2:
        raise ValueError(f"frame_length {frame_length} ms gives a window of {window_size} samples at {sample_rate} Hz; need >= 2")
    if window_shift < 1:
        raise ValueError(f"frame_shift {frame_shift} ms gives a shift of {window_shift} samples at {sample_rate} Hz; need >= 1")
    fft_size = 1 << (window_size - 1).bit_length() if round_to_power_of_two else window_size
    if fft_size % 2:
        raise ValueError(f"the FFT size must be even, got {fft_size} (use round_to_power_of_two=True or an even window)")
    return window_size, window_shift, fft_size


def kaldi_num_frames(num_samples: int, window_size: int, window_shift: int, snip_edges: bool = True) -> int:
    """Number of frames Kaldi extracts from ``num_samples`` samples (0 if the signal is shorter than a window)."""
    if snip_edges:
        return 0 if num_samples < window_size else 1 + (num_samples - window_size) // window_shift
    return (num_samples + window_shift // 2) // window_shift


@constant_cache(maxsize=64)
def kaldi_window(window_type: str, window_size: int, blackman_coeff: float = 0.42, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Kaldi's analysis windows (all symmetric, i.e. ``periodic=False``), computed in ``dtype`` as torchaudio
    does; cached, do not modify in place."""
    options = dict(device=device, dtype=dtype)
    if window_type == "hanning":
        return torch.hann_window(window_size, periodic=False, **options)
    if window_type == "povey":  # Hann raised to 0.85: Kaldi's default
        return torch.hann_window(window_size, periodic=False, **options).pow(0.85)
    if window_type == "hamming":
        return torch.hamming_window(window_size, periodic=False, alpha=0.54, beta=0.46, **options)
    if window_type == "rectangular":
        return torch.ones(window_size, **options)
    if window_type == "blackman":
        phase = (2 * math.pi / (window_size - 1)) * torch.arange(window_size, **options)
        return blackman_coeff - 0.5 * torch.cos(phase) + (0.5 - blackman_coeff) * torch.cos(2 * phase)
    raise ValueError(f"unknown window_type {window_type!r}; expected one of {', '.join(WINDOW_TYPES)}")


def _vtln_warp_freq(freq: Tensor, vtln_low: float, vtln_high: float, low_freq: float, high_freq: float, warp: float) -> Tensor:
    """Kaldi's piecewise-linear VTLN frequency warp (identity outside [low_freq, high_freq])."""
    lower = vtln_low * max(1.0, warp)
    upper = vtln_high * min(1.0, warp)
    scale = 1.0 / warp
    if not (lower > low_freq and upper < high_freq):
        raise ValueError(f"VTLN cut-offs ({lower:g}, {upper:g}) Hz must lie inside ({low_freq:g}, {high_freq:g}) Hz")
    scale_left = (scale * lower - low_freq) / (lower - low_freq)
    scale_right = (high_freq - scale * upper) / (high_freq - upper)
    warped = torch.where(
        freq < lower,
        low_freq + scale_left * (freq - low_freq),
        torch.where(freq < upper, scale * freq, high_freq + scale_right * (freq - high_freq)),
    )
    return torch.where((freq < low_freq) | (freq > high_freq), freq, warped)


@constant_cache(maxsize=64)
def kaldi_mel_banks(
    num_mel_bins: int,
    fft_size: int,
    sample_rate: float,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    vtln_low: float = 100.0,
    vtln_high: float = -500.0,
    vtln_warp: float = 1.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Kaldi triangular mel filters as a ``[fft_size // 2 + 1, num_mel_bins]`` matrix (Nyquist row zero).

    Filters are equally spaced on the mel scale ``1127 ln(1 + f / 700)`` between ``low_freq`` and
    ``high_freq`` (``<= 0`` means an offset from Nyquist); computed in float32 like Kaldi, cached, do not modify
    in place.
    """
    if num_mel_bins <= 3:
        raise ValueError(f"num_mel_bins must be > 3, got {num_mel_bins}")
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad mel frequency range low_freq={low_freq:g}, high_freq={high_freq:g} for Nyquist {nyquist:g} Hz")
    if vtln_high < 0.0:
        vtln_high += nyquist
    if vtln_warp != 1.0 and not (low_freq < vtln_low < high_freq and 0.0 < vtln_high < high_freq and vtln_low < vtln_high):
        raise ValueError(f"bad VTLN cut-offs vtln_low={vtln_low:g}, vtln_high={vtln_high:g} for range ({low_freq:g}, {high_freq:g}) Hz")

    # float32 throughout, as Kaldi (BaseFloat) and torchaudio compute them: single-bin filters at low
    # frequencies make the log-mel sensitive to the last bits of these weights.
    mel_low, mel_high = (1127.0 * math.log(1.0 + f / 700.0) for f in (low_freq, high_freq))
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    index = torch.arange(num_mel_bins).unsqueeze(1)
    left, center, right = (mel_low + (index + k) * delta for k in (0.0, 1.0, 2.0))
    if vtln_warp != 1.0:
        left, center, right = (
            _mel_scale(_vtln_warp_freq(_inverse_mel_scale(m), vtln_low, vtln_high, low_freq, high_freq, vtln_warp))
            for m in (left, center, right)
        )
    bin_mel = _mel_scale(sample_rate / fft_size * torch.arange(fft_size // 2)).unsqueeze(0)
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    if vtln_warp == 1.0:
        banks = torch.clamp_min(torch.minimum(up, down), 0.0)
    else:  # warped edges can make the slopes disagree; Kaldi picks the side the bin falls on
        rising = (bin_mel > left) & (bin_mel <= center)
        falling = (bin_mel > center) & (bin_mel < right)
        banks = torch.where(rising, up, torch.where(falling, down, torch.zeros_like(up)))
    banks = torch.cat([banks, banks.new_zeros(num_mel_bins, 1)], dim=1)  # Nyquist bin gets weight 0
    return banks.t().contiguous().to(device=device, dtype=dtype)


@constant_cache(maxsize=64)
def _kaldi_filterbank(*args) -> Filterbank:
    return Filterbank(kaldi_mel_banks(*args))


def _reflect_pad_for_frames(waveform: Tensor, num_frames: int, window_size: int, window_shift: int) -> Tensor:
    """Kaldi's ``snip_edges=False`` edge handling: frames centred on ``shift * (t + 1/2)``, edges mirrored
    including the edge sample (``x[-1-i] = x[i]``)."""
    pad = window_size // 2 - window_shift // 2
    needed = (num_frames - 1) * window_shift + window_size
    if pad >= 0:
        parts = [waveform[..., :pad].flip(-1), waveform]
    else:
        parts = [waveform[..., -pad:]]
    have = sum(p.shape[-1] for p in parts)
    if needed > have:
        parts.append(waveform.flip(-1)[..., : needed - have])
    return torch.cat(parts, dim=-1)


def _log_energy(frames: Tensor, energy_floor: float) -> Tensor:
    log_energy = frames.square().sum(-1).clamp_min(_FLOAT32_EPS).log()
    if energy_floor > 0.0:
        log_energy = log_energy.clamp_min(math.log(energy_floor))
    return log_energy


_BLOCK_BYTES = 4 << 20


class _FrameOptions(NamedTuple):
    window: Tensor
    banks: Filterbank
    fft_size: int
    preemphasis_coefficient: float
    remove_dc_offset: bool
    use_energy: bool
    energy_floor: float
    raw_energy: bool
    htk_compat: bool
    use_log_fbank: bool
    use_power: bool
    inplace: bool  # no autograd needed: write into buffers with out= / in-place ops


def _fbank_frames(frames: Tensor, opt: _FrameOptions) -> Tensor:
    """Fbank (+ log energy) of ``frames`` ``[..., T, window]`` -> ``[..., T, M]``.

    Per-frame DC removal, pre-emphasis (``y[i] = x[i] - c x[i-1]``, ``x[-1] := x[0]``) and window are written
    into one zero-padded FFT buffer, in Kaldi's order (the float32 rounding of weak low bins depends on it).
    """
    window_size = frames.shape[-1]
    coeff = opt.preemphasis_coefficient
    if opt.remove_dc_offset:
        frames = frames - frames.mean(-1, keepdim=True)
    if opt.use_energy and opt.raw_energy:
        energy = _log_energy(frames, opt.energy_floor)
    buffer = frames.new_empty(*frames.shape[:-1], opt.fft_size)
    buffer[..., window_size:] = 0.0
    body = buffer[..., :window_size]
    if coeff != 0.0:
        scaled = coeff * frames  # rounded on its own, as Kaldi does (a fused a - c*b would differ in the last bit)
        if opt.inplace:
            torch.sub(frames[..., 1:], scaled[..., :-1], out=body[..., 1:])
            torch.sub(frames[..., :1], scaled[..., :1], out=body[..., :1])
        else:
            body[..., 1:] = frames[..., 1:] - scaled[..., :-1]
            body[..., :1] = frames[..., :1] - scaled[..., :1]
    else:
        body[...] = frames
    body *= opt.window
    if opt.use_energy and not opt.raw_energy:
        energy = _log_energy(body, opt.energy_floor)

    spectrum = torch.view_as_real(torch.fft.rfft(buffer))
    if opt.inplace:
        power = torch.add(*spectrum.square_().unbind(-1))
    else:
        power = spectrum[..., 0].square() + spectrum[..., 1].square()
    if not opt.use_power:
        power = power.sqrt_() if opt.inplace else power.sqrt()
    features = opt.banks(power)
    if opt.use_log_fbank:
        features = features.clamp_min_(_FLOAT32_EPS).log_() if opt.inplace else features.clamp_min(_FLOAT32_EPS).log()
    if opt.use_energy:
        energy = energy.unsqueeze(-1)
        features = torch.cat([features, energy] if opt.htk_compat else [energy, features], dim=-1)
    return features


def kaldi_fbank(
    waveform: Tensor,
    sample_rate: float = 16000,
    num_mel_bins: int = 23,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    window_type: str = "povey",
    dither: float = 0.0,
    preemphasis_coefficient: float = 0.97,
    remove_dc_offset: bool = True,
    round_to_power_of_two: bool = True,
    snip_edges: bool = True,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    use_energy: bool = False,
    energy_floor: float = 1.0,
    raw_energy: bool = True,
    htk_compat: bool = False,
    use_log_fbank: bool = True,
    use_power: bool = True,
    subtract_mean: bool = False,
    blackman_coeff: float = 0.42,
    vtln_low: float = 100.0,
    vtln_high: float = -500.0,
    vtln_warp: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Kaldi fbank features of ``waveform`` ``[N]`` or ``[..., N]`` -> ``[T, M]`` or ``[..., T, M]``.

    Same arguments and results as ``torchaudio.compliance.kaldi.fbank`` (``sample_rate`` is its
    ``sample_frequency``; frame length/shift in ms). ``M = num_mel_bins + use_energy``; the log energy comes
    first, or last with ``htk_compat``. Integer waveforms are used as float32 sample values (no rescaling, as
    Kaldi). ``dither`` draws Gaussian noise per frame sample from ``generator``. Differentiable.
    """
    if window_type not in WINDOW_TYPES:
        raise ValueError(f"unknown window_type {window_type!r}; expected one of {', '.join(WINDOW_TYPES)}")
    if not 0.0 <= preemphasis_coefficient <= 1.0:
        raise ValueError(f"preemphasis_coefficient must be in [0, 1], got {preemphasis_coefficient}")
    if waveform.dim() == 0 or waveform.numel() == 0:
        raise InputError(f"waveform must be a non-empty [N] or [..., N], got shape {tuple(waveform.shape)}")
    if waveform.dtype not in (torch.float32, torch.float64):  # integer PCM / half precision
        waveform = waveform.float()
    window_size, window_shift, fft_size = kaldi_frame_layout(sample_rate, frame_length, frame_shift, round_to_power_of_two)
    num_samples = waveform.shape[-1]
    if num_samples < window_size:
        raise InputError(
            f"waveform has {num_samples} samples, fewer than one {frame_length:g} ms frame ({window_size} samples at {sample_rate:g} Hz)"
        )
    banks = _kaldi_filterbank(num_mel_bins, fft_size, float(sample_rate), float(low_freq), float(high_freq),
                            float(vtln_low), float(vtln_high), float(vtln_warp), waveform.device, waveform.dtype)
    window = kaldi_window(window_type, window_size, float(blackman_coeff), waveform.device, waveform.dtype)

    num_frames = kaldi_num_frames(num_samples, window_size, window_shift, snip_edges)
    if not snip_edges:
        waveform = _reflect_pad_for_frames(waveform, num_frames, window_size, window_shift)
    frames = waveform.unfold(-1, window_size, window_shift)[..., :num_frames, :]  # strided view, no copy
    if dither != 0.0:
        noise = torch.randn(frames.shape, generator=generator, device=frames.device, dtype=frames.dtype)
        frames = frames + dither * noise
    options = _FrameOptions(window, banks, fft_size, preemphasis_coefficient, remove_dc_offset, use_energy, energy_floor,
                            raw_energy, htk_compat, use_log_fbank, use_power,
                            inplace=not (torch.is_grad_enabled() and waveform.requires_grad))
    # The per-frame pipeline is memory-bound: run it over blocks of ~_BLOCK_BYTES of FFT buffer (all batch
    # items at once) so each block's intermediates stay in cache. One block for a single 10 s clip.
    batch_items = frames[..., 0, 0].numel()
    block = max(1, _BLOCK_BYTES // (fft_size * frames.element_size() * batch_items))
    if block >= num_frames:
        features = _fbank_frames(frames, options)
    else:
        features = torch.cat([_fbank_frames(part, options) for part in frames.split(block, dim=-2)], dim=-2)
    if subtract_mean:
        features = features - features.mean(-2, keepdim=True)
    return features


class KaldiFbank(nn.Module):
    """Module wrapper of :func:`kaldi_fbank` with fixed options: ``[..., N]`` -> ``[..., T, M]``."""

    def __init__(self, sample_rate: float = 16000, **options) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(inspect.signature(kaldi_fbank).parameters) | ({"waveform", "sample_rate"} & set(options)))
        if unknown:
            raise ValueError(f"unknown kaldi_fbank option(s): {', '.join(unknown)}")
        self.sample_rate = sample_rate
        self.options = options
        kaldi_frame_layout(sample_rate, options.get("frame_length", 25.0), options.get("frame_shift", 10.0))  # validate early

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for a clip of ``num_samples`` samples."""
        size, shift, _ = kaldi_frame_layout(self.sample_rate, self.options.get("frame_length", 25.0), self.options.get("frame_shift", 10.0))
        return kaldi_num_frames(num_samples, size, shift, self.options.get("snip_edges", True))

    def forward(self, waveform: Tensor) -> Tensor:
        return kaldi_fbank(as_waveform(waveform), self.sample_rate, **self.options)

    def extra_repr(self) -> str:
        return ", ".join([f"sample_rate={self.sample_rate}"] + [f"{k}={v!r}" for k, v in self.options.items()])
