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


# ------------------------------------------------------------------------------------------ power_mel (STFT frontends)
def _power_mel_reference(spectrum: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
    """float64: |spectrum|^2 @ mel, ``[B, T, F]`` -> ``[B, M, T]``."""
    power = spectrum.to(torch.complex128).abs().square()
    return (power @ mel.double()).transpose(1, 2)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3), frames=st.integers(1, 70), bins=st.integers(2, 300), mels=st.integers(1, 70),
    zero_columns=st.booleans(), seed=st.integers(0, 2**16),
)
def test_power_mel_equals_float64(batch, frames, bins, mels, zero_columns, seed):
    """Any sizes (frames not a multiple of 4 or 16, bands not a multiple of 16, bands with no weights): the C band
    powers are within float32 rounding of float64 |X|^2 @ mel."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.complex(torch.randn(batch, frames, bins, generator=g), torch.randn(batch, frames, bins, generator=g))
    mel = torch.rand(bins, mels, generator=g) * (torch.rand(bins, mels, generator=g) < 0.3)
    if zero_columns:
        mel[:, ::3] = 0
    out = log_mel.power_mel(spectrum, log_mel.mel_layout(mel), mels)
    assert out is not None and out.shape == (batch, mels, frames)
    expected = _power_mel_reference(spectrum, mel)
    torch.testing.assert_close(out.double(), expected, rtol=2e-6, atol=1e-6 * float(expected.abs().max()) + 1e-30)


def test_power_mel_db_log10_and_floor():
    """In dB: 10 log10(max(x, amin)) within 2e-5 dB of torch's over 1e-12..1e12, the floor ``max - top_db`` per
    group of items (1: each item; the batch: all), and no floor with ``top_db=None``."""
    values = torch.logspace(-12, 12, 4001, dtype=torch.float64).float()
    bins = 257
    spectrum = torch.complex(values.sqrt(), torch.zeros_like(values)).reshape(1, -1, 1).expand(1, -1, bins).contiguous()
    mel = torch.zeros(bins, 20)
    mel[5, 3] = 1.0  # band 3 reads bin 5 alone: the power itself
    out = log_mel.power_mel(spectrum, log_mel.mel_layout(mel), 20, db=(1e-10, None, 1))
    expected = 10 * torch.log10(values.double().clamp_min(1e-10))
    torch.testing.assert_close(out[0, 3].double(), expected, atol=2e-5, rtol=0)
    assert torch.all((out[0, 0] + 100.0).abs() < 2e-5)  # empty bands: the amin floor, 10 log10(1e-10)
    slope = 10 ** (-torch.arange(bins) / 40.0)  # bins fall off to -128 dB: the floor is reached
    g = torch.Generator().manual_seed(0)
    loud = torch.complex(torch.randn(2, 30, bins, generator=g), torch.randn(2, 30, bins, generator=g)) * slope
    loud[1] *= 1e-3  # item 1 is 60 dB quieter
    banded = torch.zeros(bins, 16)
    for j in range(16):  # band j: bins 16 j .. 16 j + 15, so the bands span the spectrum's 128 dB
        banded[16 * j : 16 * j + 16, j] = 1.0
    layout = log_mel.mel_layout(banded)
    each = log_mel.power_mel(loud, layout, 16, db=(1e-10, 20.0, 1))
    both = log_mel.power_mel(loud, layout, 16, db=(1e-10, 20.0, 2))
    for i in range(2):  # in float32, as the floor is computed
        assert each[i].min() == each[i].max() - 20.0
    assert torch.all(both[1] == both[0].max() - 20.0)  # the batch's floor lifts all of the quiet item


def test_stft_frontends_equal_their_torch_path(clips, monkeypatch):
    """DashengMel (dB, batch or per-clip floor, any leading shape) and an SSAM-style MelSpectrogram through the C
    pass equal the torch path: within 1e-4 dB (the fixtures allow 1e-3) and 1e-6 relative."""
    from tympan.features import DashengMel, MelSpectrogram

    wave = torch.from_numpy(np.stack([clips[0][:32000], clips[1][:32000]]))
    batch = torch.cat([wave, 1e-3 * wave.flip(0)])  # quiet items: the floor matters
    frontends = [DashengMel(batch_max=True), DashengMel(batch_max=False)]
    inputs = (batch[0], batch, batch[:, None], batch.reshape(2, 2, -1))
    ssam = MelSpectrogram(16000, 400, hop_length=160, n_mels=80, f_min=50.0, f_max=8000.0)

    def run() -> tuple[list[torch.Tensor], torch.Tensor]:
        with torch.inference_mode():
            return [frontend(x) for frontend in frontends for x in inputs], ssam(batch)

    fast, fast_ssam = run()
    monkeypatch.setattr(log_mel, "ENABLED", False)
    slow, slow_ssam = run()
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast_ssam, slow_ssam, atol=0, rtol=1e-6)


def test_power_mel_declines_and_autograd_keeps_the_torch_path():
    """Autograd, complex128 or a mismatched matrix: None; a DashengMel under autograd stays differentiable."""
    from tympan.features import DashengMel

    spectrum = torch.complex(torch.randn(1, 5, 257), torch.randn(1, 5, 257))
    layout = log_mel.mel_layout(torch.rand(257, 64))
    assert log_mel.power_mel(spectrum.to(torch.complex128), layout, 64) is None
    assert log_mel.power_mel(spectrum[..., :200], layout, 64) is None
    assert log_mel.power_mel(spectrum.requires_grad_(), layout, 64) is None
    wave = torch.randn(1, 16000, requires_grad=True)
    DashengMel()(wave).sum().backward()
    assert wave.grad is not None and torch.isfinite(wave.grad).all()


def test_power_mel_db_nan_poisons_its_floor_group_as_torch():
    """A NaN in one item's spectrum: with the per-item floor that item is all NaN and the other untouched, with the
    batch's floor both are, as torch's amax and maximum make them (amplitude_to_db on the banded product)."""
    from tympan.features.mel import _filterbank, amplitude_to_db

    g = torch.Generator().manual_seed(0)
    spectrum = torch.complex(torch.randn(2, 20, 257, generator=g), torch.randn(2, 20, 257, generator=g))
    spectrum[0, 3, 40] = float("nan")
    bank = _filterbank(257, 0.0, 8000.0, 64, 16000, None, "htk", torch.device("cpu"), torch.float32)
    power = torch.view_as_real(spectrum).square().sum(-1)
    for group, batch_max in ((1, False), (2, True)):
        fast = log_mel.power_mel(spectrum, bank.layout, 64, db=(1e-10, 80.0, group))
        slow = amplitude_to_db(bank(power).transpose(1, 2), top_db=80.0, batch_max=batch_max)
        assert torch.equal(fast.isnan(), slow.isnan()) and fast[0].isnan().all()
        assert fast[1].isnan().all() == batch_max
        torch.testing.assert_close(fast.nan_to_num(), slow.nan_to_num(), atol=1e-4, rtol=0)
