"""Issue 15: hostile inputs built inside the tests get one-line tympan errors, and 1 rank == N ranks."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import soundfile as sf
import torch

from tympan import audio
from tympan.data import Mixup, NoiseRoll, SpecAugment
from tympan.data.augment import AddNoise, RandomGain, SampleGenerators
from tympan.errors import InputError, TympanError
from tympan.features import FRONTENDS, get_frontend


# ------------------------------------------------------------------------------ point 3: sample-keyed randomness
def _augment_all(x: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor, gens: SampleGenerators):
    x = RandomGain(-6, 6)(x, generator=gens)
    x = AddNoise((10, 30))(x, lengths, generator=gens)
    x, target = Mixup(10.0, 0.5)(x, target, lengths, generator=gens)
    feats = x.unfold(-1, 64, 32)  # [B, T, F] stand-in for a frontend
    feats = SpecAugment(12, 8)(feats, generator=gens)
    return NoiseRoll()(feats, generator=gens), target


@pytest.mark.parametrize("ranks", [2, 4])
def test_sample_keyed_augmentation_does_not_depend_on_the_split(ranks):
    batch = 8
    x, target = torch.randn(batch, 1600), torch.eye(batch)
    lengths = torch.full((batch,), 1600)
    whole = _augment_all(x, target, lengths, SampleGenerators.keyed(0, 3, range(batch)))
    local = batch // ranks
    pieces = [_augment_all(x[r * local:(r + 1) * local], target[r * local:(r + 1) * local],
                           lengths[r * local:(r + 1) * local],
                           SampleGenerators.keyed(0, 3, range(r * local, (r + 1) * local))) for r in range(ranks)]
    torch.testing.assert_close(torch.cat([p[0] for p in pieces]), whole[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([p[1] for p in pieces]), whole[1], rtol=0, atol=1e-6)
    other_epoch = _augment_all(x, target, lengths, SampleGenerators.keyed(0, 4, range(batch)))
    assert not torch.equal(other_epoch[0], whole[0])


def test_sample_generators_must_match_the_batch():
    with pytest.raises(ValueError, match="sample generators"):
        SpecAugment(4, 4)(torch.zeros(3, 10, 8), generator=SampleGenerators.keyed(0, 0, range(2)))


# ------------------------------------------------------------------------------ point 5: absurd rates, bounded work
def _wav(path, samples: np.ndarray, rate: int = 16000):
    sf.write(path, samples, rate, subtype="PCM_16")
    return path


def _set_rate(path, rate: int) -> None:
    data = bytearray(path.read_bytes())
    data[24:28], data[28:32] = struct.pack("<I", rate), struct.pack("<I", rate * 2)
    path.write_bytes(bytes(data))


def test_a_header_claiming_1_hz_is_refused_before_any_work(tmp_path):
    path = _wav(tmp_path / "one_hz.wav", np.zeros(20000, np.float32))  # 40 KB
    _set_rate(path, 1)
    for call in (audio.load, audio.info, audio.stream):
        with pytest.raises(audio.AudioError, match="implausible sample rate in the header 1 Hz"):
            call(path)
    with pytest.raises(audio.AudioError, match="implausible sample_rate"):
        audio.from_array(np.zeros(100, np.float32), 1)


def test_streaming_upsampling_reads_no_more_than_a_block_needs(tmp_path):
    path = _wav(tmp_path / "low.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 30000).astype(np.float32))
    _set_rate(path, 1000)  # the lowest accepted rate: 16x upsampling
    reader = audio.stream(path, block_seconds=0.1)
    reads = [len(p) for p in reader._decoded()]
    assert max(reads) == 100  # one 0.1 s output block's worth; a 4096-frame read would resample 65,536 at once
    assert sum(len(b) for b in reader) == len(audio.load(path)) == 480000


# ------------------------------------------------------------------------------ point 6: silent wrong inputs
@pytest.mark.parametrize("name", sorted(FRONTENDS))
def test_frontends_scale_integer_pcm_and_refuse_bad_arrays(name):
    frontend = get_frontend(name)
    x = torch.from_numpy(np.random.default_rng(1).uniform(-0.5, 0.5, (1, 8000)).astype(np.float32))
    pcm = (x * 32768).round().to(torch.int16)
    reference = frontend(pcm.float() / 32768)
    torch.testing.assert_close(frontend(pcm), reference)  # was +20.8 log units / +90 dB
    for bad in (torch.full((1, 8000), float("nan")), torch.full((2, 8000), float("inf")), torch.zeros(0, 8000),
                torch.zeros(1, 0), torch.zeros(8000, dtype=torch.bool), torch.zeros(1, 10)):  # fmt: skip
        with pytest.raises(InputError):
            frontend(bad)


def test_a_truncated_wav_is_refused_not_half_read(tmp_path):
    full = _wav(tmp_path / "full.wav", np.zeros(32000, np.float32))
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(audio.AudioError, match="truncated WAV: the header promises 2.00 s"):
        audio.load(truncated)
    with pytest.raises(audio.AudioError, match="truncated"):
        list(audio.stream(truncated))
    assert len(audio.load(full)) == 32000


def test_audio_errors_are_tympan_errors():
    assert issubclass(audio.AudioError, TympanError) and issubclass(audio.AudioError, ValueError)


# ------------------------------------------------------------------------------ points 4 and 7: files and resume
def _tiny_model():
    import tympan

    return tympan.create_model("ssast-tiny-frame", embed_dim=32, num_heads=2, depth=1, fshape=64, tshape=4,
                               fstride=64, tstride=4, input_fdim=64, input_tdim=40, num_classes=3)  # fmt: skip


def test_saved_files_get_the_umask_mode_and_crashed_temporaries_are_swept(tmp_path):
    import os

    import tympan
    from tympan.train.checkpointing import atomic_save

    path = tympan.save(_tiny_model(), tmp_path / "m.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # mkstemp's 0600 before
    dead = tmp_path / ".checkpoint.pt.tmp4194999"  # a pid above any pid_max: its writer is gone
    dead.write_bytes(b"half a checkpoint")
    atomic_save({"x": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    assert not dead.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "m.json",
                                                                               "m.safetensors"]  # fmt: skip


def test_a_full_disk_during_save_is_one_line(tmp_path):
    import subprocess
    import sys

    script = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))   # writes past 4 KB fail like a full disk
import tympan
from tests.test_reliability import _tiny_model
from tympan.errors import OutputError
try:
    tympan.save(_tiny_model(), {str(tmp_path / 'big.safetensors')!r})
except OutputError as err:
    print("OutputError", err)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # fmt: skip
    assert result.stdout.startswith("OutputError") and "big.safetensors" in result.stdout, result.stderr[-2000:]
    assert len(result.stdout.strip().splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resume_problems_are_one_line(tmp_path, data_dir, capsys):
    from tests.test_train import toy_config
    from tympan.cli import main
    from tympan.train import Trainer, load_config

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        Trainer(load_config(None, toy_config(data_dir, out, **{"train.epochs": 1, "train.max_steps": 1}))).fit()
    finally:
        torch.set_num_threads(threads)
    recipe = out / "config.yaml"
    assert main(["train", str(recipe), "--set", "model.overrides.depth=2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "belongs to a run of model" in err and len(err.strip().splitlines()) == 1
    assert main(["train", str(recipe), "--set", "optim.lr=0.01", "--resume"]) == 0
    assert "warning: optim.lr changed since the checkpoint" in capsys.readouterr().err
    checkpoint = out / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "world_size": 2}, checkpoint)  # as if written by a 2-process run
    assert main(["train", str(recipe), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "written by 2 processes" in err and len(err.strip().splitlines()) == 1
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    assert main(["train", str(recipe), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_embed_writes_through_a_temporary_of_its_own_and_reads_only_the_clip(tmp_path):
    from tympan.eval.embed import _load_clip, _save_atomic
    from tympan.eval.probe import load_embeddings

    shared = tmp_path / "e.safetensors.tmp"  # the one name every embed run used to write through
    shared.write_bytes(b"another run's half-written file")
    _save_atomic(tmp_path / "e.safetensors", np.ones((2, 3), np.float32), ["a", "b"], {"x": 1})
    assert shared.read_bytes() == b"another run's half-written file"
    assert load_embeddings(tmp_path / "e.safetensors").embeddings.shape == (2, 3)
    long = _wav(tmp_path / "long.wav", np.random.default_rng(2).uniform(-0.5, 0.5, 16000 * 40).astype(np.float32))
    np.testing.assert_array_equal(_load_clip(str(long), 16000 * 3), audio.load(long)[: 16000 * 3])
    assert len(_load_clip(str(long), 16000 * 50)) == 16000 * 50  # zero-padded past the end


def test_cache_root_is_one_rule_and_an_empty_variable_is_unset(tmp_path, monkeypatch):
    """Weights, unzipped ONNX models and built kernels share one cache root. `export TYMPAN_CACHE=` (empty) used to
    make the kernels land in ./kernels of whatever folder a command ran in; now it means the default."""
    from pathlib import Path

    from tympan.checkpoints import cache_dir
    from tympan.files import cache_root
    from tympan.ops import native

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for value in ("", "  "):
        monkeypatch.setenv("TYMPAN_CACHE", value)
        assert cache_root() == tmp_path / "home" / ".cache" / "tympan" == cache_dir()
        assert native.cache_dir() == cache_root() / "kernels"
    monkeypatch.setenv("TYMPAN_CACHE", "~/elsewhere")
    assert cache_root() == Path(tmp_path / "home" / "elsewhere") == cache_dir()
    monkeypatch.delenv("TYMPAN_CACHE")
    assert native.cache_dir() == tmp_path / "home" / ".cache" / "tympan" / "kernels"
