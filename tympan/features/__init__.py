"""Exact audio frontends in plain torch: Kaldi fbank, torchaudio-style mel spectrograms, and each model
family's input recipe (see :mod:`tympan.features.frontends`).

>>> from tympan.features import get_frontend
>>> frontend = get_frontend("ast-fbank", target_length=1024)
>>> features = frontend(waveform)          # [B, N] at frontend.sample_rate -> [B, 1024, 128]
"""

from tympan.features.frontends import (
    AUDIOSET_STATS,
    ESC50_STATS,
    FRONTENDS,
    SPEECHCOMMANDS_STATS,
    ASTFbank,
    DashengMel,
    SSAMLogMel,
    ast_fbank,
    get_frontend,
    pad_or_crop,
)
from tympan.features.kaldi import (
    WINDOW_TYPES,
    KaldiFbank,
    kaldi_fbank,
    kaldi_frame_layout,
    kaldi_mel_banks,
    kaldi_num_frames,
    kaldi_window,
)
from tympan.features.mel import (
    AmplitudeToDB,
    Filterbank,
    MelSpectrogram,
    amplitude_to_db,
    mel_filterbank,
    mel_spectrogram,
    mel_spectrogram_db,
    stft_num_frames,
)

__all__ = [
    "AUDIOSET_STATS",
    "ESC50_STATS",
    "FRONTENDS",
    "SPEECHCOMMANDS_STATS",
    "WINDOW_TYPES",
    "ASTFbank",
    "AmplitudeToDB",
    "DashengMel",
    "Filterbank",
    "KaldiFbank",
    "MelSpectrogram",
    "SSAMLogMel",
    "amplitude_to_db",
    "ast_fbank",
    "get_frontend",
    "kaldi_fbank",
    "kaldi_frame_layout",
    "kaldi_mel_banks",
    "kaldi_num_frames",
    "kaldi_window",
    "mel_filterbank",
    "mel_spectrogram",
    "mel_spectrogram_db",
    "pad_or_crop",
    "stft_num_frames",
]
