"""Features of long recordings at bounded memory: the registered frontends computed over decoded blocks.

:func:`stream_features` takes a function that opens the recording as consecutive 1-D float32 blocks (e.g.
``lambda: tympan.audio.stream(path)``) and returns what the frontend would give for the whole waveform, without
holding the waveform or its frames: only one block plus the output (and, for the dB / standardised frontends,
the output-sized power spectrogram) are in memory. Frames depend only on their own samples, so blocks are cut
on frame boundaries with the overlap carried over; centred STFTs get the reflect padding of the real start and
end; whole-clip statistics (AST's mean removal, Dasheng's ``max - 120 dB`` floor, SSAM's standardisation) are
applied over the whole output. Frontends or options this cannot reproduce exactly are computed whole.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from tympan.errors import InputError
from tympan.features.checks import as_waveform
from tympan.features.frontends import ASTFbank, DashengMel, SSAMLogMel
from tympan.features.kaldi import KaldiFbank, kaldi_fbank, kaldi_frame_layout
from tympan.features.mel import amplitude_to_db, mel_spectrogram

__all__ = ["stream_features"]

Blocks = Callable[[], Iterable[np.ndarray]]


def _tensors(blocks: Iterable[np.ndarray]) -> Iterator[Tensor]:
    for block in blocks:
        if len(block):
            yield as_waveform(torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)))


def _framewise(blocks: Iterable[Tensor], window: int, shift: int, compute: Callable[[Tensor], Tensor],
               time_axis: int) -> Tensor:  # fmt: skip
    """`compute` over consecutive pieces holding whole frames (size `window`, hop `shift`), concatenated."""
    outputs, carry = [], torch.zeros(0)
    for block in blocks:
        buffer = torch.cat([carry, block])
        if len(buffer) < window:
            carry = buffer
            continue
        frames = (len(buffer) - window) // shift + 1
        outputs.append(compute(buffer[: (frames - 1) * shift + window]))
        carry = buffer[frames * shift:]
    if not outputs:
        raise InputError(f"waveform has {len(carry)} samples, fewer than one frame ({window} samples)")
    return torch.cat(outputs, dim=time_axis)


def _reflect_padded(blocks: Iterable[Tensor], pad: int) -> Iterator[Tensor]:
    """The stream with ``pad`` samples reflected at its start and end (torch.stft's ``center=True`` padding)."""
    first, tail = True, torch.zeros(0)
    for block in blocks:
        buffer = torch.cat([tail, block])
        if first:
            if len(buffer) <= pad:  # the start needs pad + 1 samples
                tail = buffer
                continue
            buffer = torch.cat([buffer[1: pad + 1].flip(0), buffer])
            first = False
        keep = pad + 1  # the end's reflection needs the last pad + 1 samples
        if len(buffer) > keep:
            yield buffer[:-keep]
            tail = buffer[-keep:]
        else:
            tail = buffer
    if first:
        raise InputError(f"waveform has {len(tail)} samples; centred reflect padding needs more than {pad}")
    yield torch.cat([tail, tail[-pad - 1: -1].flip(0)])


def _mel_power(frontend: nn.Module, blocks: Iterable[Tensor]) -> Tensor:
    """``|STFT|^2`` mel of the whole stream, ``[n_mels, T]``, equal to ``frontend.mel`` of the whole waveform."""
    n_fft, hop = frontend.n_fft, frontend.hop_length

    def mel(piece: Tensor) -> Tensor:
        return mel_spectrogram(piece, frontend.sample_rate, n_fft, frontend.win_length, hop, frontend.f_min,
                               frontend.f_max, frontend.n_mels, center=False, power=2.0)  # fmt: skip

    return _framewise(_reflect_padded(blocks, n_fft // 2), n_fft, hop, mel, time_axis=-1)


def _kaldi_exact(frontend: KaldiFbank) -> bool:
    options = frontend.options
    return (options.get("snip_edges", True) and not options.get("subtract_mean", False)
            and not options.get("dither", 0.0))  # fmt: skip


def stream_features(frontend: nn.Module, open_blocks: Blocks) -> Tensor:
    """`frontend` of the recording `open_blocks()` yields (1-D blocks); the shape of ``frontend(waveform)``."""
    if isinstance(frontend, KaldiFbank) and _kaldi_exact(frontend):
        size, shift, _ = kaldi_frame_layout(frontend.sample_rate, frontend.options.get("frame_length", 25.0),
                                            frontend.options.get("frame_shift", 10.0))  # fmt: skip
        return _framewise(_tensors(open_blocks()), size, shift, frontend, time_axis=-2)
    if isinstance(frontend, ASTFbank):
        total, count = 0.0, 0
        for block in _tensors(open_blocks()):  # pass 1: the clip mean AST removes
            total += float(block.double().sum())
            count += len(block)
        mean = total / max(1, count)
        size, shift, _ = kaldi_frame_layout(frontend.sample_rate, 25.0, frontend.frame_shift)

        def fbank(piece: Tensor) -> Tensor:
            return kaldi_fbank(piece - mean, frontend.sample_rate, num_mel_bins=frontend.num_mel_bins,
                               frame_shift=frontend.frame_shift, window_type="hanning", htk_compat=True,
                               use_energy=False, dither=0.0)  # fmt: skip

        features = _framewise(_tensors(open_blocks()), size, shift, fbank, time_axis=-2)
        if frontend.target_length is not None:
            from tympan.features.frontends import pad_or_crop

            features = pad_or_crop(features, frontend.target_length)
        return (features - frontend.mean) / (2.0 * frontend.std) if frontend.normalize else features
    if isinstance(frontend, DashengMel) and type(frontend).forward is DashengMel.forward:
        power = _mel_power(frontend, _tensors(open_blocks()))
        return amplitude_to_db(power, top_db=frontend.top_db, batch_max=frontend.batch_max)
    if isinstance(frontend, SSAMLogMel):
        logmel = torch.log(_mel_power(frontend, _tensors(open_blocks())) + frontend.eps).transpose(-1, -2)
        logmel = logmel.unsqueeze(-3)
        if frontend.normalize:
            logmel = (logmel - logmel.mean()) / (logmel.std() + frontend.std_eps)
        return logmel
    waveform = torch.cat(list(_tensors(open_blocks())))
    return frontend(waveform)
