"""tympan.audio: decoding, resampling, block streaming, saving, errors, the demo clip."""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import butter, sosfiltfilt
from scipy.signal import resample as fft_resample

from tympan import audio
from tympan.audio import AudioError

ESC_CLIP = "esc10/audio/1-100032-A-0.flac"  # dog bark, 16 kHz mono FLAC
FSDD_CLIPS = ["fsdd/recordings/3_jackson_5.wav", "fsdd/recordings/7_nicolas_20.wav", "fsdd/recordings/0_theo_9.wav"]
PCM16_STEP = 1 / 32768


def _noise(frames: int, channels: int = 1, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    """Frame-major noise as soundfile writes it: [frames] or [frames, channels]."""
    shape = (frames,) if channels == 1 else (frames, channels)
    return (np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * scale).clip(-1, 1)


def _tone(seconds: float = 2.0, rate: int = 16000, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t) * np.hanning(len(t))).astype(np.float32)


# ------------------------------------------------------------------------------------------- real files
def test_esc10_flac_at_native_rate_is_decoded_unchanged(data_dir):
    path = data_dir / ESC_CLIP
    samples = audio.load(path)
    raw, rate = sf.read(path, dtype="float32")
    assert rate == 16000 and samples.dtype == np.float32 and samples.shape == raw.shape
    np.testing.assert_array_equal(samples, raw)
    assert np.abs(samples).max() <= 1.0
    assert audio.load(path, sample_rate=None).shape == raw.shape


def test_info_reads_the_header(data_dir):
    meta = audio.info(data_dir / ESC_CLIP)
    assert (meta.sample_rate, meta.channels, meta.format, meta.subtype) == (16000, 1, "FLAC", "PCM_16")
    assert meta.frames == 80016 and meta.duration == pytest.approx(5.001)
    fsdd = audio.info(data_dir / FSDD_CLIPS[0])
    assert (fsdd.sample_rate, fsdd.format, fsdd.frames) == (8000, "WAV", 3607)


@pytest.mark.parametrize("clip", FSDD_CLIPS)
def test_fsdd_8k_is_resampled_to_16k_like_an_ideal_resampler(data_dir, clip):
    path = data_dir / clip
    raw, rate = sf.read(path, dtype="float64")
    assert rate == 8000
    for quality in ("HQ", "VHQ"):
        samples = audio.load(path, quality=quality)
        assert samples.dtype == np.float32 and abs(len(samples) - 2 * len(raw)) <= 1
        # Reference: band-limited (FFT) resampling. soxr's anti-alias filter rolls off just below 4 kHz, so
        # compare below 3.4 kHz, away from the (periodic) FFT reference's wrap-around at the edges.
        # Measured on 54 FSDD files: relative RMS error <= 1.3e-3 for HQ and VHQ.
        reference = fft_resample(raw, 2 * len(raw))
        lowpass = butter(10, 3400, fs=16000, output="sos")
        ours = sosfiltfilt(lowpass, samples[: len(reference)].astype(np.float64))[200:-200]
        ref = sosfiltfilt(lowpass, reference[: len(samples)])[200:-200]
        assert np.sqrt(np.mean((ours - ref) ** 2) / np.mean(ref**2)) < 5e-3


def test_quality_presets_differ_slightly_and_are_validated(data_dir):
    path = data_dir / FSDD_CLIPS[0]
    hq, vhq = audio.load(path, quality="HQ"), audio.load(path, quality="VHQ")
    assert hq.shape == vhq.shape and 0 < np.abs(hq - vhq).max() < 0.05
    with pytest.raises(ValueError, match="quality"):
        audio.load(path, quality="best")
    with pytest.raises(ValueError, match="sample_rate"):
        audio.load(path, sample_rate=-16000)


# --------------------------------------------------------------------------------- channels and formats
def test_stereo_is_averaged_to_mono_and_kept_with_mono_false(tmp_path):
    left, right = _tone(1.0, 44100, 440.0), _tone(1.0, 44100, 1000.0)
    path = audio.save(tmp_path / "stereo.wav", np.stack([left, right]), 44100, subtype="FLOAT")
    both = audio.load(path, sample_rate=None, mono=False)
    assert both.shape == (2, 44100) and both.flags.c_contiguous
    np.testing.assert_array_equal(both, np.stack([left, right]))
    np.testing.assert_allclose(audio.load(path, sample_rate=None), (left + right) / 2, atol=1e-7)
    resampled = audio.load(path, mono=False)
    assert resampled.shape == (2, 16000)
    np.testing.assert_allclose(audio.load(path), resampled.mean(axis=0), atol=1e-6)


@pytest.mark.parametrize("suffix, min_snr_db", [(".wav", 80), (".flac", 80), (".ogg", 30), (".mp3", 30)])
def test_round_trip_through_each_format(tmp_path, suffix, min_snr_db):
    fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}[suffix]
    if fmt not in audio.readable_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} has no {fmt}")
    signal = _tone()
    path = audio.save(tmp_path / f"tone{suffix}", signal)
    meta = audio.info(path)
    assert (meta.format, meta.sample_rate, meta.channels) == (fmt, 16000, 1)
    decoded = audio.load(path)
    assert len(decoded) == len(signal)  # libsndfile removes the codec delay/padding of Vorbis and MP3
    snr = 10 * np.log10(np.sum(signal**2) / np.sum((decoded - signal) ** 2))
    assert snr > min_snr_db
    if fmt in ("WAV", "FLAC"):
        np.testing.assert_allclose(decoded, signal, atol=PCM16_STEP)


# ------------------------------------------------------------------------------------------- bad input
def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, expected reason) for every kind of bad input."""
    good = audio.save(tmp / "good.flac", _tone(1.0))
    cases: dict[str, tuple[Path, str]] = {
        "missing": (tmp / "missing.wav", "file not found"),
        "directory": (tmp, "directory"),
        "empty": (tmp / "empty.wav", "empty file"),
        "garbage": (tmp / "garbage.wav", "corrupt or undecodable WAV"),
        "unsupported": (tmp / "clip.m4a", "unsupported or unrecognised audio format '.m4a'"),
        "truncated": (tmp / "truncated.flac", "corrupt or undecodable FLAC"),
        "no_samples": (tmp / "header_only.wav", "no audio samples"),
        "nan": (tmp / "nan.wav", "non-finite samples"),
        "inf": (tmp / "inf.wav", "non-finite samples"),
    }
    cases["empty"][0].write_bytes(b"")
    junk = b"not audio, just text. " * 200  # (random bytes may look like an MP3 frame to libmpg123)
    cases["garbage"][0].write_bytes(junk)
    cases["unsupported"][0].write_bytes(junk)
    cases["truncated"][0].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    sf.write(cases["no_samples"][0], np.zeros(0, np.float32), 16000)
    for name, value in (("nan", np.nan), ("inf", -np.inf)):
        samples = _tone(1.0)
        samples[12345] = value
        sf.write(cases[name][0], samples, 16000, subtype="FLOAT")  # soundfile itself: our save refuses NaN
    return cases


def test_every_bad_input_raises_one_line_audio_error_naming_the_file(tmp_path):
    for name, (path, reason) in _bad_files(tmp_path).items():
        readers = {"load": audio.load, "stream": lambda p: list(audio.stream(p, block_seconds=0.25))}
        if name not in ("nan", "inf", "truncated"):  # bad samples are only found when decoding
            readers["info"] = audio.info
        for reader_name, read in readers.items():
            with pytest.raises(AudioError) as caught:
                read(path)
            message = str(caught.value)
            assert message.startswith(f"{path}: "), (name, reader_name, message)
            assert reason in message and "\n" not in message, (name, reader_name, message)
            assert isinstance(caught.value, ValueError)
            error = caught.value  # no soundfile/soxr exception chained behind ours
            assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert "12345" not in str(pytest.raises(AudioError, audio.load, tmp_path / "nan.wav").value)
    assert "0.772 s" in str(pytest.raises(AudioError, audio.load, tmp_path / "nan.wav").value)  # 12345 / 16000


def test_save_rejects_bad_targets_and_samples(tmp_path):
    cases = [
        (tmp_path / "clip.xyz", _tone(0.1), None, "cannot write format '.xyz'"),
        (tmp_path / "no" / "such" / "dir.wav", _tone(0.1), None, "does not exist"),
        (tmp_path / "nan.wav", np.full(100, np.nan, np.float32), None, "non-finite samples"),
        (tmp_path / "empty.wav", np.zeros(0, np.float32), None, "non-empty samples"),
        (tmp_path / "cube.wav", np.zeros((2, 2, 2), np.float32), None, "non-empty samples"),
        (tmp_path / "float.flac", _tone(0.1), "FLOAT", "cannot write FLAC with subtype 'FLOAT'"),
    ]
    for path, samples, subtype, reason in cases:
        with pytest.raises(AudioError, match="^" + re.escape(f"{path}: ")) as caught:
            audio.save(path, samples, subtype=subtype)
        assert reason in str(caught.value) and caught.value.__cause__ is None
    with pytest.raises(ValueError, match="sample_rate"):
        audio.save(tmp_path / "rate.wav", _tone(0.1), sample_rate=16000.5)


# ---------------------------------------------------------------------------------------- in-memory audio
def test_from_array_takes_tensors_integers_and_channels_first(data_dir):
    reference = audio.load(data_dir / FSDD_CLIPS[0])
    pcm, rate = sf.read(data_dir / FSDD_CLIPS[0], dtype="int16")
    np.testing.assert_array_equal(audio.from_array(pcm, rate), reference)  # int16 scaled like soundfile
    np.testing.assert_array_equal(audio.from_array(torch.from_numpy(pcm.astype(np.float32) / 32768), rate), reference)
    stereo = np.stack([pcm, pcm]).astype(np.float32) / 32768
    np.testing.assert_array_equal(audio.from_array(stereo, rate), reference)
    assert audio.from_array(stereo, rate, mono=False).shape == (2, len(reference))
    assert audio.from_array(stereo, rate, target_rate=None, mono=False).shape == stereo.shape
    for bad, reason in [(np.zeros(0), "non-empty"), (np.zeros((1, 2, 3)), "non-empty"), (np.full(9, np.inf), "non-finite")]:
        with pytest.raises(AudioError, match=f"^<array>: .*{reason}"):
            audio.from_array(bad, 16000)


@settings(max_examples=60, deadline=None)
@given(
    rate_in=st.sampled_from([8000, 11025, 16000, 22050, 32000, 44100, 48000]) | st.integers(1000, 96000),
    rate_out=st.sampled_from([8000, 16000, 22050, 32000, 44100]) | st.integers(1000, 96000),
    frames=st.integers(1, 6000),
    channels=st.integers(1, 2),
)
def test_resampled_length_follows_the_rate_ratio(rate_in, rate_out, frames, channels):
    samples = _noise(frames, channels).T  # channels-first
    out = audio.resample(samples, rate_in, rate_out)
    assert out.dtype == np.float32 and out.shape[:-1] == samples.shape[:-1]
    assert abs(out.shape[-1] - round(frames * rate_out / rate_in)) <= 1


# -------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize(
    "rate, channels, sample_rate, mono, quality",
    [(44100, 2, 16000, True, "HQ"), (44100, 2, 16000, False, "VHQ"), (8000, 1, 16000, True, "HQ"),
     (22050, 3, None, False, "HQ"), (16000, 1, 16000, True, "HQ")],
)  # fmt: skip
def test_stream_blocks_concatenate_to_load(tmp_path, rate, channels, sample_rate, mono, quality):
    path = tmp_path / "noise.flac"
    sf.write(path, _noise(int(rate * 23.7) + 11, channels), rate)
    whole = audio.load(path, sample_rate, mono, quality)
    reader = audio.stream(path, block_seconds=1.7, sample_rate=sample_rate, mono=mono, quality=quality)
    blocks = list(reader)
    sizes = [b.shape[-1] for b in blocks]
    assert all(size == reader.block_frames for size in sizes[:-1]) and 0 < sizes[-1] <= reader.block_frames
    assert reader.block_frames == round(1.7 * (sample_rate or rate))
    assert all(b.dtype == np.float32 and b.shape[:-1] == whole.shape[:-1] for b in blocks)
    # One soxr.ResampleStream across blocks gives exactly soxr.resample of the whole file: measured error 0.
    np.testing.assert_array_equal(np.concatenate(blocks, axis=-1), whole)
    np.testing.assert_array_equal(np.concatenate(list(reader), axis=-1), whole)  # re-iterable


def test_stream_of_a_20_minute_file_uses_bounded_memory(tmp_path):
    rate, minutes, block_seconds = 22050, 20, 5.0
    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_16") as out:
        for seed in range(minutes * 2):
            out.write(_noise(rate * 30, seed=seed))
    decoded_bytes = rate * 60 * minutes * 4  # float32 at the file's rate: 106 MB

    tracemalloc.start()
    try:
        total = 0
        for block in audio.stream(path, block_seconds=block_seconds):
            total += block.shape[-1]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == round(rate * 60 * minutes * 16000 / rate)
    assert peak < decoded_bytes / 20, f"peak {peak / 1e6:.1f} MB"  # measured 2.5 MB


def test_stream_opens_the_file_once_for_header_and_first_pass(tmp_path, monkeypatch):
    """Tagging many short files pays per open: the reader checks the header and reads the first pass through one
    handle, opens again only to read again, and ``close`` releases a handle never read."""
    path = tmp_path / "noise.flac"
    sf.write(path, _noise(40_000, 1), 16000)
    opened = []
    real = sf.SoundFile.__init__

    def counting(self, *args, **kwargs):
        opened.append(args[0] if args else kwargs.get("file"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "__init__", counting)
    reader = audio.stream(path, block_seconds=1.0)
    first = np.concatenate(list(reader))
    assert len(opened) == 1 and reader.info.frames == 40_000
    np.testing.assert_array_equal(np.concatenate(list(reader)), first)
    assert len(opened) == 2
    with audio.stream(path) as unread:
        handle = unread._handle
    assert handle is not None and handle.closed and len(opened) == 3


def test_stream_validates_arguments(data_dir):
    with pytest.raises(ValueError, match="block_seconds"):
        audio.stream(data_dir / ESC_CLIP, block_seconds=0)
    with pytest.raises(AudioError, match="file not found"):
        audio.stream(data_dir / "nope.flac")  # header checked at construction, not at first block


# ---------------------------------------------------------------------------------------------- demo clip
def test_demo_clip_is_shipped_small_and_attributed():
    path = audio.demo_path()
    meta = audio.info(path)
    assert (meta.sample_rate, meta.channels, meta.format) == (16000, 1, "FLAC")
    assert 1.0 < meta.duration <= 5.0 and path.stat().st_size < 150_000
    samples = audio.load(path)
    assert 0.5 < np.abs(samples).max() <= 1.0
    attribution = (path.parent / "DEMO_AUDIO.md").read_text()
    assert "CC BY-SA 4.0" in attribution and "26eb9aaf76e81b692f806f9140c2d2777410d7a1" in attribution
