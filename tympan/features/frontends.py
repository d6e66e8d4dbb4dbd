"""The input transforms of the ported model families, each equal to its original, and a name registry.

==============  ==========================================================================  ===============
name            recipe                                                                      output
==============  ==========================================================================  ===============
kaldi-fbank     :class:`~tympan.features.kaldi.KaldiFbank` (any Kaldi options)              [B, T, M]
ast-fbank       AST/SSAST/DASS: clip mean removal, Kaldi fbank (hanning, 128 bins, htk),    [B, T, 128]
                pad/crop to ``target_length``, ``(x - mean) / (2 std)``
dasheng-mel     Dasheng/SAT: 64-mel power spectrogram (n_fft 512, hop 160) in dB,           [B, 64, T]
sat-mel         floor ``max - 120 dB`` over the whole batch (torchaudio's AmplitudeToDB)
ssam-mel        SSAM: 80-mel power spectrogram (n_fft 400, 50-8000 Hz), ``ln(x + eps)``,    [B, 1, T, 80]
                per-clip standardisation (unbiased std + 1e-8), time-major
==============  ==========================================================================  ===============

Every frontend has ``sample_rate`` and ``num_frames(num_samples)``; all take ``[B, N]`` (or ``[N]``). Integer
PCM is scaled to [-1, 1); empty, non-finite, bool or complex input is an InputError (:mod:`tympan.features.checks`).
Learned input normalisation (Dasheng/SAT ``init_bn``) belongs to the models, not here.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.errors import ConfigError
from tympan.features.checks import as_waveform
from tympan.features.kaldi import KaldiFbank, kaldi_fbank, kaldi_frame_layout, kaldi_num_frames
from tympan.features.mel import mel_spectrogram, mel_spectrogram_db, stft_num_frames

__all__ = [
    "ASTFbank",
    "AUDIOSET_STATS",
    "DashengMel",
    "ESC50_STATS",
    "FRONTENDS",
    "SPEECHCOMMANDS_STATS",
    "SSAMLogMel",
    "ast_fbank",
    "get_frontend",
    "pad_or_crop",
]

# (mean, std) of the unnormalised AST fbank per dataset, from the AST recipes.
AUDIOSET_STATS = (-4.2677393, 4.5689974)
ESC50_STATS = (-6.6268077, 5.358466)
SPEECHCOMMANDS_STATS = (-6.845978, 5.5654526)


def pad_or_crop(features: Tensor, target_length: int, dim: int = -2, value: float = 0.0) -> Tensor:
    """Pad ``features`` with ``value`` at the END of axis ``dim``, or drop its tail, to ``target_length``."""
    length = features.shape[dim]
    if length >= target_length:
        return features.narrow(dim, 0, target_length)
    dim = dim % features.dim()
    padding = [0, 0] * (features.dim() - 1 - dim) + [0, target_length - length]
    return F.pad(features, padding, value=value)


def ast_fbank(
    waveform: Tensor,
    sample_rate: int = 16000,
    target_length: int | None = None,
    mean: float = AUDIOSET_STATS[0],
    std: float = AUDIOSET_STATS[1],
    normalize: bool = True,
    num_mel_bins: int = 128,
    frame_shift: float = 10.0,
) -> Tensor:
    """AST/SSAST/DASS input features: ``[N]`` or ``[B, N]`` waveform in [-1, 1] -> ``[T, F]`` / ``[B, T, F]``.

    Removes each clip's own mean, computes Kaldi fbank (hanning, ``num_mel_bins``, htk_compat, dither 0,
    25 ms / ``frame_shift`` ms, no energy), zero-pads at the end or crops to ``target_length`` frames (None
    keeps all), then ``(x - mean) / (2 * std)`` (AudioSet stats by default; the factor 2 is the original
    recipe's). Padding happens before normalisation, so padded frames become ``-mean / (2 std)``.
    """
    waveform = as_waveform(waveform)
    waveform = waveform - waveform.mean(-1, keepdim=True)
    features = kaldi_fbank(waveform, sample_rate, num_mel_bins=num_mel_bins, frame_shift=frame_shift,
                           window_type="hanning", htk_compat=True, use_energy=False, dither=0.0)
    if target_length is not None:
        features = pad_or_crop(features, target_length)
    if normalize:
        features = (features - mean) / (2.0 * std)
    return features


class ASTFbank(nn.Module):
    """Module wrapper of :func:`ast_fbank` (the AST/SSAST/DASS input recipe)."""

    def __init__(self, sample_rate: int = 16000, target_length: int | None = None, mean: float = AUDIOSET_STATS[0],
                 std: float = AUDIOSET_STATS[1], normalize: bool = True, num_mel_bins: int = 128, frame_shift: float = 10.0) -> None:
        super().__init__()
        self.sample_rate, self.target_length = sample_rate, target_length
        self.mean, self.std, self.normalize = mean, std, normalize
        self.num_mel_bins, self.frame_shift = num_mel_bins, frame_shift
        self._window_size, self._window_shift, _ = kaldi_frame_layout(sample_rate, 25.0, frame_shift)

    def num_frames(self, num_samples: int) -> int:
        """Frames for a clip of ``num_samples`` samples (``target_length`` when set)."""
        if self.target_length is not None:
            return self.target_length
        return kaldi_num_frames(num_samples, self._window_size, self._window_shift)

    def content_frames(self, num_samples: int) -> int:
        """How many leading output frames hold the clip's own ``num_samples`` samples (the rest is padding)."""
        frames = kaldi_num_frames(num_samples, self._window_size, self._window_shift)
        return frames if self.target_length is None else min(frames, self.target_length)

    def forward(self, waveform: Tensor) -> Tensor:
        return ast_fbank(waveform, self.sample_rate, self.target_length, self.mean, self.std, self.normalize,
                         self.num_mel_bins, self.frame_shift)

    def extra_repr(self) -> str:
        return (f"sample_rate={self.sample_rate}, target_length={self.target_length}, mean={self.mean}, std={self.std}, "
                f"normalize={self.normalize}, num_mel_bins={self.num_mel_bins}")


class _STFTMelFrontend(nn.Module):
    """Shared STFT mel settings of the torchaudio-based frontends."""

    def __init__(self, sample_rate: int, n_fft: int, win_length: int, hop_length: int, f_min: float, f_max: float, n_mels: int) -> None:
        super().__init__()
        self.sample_rate, self.n_fft, self.win_length, self.hop_length = sample_rate, n_fft, win_length, hop_length
        self.f_min, self.f_max, self.n_mels = f_min, f_max, n_mels

    def num_frames(self, num_samples: int) -> int:
        """Frames for a clip of ``num_samples`` samples: ``num_samples // hop_length + 1`` (centred STFT)."""
        return stft_num_frames(num_samples, self.n_fft, self.hop_length, center=True)

    def mel(self, waveform: Tensor) -> Tensor:
        return mel_spectrogram(as_waveform(waveform), self.sample_rate, self.n_fft, self.win_length, self.hop_length, self.f_min,
                               self.f_max, self.n_mels, center=True, pad_mode="reflect", power=2.0)

    def extra_repr(self) -> str:
        return (f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, win_length={self.win_length}, hop_length={self.hop_length}, "
                f"f_min={self.f_min}, f_max={self.f_max}, n_mels={self.n_mels}")


class DashengMel(_STFTMelFrontend):
    """Dasheng / SAT log-mel in dB: ``[B, N]`` -> ``[B, 64, T]`` with ``T = N // 160 + 1``.

    ``torchaudio`` MelSpectrogram(16 kHz, n_fft 512, win 512, hop 160, 0-8000 Hz, 64 mels, centred, periodic
    Hann, power 2) then AmplitudeToDB(top_db=120). ``batch_max=True`` keeps the original quirk: one floor
    ``max - top_db`` for the whole batch; ``False`` floors every clip by its own max.
    """

    def __init__(self, sample_rate: int = 16000, n_fft: int = 512, win_length: int = 512, hop_length: int = 160, f_min: float = 0.0,
                 f_max: float = 8000.0, n_mels: int = 64, top_db: float | None = 120.0, batch_max: bool = True) -> None:
        super().__init__(sample_rate, n_fft, win_length, hop_length, f_min, f_max, n_mels)
        self.top_db, self.batch_max = top_db, batch_max

    def forward(self, waveform: Tensor) -> Tensor:
        return mel_spectrogram_db(as_waveform(waveform), self.sample_rate, self.n_fft, self.win_length, self.hop_length,
                                  self.f_min, self.f_max, self.n_mels, top_db=self.top_db, batch_max=self.batch_max)


class SSAMLogMel(_STFTMelFrontend):
    """SSAM log-mel: ``[B, N]`` -> ``[B, 1, T, 80]`` (time-major), ``T = N // 160 + 1``.

    MelSpectrogram(16 kHz, n_fft 400, hop 160, 50-8000 Hz, 80 mels, power 2), ``ln(mel + eps)`` with float32
    eps, then (``normalize``) per clip ``(x - mean) / (std + 1e-8)`` over all frames and bins with the unbiased
    std, as SSAM's HEAR wrapper does.
    """

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, win_length: int = 400, hop_length: int = 160, f_min: float = 50.0,
                 f_max: float = 8000.0, n_mels: int = 80, eps: float = 1.1920929e-07, normalize: bool = True, std_eps: float = 1e-8) -> None:
        super().__init__(sample_rate, n_fft, win_length, hop_length, f_min, f_max, n_mels)
        self.eps, self.normalize, self.std_eps = eps, normalize, std_eps

    def forward(self, waveform: Tensor) -> Tensor:
        logmel = torch.log(self.mel(waveform) + self.eps).transpose(-1, -2).unsqueeze(-3)  # [..., 1, T, F]
        if self.normalize:
            mean = logmel.mean(dim=(-2, -1), keepdim=True)
            std = logmel.std(dim=(-2, -1), keepdim=True)
            logmel = (logmel - mean) / (std + self.std_eps)
        return logmel


FRONTENDS: dict[str, Callable[..., nn.Module]] = {
    "kaldi-fbank": KaldiFbank,
    "ast-fbank": ASTFbank,
    "dasheng-mel": DashengMel,
    "sat-mel": DashengMel,
    "ssam-mel": SSAMLogMel,
}


def get_frontend(name: str, **kwargs) -> nn.Module:
    """Build the frontend registered as ``name`` (see :data:`FRONTENDS`), with its defaults overridden by ``kwargs``."""
    try:
        factory = FRONTENDS[name]
    except KeyError:
        raise ConfigError(f"unknown frontend {name!r}; available: {', '.join(sorted(FRONTENDS))}") from None
    return factory(**kwargs)
