"""tympan.features: Kaldi fbank against kaldi-native-fbank, property tests, frontends on real audio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tympan.features import (
    FRONTENDS,
    ASTFbank,
    DashengMel,
    KaldiFbank,
    MelSpectrogram,
    SSAMLogMel,
    amplitude_to_db,
    ast_fbank,
    get_frontend,
    kaldi_fbank,
    kaldi_frame_layout,
    kaldi_mel_banks,
    kaldi_num_frames,
    mel_spectrogram,
    pad_or_crop,
)

knf = pytest.importorskip("kaldi_native_fbank")

SAMPLE_RATES = (8000, 16000, 22050, 44100)


def _signal(num_samples: int, sample_rate: float, seed: int = 0, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """Tones + noise + a DC offset: exercises DC removal, pre-emphasis and every mel band."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples, dtype=torch.float64) / sample_rate
    tones = 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.1 * torch.sin(2 * math.pi * 3000 * t * (1 + t))
    noise = 0.05 * torch.randn(*batch, num_samples, generator=gen, dtype=torch.float64)
    return (tones + noise + 0.02).float()


def _knf_fbank(waveform: np.ndarray, sample_rate: float, **kw) -> np.ndarray:
    """The same options through kaldi-native-fbank (Kaldi's C++ FbankComputer)."""
    opts = knf.FbankOptions()
    frame, mel = opts.frame_opts, opts.mel_opts
    frame.samp_freq = sample_rate
    frame.dither = 0.0
    frame.window_type = kw.get("window_type", "povey")
    frame.frame_length_ms = kw.get("frame_length", 25.0)
    frame.frame_shift_ms = kw.get("frame_shift", 10.0)
    frame.preemph_coeff = kw.get("preemphasis_coefficient", 0.97)
    frame.remove_dc_offset = kw.get("remove_dc_offset", True)
    frame.round_to_power_of_two = kw.get("round_to_power_of_two", True)
    frame.snip_edges = kw.get("snip_edges", True)
    frame.blackman_coeff = kw.get("blackman_coeff", 0.42)
    mel.num_bins = kw.get("num_mel_bins", 23)
    mel.low_freq = kw.get("low_freq", 20.0)
    mel.high_freq = kw.get("high_freq", 0.0)
    opts.use_energy = kw.get("use_energy", False)
    opts.energy_floor = kw.get("energy_floor", 1.0)
    opts.raw_energy = kw.get("raw_energy", True)
    opts.htk_compat = kw.get("htk_compat", False)
    opts.use_log_fbank = kw.get("use_log_fbank", True)
    opts.use_power = kw.get("use_power", True)
    extractor = knf.OnlineFbank(opts)
    extractor.accept_waveform(sample_rate, waveform.tolist())
    extractor.input_finished()
    return np.stack([extractor.get_frame(i) for i in range(extractor.num_frames_ready)])


ORACLE_CASES = [
    dict(),
    dict(window_type="hanning", num_mel_bins=80, htk_compat=True),
    dict(window_type="hamming", use_energy=True),
    dict(window_type="hamming", use_energy=True, energy_floor=0.0, htk_compat=True),
    dict(window_type="rectangular", snip_edges=False),
    dict(window_type="povey", snip_edges=False, use_energy=True, frame_shift=12.5),
    dict(window_type="blackman", use_energy=True, raw_energy=False, htk_compat=True),
    dict(window_type="blackman", blackman_coeff=0.3, num_mel_bins=40),
    dict(use_power=False, high_freq=-400.0, low_freq=60.0),
    dict(preemphasis_coefficient=0.0, remove_dc_offset=False),
    dict(preemphasis_coefficient=0.5, remove_dc_offset=False, use_energy=True),
    dict(round_to_power_of_two=False, frame_length=20.0),
    dict(frame_length=50.0, frame_shift=20.0, num_mel_bins=64, window_type="hanning"),
]


@pytest.mark.parametrize("sample_rate", SAMPLE_RATES)
@pytest.mark.parametrize("options", ORACLE_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_kaldi_fbank_matches_kaldi_native_fbank(sample_rate, options):
    waveform = _signal(int(0.37 * sample_rate) + 7, sample_rate, seed=sample_rate)
    size = int(sample_rate * options.get("frame_length", 25.0) * 0.001)
    if not options.get("round_to_power_of_two", True) and size % 2:  # Kaldi needs an even FFT size
        with pytest.raises(ValueError, match="FFT size must be even"):
            kaldi_fbank(waveform, sample_rate, **options)
        return
    expected = _knf_fbank(waveform.numpy(), sample_rate, **options)
    actual = kaldi_fbank(waveform, sample_rate, **options).numpy()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=1e-3, rtol=1e-4)


def test_log_free_outputs_match_kaldi_native_fbank_relatively():
    waveform = _signal(16000, 16000)
    for options in (dict(use_log_fbank=False), dict(use_log_fbank=False, use_power=False, window_type="hamming")):
        expected = _knf_fbank(waveform.numpy(), 16000, **options)
        np.testing.assert_allclose(kaldi_fbank(waveform, 16000, **options).numpy(), expected, rtol=2e-4, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    sample_rate=st.sampled_from(SAMPLE_RATES),
    seconds=st.floats(0.03, 0.6),
    batch=st.sampled_from([(1,), (3,), (2, 2)]),
    snip_edges=st.booleans(),
    window_type=st.sampled_from(["povey", "hanning", "hamming", "rectangular", "blackman"]),
)
def test_kaldi_fbank_batched_equals_per_item_and_frame_formula(sample_rate, seconds, batch, snip_edges, window_type):
    num_samples = max(int(seconds * sample_rate), int(0.025 * sample_rate))
    waveform = _signal(num_samples, sample_rate, batch=batch)
    options = dict(snip_edges=snip_edges, window_type=window_type, num_mel_bins=23, use_energy=True)
    batched = kaldi_fbank(waveform, sample_rate, **options)
    size, shift, _ = kaldi_frame_layout(sample_rate, 25.0, 10.0)
    assert batched.shape == (*batch, kaldi_num_frames(num_samples, size, shift, snip_edges), 24)
    assert torch.isfinite(batched).all()
    flat = waveform.reshape(-1, num_samples)
    items = torch.stack([kaldi_fbank(row, sample_rate, **options) for row in flat])
    torch.testing.assert_close(batched.reshape(items.shape), items, atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(sample_rate=st.sampled_from(SAMPLE_RATES), seconds=st.floats(0.05, 0.5), seed=st.integers(0, 1000))
def test_float64_agrees_with_float32(sample_rate, seconds, seed):
    waveform = _signal(int(seconds * sample_rate), sample_rate, seed=seed, batch=(2,))
    single = kaldi_fbank(waveform, sample_rate, window_type="hanning", num_mel_bins=40)
    double = kaldi_fbank(waveform.double(), sample_rate, window_type="hanning", num_mel_bins=40)
    assert double.dtype == torch.float64
    torch.testing.assert_close(single.double(), double, atol=2e-3, rtol=0)
    mel32 = mel_spectrogram(waveform, sample_rate, n_fft=512, hop_length=160, n_mels=40)
    mel64 = mel_spectrogram(waveform.double(), sample_rate, n_fft=512, hop_length=160, n_mels=40)
    torch.testing.assert_close(amplitude_to_db(mel32).double(), amplitude_to_db(mel64), atol=1e-3, rtol=0)


@settings(max_examples=20, deadline=None)
@given(
    sample_rate=st.sampled_from(SAMPLE_RATES),
    seconds=st.floats(0.0, 0.8),
    batch=st.sampled_from([(1,), (3,), (2, 2)]),
    name=st.sampled_from(["dasheng-mel", "ssam-mel", "ast-fbank"]),
)
def test_frontends_batched_equals_per_item_and_num_frames(sample_rate, seconds, batch, name):
    num_samples = max(int(seconds * sample_rate), int(0.026 * sample_rate), 300)  # >= one Kaldi frame, > n_fft // 2
    if name == "ast-fbank":
        frontend = get_frontend(name, sample_rate=sample_rate)
    else:
        frontend = get_frontend(name, sample_rate=sample_rate, f_max=sample_rate / 2)
    waveform = _signal(num_samples, sample_rate, batch=batch)
    flat = waveform.reshape(-1, num_samples)
    if name == "dasheng-mel":  # the batch-wide dB floor couples items; compare per-item floors
        frontend.batch_max = False
    batched = frontend(flat)
    items = torch.cat([frontend(row[None]) for row in flat])
    torch.testing.assert_close(batched, items, atol=1e-4, rtol=1e-5)
    time_axis = -2 if name in ("ast-fbank", "ssam-mel") else -1
    assert batched.shape[time_axis] == frontend.num_frames(num_samples)
    assert torch.isfinite(batched).all()
    assert frontend.sample_rate == sample_rate


def test_silence_and_integer_input_are_finite():
    silence = torch.zeros(2, 16000)
    assert torch.isfinite(kaldi_fbank(silence, 16000, use_energy=True)).all()
    assert torch.allclose(kaldi_fbank(silence, 16000), torch.tensor(math.log(torch.finfo(torch.float32).eps)))
    assert torch.isfinite(DashengMel()(silence)).all() and torch.isfinite(SSAMLogMel()(silence)).all()
    pcm = (_signal(8000, 16000) * 32767).to(torch.int16)
    torch.testing.assert_close(kaldi_fbank(pcm, 16000), kaldi_fbank(pcm.float(), 16000))


def test_gradients_flow_through_every_frontend():
    torch.manual_seed(0)
    tiny = torch.randn(1, 70, dtype=torch.float64, requires_grad=True)
    options = dict(frame_length=25.0, frame_shift=10.0, num_mel_bins=4, low_freq=20.0, window_type="hamming", use_energy=True)
    assert torch.autograd.gradcheck(lambda x: kaldi_fbank(x, 800, **options), (tiny,))
    assert torch.autograd.gradcheck(lambda x: kaldi_fbank(x, 800, snip_edges=False, raw_energy=False, **{**options, "use_energy": True}), (tiny,))
    assert torch.autograd.gradcheck(lambda x: mel_spectrogram(x, 800, n_fft=16, hop_length=8, n_mels=4), (tiny,))
    waveform = _signal(4000, 16000, batch=(2,)).requires_grad_()
    for name in ("ast-fbank", "dasheng-mel", "ssam-mel"):
        waveform.grad = None
        get_frontend(name)(waveform).sum().backward()
        assert waveform.grad is not None and torch.isfinite(waveform.grad).all() and waveform.grad.abs().sum() > 0


def test_frontends_serve_gradients_after_a_first_call_under_inference_mode():
    """The cached windows and filterbanks are built outside inference mode: tagging first (inference_mode), then a
    training forward with gradients, in one process (the cache used to hold inference tensors: an error)."""
    from tympan.features import kaldi, mel

    for cached in (mel.mel_filterbank, mel._filterbank, mel.spectrogram_window, kaldi.kaldi_window,
                   kaldi.kaldi_mel_banks, kaldi._kaldi_filterbank):  # fmt: skip
        cached.cache_clear()
    waveform = _signal(4000, 16000, batch=(2,))
    names = ("ast-fbank", "dasheng-mel", "ssam-mel")
    with torch.inference_mode():
        for name in names:
            get_frontend(name)(waveform)
    trainable = waveform.clone().requires_grad_()
    for name in names:
        trainable.grad = None
        get_frontend(name)(trainable).sum().backward()
        assert trainable.grad is not None and trainable.grad.abs().sum() > 0, name


def test_grad_and_no_grad_paths_agree():
    waveform = _signal(16000, 16000, batch=(2,))
    with torch.no_grad():
        fast = kaldi_fbank(waveform, 16000, use_energy=True, raw_energy=False)
    slow = kaldi_fbank(waveform.clone().requires_grad_(), 16000, use_energy=True, raw_energy=False)
    torch.testing.assert_close(fast, slow.detach(), atol=0, rtol=0)


def test_clear_errors():
    with pytest.raises(ValueError, match="fewer than one 25 ms frame"):
        kaldi_fbank(torch.zeros(399), 16000)
    with pytest.raises(ValueError, match="unknown window_type 'hann'"):
        kaldi_fbank(torch.zeros(1600), 16000, window_type="hann")
    with pytest.raises(ValueError, match="num_mel_bins"):
        kaldi_fbank(torch.zeros(1600), 16000, num_mel_bins=3)
    with pytest.raises(ValueError, match="mel frequency range"):
        kaldi_fbank(torch.zeros(1600), 16000, low_freq=9000.0)
    with pytest.raises(ValueError, match="unknown kaldi_fbank option"):
        KaldiFbank(num_bins=40)
    with pytest.raises(ValueError, match="unknown frontend 'whisper'"):
        get_frontend("whisper")
    with pytest.raises(ValueError, match="n_fft // 2"):
        DashengMel()(torch.zeros(1, 100))
    with pytest.raises(ValueError, match="unknown window"):
        MelSpectrogram(window="blackman")


def test_dither_uses_the_generator():
    waveform = _signal(8000, 16000)
    first = kaldi_fbank(waveform, 16000, dither=1e-3, generator=torch.Generator().manual_seed(3))
    again = kaldi_fbank(waveform, 16000, dither=1e-3, generator=torch.Generator().manual_seed(3))
    clean = kaldi_fbank(waveform, 16000)
    assert torch.equal(first, again)
    assert 0 < (first - clean).abs().max() < 0.5


def test_vtln_warp_moves_filters_and_identity_at_one():
    plain = kaldi_mel_banks(23, 512, 16000.0)
    assert torch.equal(kaldi_mel_banks(23, 512, 16000.0, vtln_warp=1.0), plain)
    bins = torch.arange(257, dtype=torch.float32).unsqueeze(1)
    centroid = lambda banks: (banks * bins).sum(0) / banks.sum(0)  # noqa: E731
    for warp, direction in ((0.9, 1), (1.1, -1)):  # warp < 1 stretches the spectrum: filters move up
        warped = kaldi_mel_banks(23, 512, 16000.0, vtln_warp=warp)
        assert (warped >= 0).all() and warped.shape == plain.shape
        shift = (centroid(warped) - centroid(plain))[3:-3]
        assert (direction * shift > 0).all()
    waveform = _signal(8000, 16000)
    assert not torch.allclose(kaldi_fbank(waveform, 16000, vtln_warp=0.9), kaldi_fbank(waveform, 16000))
    with pytest.raises(ValueError, match="VTLN"):
        kaldi_mel_banks(23, 512, 16000.0, vtln_low=10.0, vtln_warp=0.9)


def test_amplitude_to_db_batch_floor_quirk():
    loud = torch.full((1, 4, 5), 1.0)
    quiet = torch.full((1, 4, 5), 1e-9)
    quiet[..., 0, 0] = 1e-3
    batch = torch.cat([loud, quiet])
    shared = amplitude_to_db(batch, top_db=60.0)  # torchaudio: one floor for the whole [B, F, T] batch
    assert shared[1].min() == pytest.approx(-60.0) and shared[1].max() == pytest.approx(-30.0)
    own = amplitude_to_db(batch, top_db=60.0, batch_max=False)
    assert own[1].min() == pytest.approx(-90.0)
    assert torch.equal(own[0], shared[0])
    assert torch.equal(amplitude_to_db(batch.unsqueeze(1), top_db=60.0)[:, 0], own)  # 4-D: per item, as torchaudio
    assert amplitude_to_db(torch.zeros(3, 3), top_db=None).max() == pytest.approx(-100.0)


def test_dasheng_filterbank_and_window_equal_the_checkpoint_buffers(shared_dir):
    from tympan.features.mel import mel_filterbank

    state = torch.load(shared_dir / "fixtures" / "dasheng-base" / "checkpoint.pt", weights_only=True)["model"]
    assert torch.equal(mel_filterbank(257, 0.0, 8000.0, 64, 16000), state["front_end.0.mel_scale.fb"])
    assert torch.equal(torch.hann_window(512), state["front_end.0.spectrogram.window"])


def test_module_wrappers_equal_functions():
    waveform = _signal(16000, 16000, batch=(2,))
    torch.testing.assert_close(KaldiFbank(16000, num_mel_bins=40)(waveform), kaldi_fbank(waveform, 16000, num_mel_bins=40))
    mel = MelSpectrogram(16000, n_fft=512, hop_length=160, n_mels=64, f_max=8000.0)
    torch.testing.assert_close(mel(waveform), mel_spectrogram(waveform, 16000, 512, 512, 160, 0.0, 8000.0, 64))
    ast = ASTFbank(target_length=128, mean=-6.6268077, std=5.358466)
    torch.testing.assert_close(ast(waveform), ast_fbank(waveform, target_length=128, mean=-6.6268077, std=5.358466))
    assert set(FRONTENDS) == {"kaldi-fbank", "ast-fbank", "dasheng-mel", "sat-mel", "ssam-mel"}
    for name in FRONTENDS:
        frontend = get_frontend(name)
        assert frontend.sample_rate == 16000 and frontend.num_frames(16000) > 0


def test_ast_pad_crop_and_normalisation():
    waveform = _signal(16000, 16000, batch=(2,))  # 98 frames
    raw = ast_fbank(waveform, normalize=False)
    assert raw.shape == (2, 98, 128)
    padded = ast_fbank(waveform, target_length=128)
    assert padded.shape == (2, 128, 128)
    torch.testing.assert_close(padded[:, 98:], torch.full((2, 30, 128), 4.2677393 / (2 * 4.5689974)))
    torch.testing.assert_close(padded[:, :98], (raw + 4.2677393) / (2 * 4.5689974))
    torch.testing.assert_close(ast_fbank(waveform, target_length=50), padded[:, :50])
    torch.testing.assert_close(pad_or_crop(torch.ones(2, 3), 5, dim=-1, value=7.0)[:, 3:], torch.full((2, 2), 7.0))
    # mean removal is per clip: shifting one clip by a constant leaves every clip's features unchanged
    shifted = waveform + torch.tensor([[0.3], [0.0]])
    torch.testing.assert_close(ast_fbank(shifted), ast_fbank(waveform), atol=2e-3, rtol=0)


def test_real_audio_esc10(data_dir):
    import soundfile as sf

    clips = sorted((data_dir / "esc10" / "audio").glob("*.flac"))[:4]
    audio = [sf.read(str(path), dtype="float32")[0][:80016] for path in clips]
    assert all(len(a) == 80016 for a in audio)
    waveform = torch.from_numpy(np.stack(audio))
    features = ast_fbank(waveform, normalize=False)
    assert features.shape == (4, 498, 128)
    assert torch.isfinite(features).all()
    assert -16.5 < features.min() and features.max() < 12.0 and -12.0 < features.mean() < 2.0
    normalised = ast_fbank(waveform, target_length=512)
    assert normalised.shape == (4, 512, 128) and -2.0 < normalised[:, :498].mean() < 2.0
    kaldi_reference = _knf_fbank(audio[0], 16000, window_type="hanning", num_mel_bins=80, htk_compat=True)
    ours = kaldi_fbank(waveform[0], 16000, window_type="hanning", num_mel_bins=80, htk_compat=True)
    np.testing.assert_allclose(ours.numpy(), kaldi_reference, atol=1e-3)
    db = DashengMel()(waveform)
    assert db.shape == (4, 64, 501) and db.max() - db.min() <= 120.0 + 1e-3
    ssam = SSAMLogMel()(waveform)
    assert ssam.shape == (4, 1, 501, 80)
    torch.testing.assert_close(ssam.mean(dim=(-2, -1)), torch.zeros(4, 1), atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    waveform = _signal(32000, 16000, batch=(3,))
    for name in ("ast-fbank", "dasheng-mel", "ssam-mel"):
        frontend = get_frontend(name)
        torch.testing.assert_close(frontend(waveform.cuda()).cpu(), frontend(waveform), atol=2e-3, rtol=1e-4)


def test_subtract_mean_centres_every_utterance():
    waveform = _signal(16000, 16000, batch=(2,))
    plain = kaldi_fbank(waveform, 16000, use_energy=True)
    centred = kaldi_fbank(waveform, 16000, use_energy=True, subtract_mean=True)
    torch.testing.assert_close(centred, plain - plain.mean(-2, keepdim=True))
