"""The one-pass C log-mel (tympan.ops.log_mel) against float64 numpy and the torch path, on real audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tympan import audio
from tympan.models.tymnet import HOP, LOG_OFFSET, WINDOW, YAMNetLogMel, _frontend_constants
from tympan.ops import log_mel

pytestmark = pytest.mark.skipif(not log_mel.available(), reason="no C compiler: the torch path is the only one")


@pytest.fixture(scope="module")
def clips(data_dir) -> list[np.ndarray]:
    folder = data_dir / "esc10" / "audio"
    return [audio.load(folder / name) for name in ("1-100032-A-0.flac", "1-110389-A-0.flac")]


def reference(wave: np.ndarray, frames: int, hop: int, window: np.ndarray, mel: np.ndarray, offset: float) -> np.ndarray:
    """float64 numpy: frames of ``len(window)`` samples (zeros past the end), |rfft_512| @ mel + offset."""
    wave = wave.astype(np.float64)
    need = (frames - 1) * hop + len(window)
    padded = np.concatenate([wave, np.zeros(max(0, need - len(wave)))])
    index = np.arange(frames)[:, None] * hop + np.arange(len(window))[None]
    spectrum = np.abs(np.fft.rfft(padded[index] * window.astype(np.float64), n=512))
    return spectrum @ mel.astype(np.float64) + offset


def constants() -> tuple[torch.Tensor, torch.Tensor]:
    c = _frontend_constants()
    return c["window_nfft"][:WINDOW].contiguous(), c["mel"]


@settings(max_examples=30, deadline=None)
@given(
    start=st.integers(0, 40000),
    length=st.integers(1, 9000),
    frames=st.integers(1, 70),
    hop=st.sampled_from([1, 37, 160, 400]),
    window_len=st.sampled_from([1, 16, 255, 400, 512]),
    batch=st.integers(1, 3),
)
def test_mel_energies_equal_float64_numpy(clips, start, length, frames, hop, window_len, batch):
    """Any length (reads past the end are zeros), frame count (whole and partial 16-frame blocks), hop and window."""
    wave = np.stack([c[start : start + length] for c in (clips * 2)[:batch]])
    rng = np.random.default_rng(length)
    window = rng.uniform(0.1, 1.0, window_len).astype(np.float32)
    mel = _frontend_constants()["mel"].numpy()
    got = log_mel.mel_energies(torch.from_numpy(wave), frames, hop, torch.from_numpy(window), torch.from_numpy(mel),
                               LOG_OFFSET)  # fmt: skip
    assert got is not None and got.shape == (batch, frames, mel.shape[1])
    for row in range(batch):
        want = reference(wave[row], frames, hop, window, mel, LOG_OFFSET)
        scale = want.max()  # float32 rounding is relative to the frame's energy
        assert np.abs(got[row].numpy() - want).max() <= 2e-6 * scale + 1e-7


@pytest.mark.parametrize("short", [1, 8, 15, 16, 17, 160])
def test_rows_end_with_zeros_not_the_next_row(clips, short):
    """A full block of 16 frames whose last frame runs `short` samples past its row: those samples are zeros, even
    though the next row's samples follow in memory."""
    window, mel = constants()
    length = 15 * HOP + WINDOW - short
    wave = np.stack([clips[0][:length], clips[1][:length]])
    got = log_mel.mel_energies(torch.from_numpy(wave), 16, HOP, window, mel, LOG_OFFSET)
    for row in range(2):
        want = reference(wave[row], 16, HOP, window.numpy(), mel.numpy(), LOG_OFFSET)
        assert np.abs(got[row].numpy() - want).max() <= 2e-6 * want.max() + 1e-7


def test_frontend_kernel_equals_the_torch_path(clips):
    """YAMNetLogMel through the kernel and through torch.fft: the same log-mel to float rounding, batched and padded
    (YAMNet's padding: the kernel reads zeros where torch pads)."""
    frontend = YAMNetLogMel()
    batch = torch.from_numpy(np.stack([clips[0][:50000], clips[1][:50000]]))
    short = torch.from_numpy(clips[1][:3000].copy())[None]  # shorter than one patch: padded to 15,600
    for wave in (batch, short):
        kernel = frontend(wave)
        log_mel.ENABLED = False
        try:
            torch_path = frontend(wave)
        finally:
            log_mel.ENABLED = True
        assert kernel.shape == torch_path.shape
        energy = torch_path.exp()  # compare where it counts: log of small energies magnifies rounding
        assert ((kernel.exp() - energy).abs() / (energy.amax(-1, keepdim=True) + 1e-3)).max() < 1e-5
        assert (kernel - torch_path).abs().max() < 1e-3


def test_frames_do_not_depend_on_their_block_or_thread_count(clips):
    """A frame's numbers are the same wherever it falls (a full 16-frame block, a partial tail block, another
    offset of the signal) and on any number of threads: what makes streaming steps equal the whole clip bit for
    bit."""
    window, mel = constants()
    wave = torch.from_numpy(clips[0][:40000].copy())[None]
    whole = log_mel.mel_energies(wave, 200, HOP, window, mel, LOG_OFFSET, threads=1)
    for first, count in ((0, 5), (17, 16), (183, 17), (190, 10)):
        part = log_mel.mel_energies(wave[:, first * HOP :], count, HOP, window, mel, LOG_OFFSET, threads=1)
        assert torch.equal(part[0], whole[0, first : first + count])
    two = log_mel.mel_energies(wave.repeat(3, 1), 200, HOP, window, mel, LOG_OFFSET, threads=2)
    assert all(torch.equal(two[i], whole[0]) for i in range(3))


def test_declines_what_it_does_not_cover():
    """Autograd, float64, other window or matrix shapes, no hop: None, so the caller takes its torch path."""
    window, mel = constants()
    wave = torch.randn(1, 16000)
    assert log_mel.mel_energies(wave.double(), 10, HOP, window, mel, 0.0) is None
    assert log_mel.mel_energies(wave, 10, HOP, torch.ones(600), mel, 0.0) is None
    assert log_mel.mel_energies(wave, 10, HOP, window, mel[:200], 0.0) is None
    assert log_mel.mel_energies(wave, 10, 0, window, mel, 0.0) is None
    assert log_mel.mel_energies(wave.requires_grad_(), 10, HOP, window, mel, 0.0) is None
    frontend = YAMNetLogMel()
    grad_wave = torch.randn(1, 16000, requires_grad=True)
    frontend(grad_wave).sum().backward()  # the torch path, differentiable
    assert grad_wave.grad is not None and torch.isfinite(grad_wave.grad).all()
