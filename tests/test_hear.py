"""HEAR API contract for every registered model (tiny configs), SSAM against its fixture, and datafile embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tympan
from tympan.hear import HearModel, get_scene_embeddings, get_timestamp_embeddings, load_model, to_hear_grid
from tympan.models.registry import create_test_model

SR = 16000
DURATIONS = (0.5, 3.0, 11.0)


def tiny(model_id: str, **extra) -> torch.nn.Module:
    """The registry's tiny test model (short windows, so that 3 s / 11 s inputs exercise the windowing)."""
    torch.manual_seed(0)
    return create_test_model(model_id, **extra).eval()


def check_timestamps(timestamps: torch.Tensor, n: int, duration_ms: float) -> None:
    """hear-validator's timestamp rules, errors and warnings alike."""
    assert timestamps.dtype == torch.float32 and timestamps.shape[0] == n
    assert torch.equal(timestamps, timestamps[:1].expand_as(timestamps))
    ts = timestamps[0].double()
    if ts.numel() > 1:
        hops = ts.diff()
        hop = hops.mean().item()
        assert (hops - hop).abs().max() <= 1.0, "hops must be regular within 1 ms"
        assert 0 < hop <= 50.0 + 1e-3  # float32 timestamps of long clips round by ~1e-3 ms
        # timestamps are float32 (HEAR's dtype): compare at its rounding of millisecond values (~1e-3 ms)
        assert ts[0] <= hop + 1e-3, "first timestamp later than one hop"
        assert ts[-1] >= duration_ms - 2 * hop - 1e-3, "last timestamp earlier than two hops before the end"
    assert 0 <= ts[0] and ts[-1] <= duration_ms + 1e-3


@pytest.mark.parametrize("model_id", tympan.list_models())
def test_contract_every_model(model_id):
    model = HearModel(tiny(model_id))
    assert model.sample_rate == SR
    assert isinstance(model.scene_embedding_size, int) and isinstance(model.timestamp_embedding_size, int)
    generator = torch.Generator().manual_seed(1)
    for seconds in DURATIONS:
        audio = torch.rand(2, int(seconds * SR), generator=generator) * 0.2 - 0.1
        embeddings, timestamps = get_timestamp_embeddings(audio, model)
        assert embeddings.dtype == torch.float32 and torch.isfinite(embeddings).all()
        assert embeddings.shape == (2, timestamps.shape[1], model.timestamp_embedding_size)
        check_timestamps(timestamps, 2, seconds * 1000)
        if seconds == 3.0:  # the validator checks scene embeddings at one length
            scene = get_scene_embeddings(audio, model)
            assert scene.dtype == torch.float32 and scene.shape == (2, model.scene_embedding_size)
            assert torch.isfinite(scene).all()


@pytest.mark.parametrize("model_id", ["ast-base384", "ssast-tiny-frame", "dass-small", "dasheng-base", "sat-tiny-2s",
                                      "audiotransformer-tiny", "ssam-tiny"])  # fmt: skip
def test_clips_in_a_batch_are_independent(model_id):
    """Every clip gets its own frontend call (no batch-wide dB floor): a batch equals its clips run alone."""
    model = HearModel(tiny(model_id))
    audio = torch.randn(2, int(2.3 * SR), generator=torch.Generator().manual_seed(2)) * torch.tensor([[0.01], [0.3]])
    batch_emb, _ = model.timestamp_embeddings(audio)
    alone_emb, _ = model.timestamp_embeddings(audio[1:])
    torch.testing.assert_close(batch_emb[1:], alone_emb, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(model.scene_embeddings(audio)[1:], model.scene_embeddings(audio[1:]), atol=2e-5, rtol=1e-4)


def test_dass_scene_is_its_pooled_embedding():
    """DASS frames are the normalised map averaged over mel, so their mean is exactly the head's input."""
    model = tiny("dass-small")
    audio = torch.randn(1, 3 * SR) * 0.1
    from tympan.features import ast_fbank

    torch.testing.assert_close(HearModel(model).scene_embeddings(audio), model.pooled(ast_fbank(audio)))


def test_ast_single_window_matches_the_model():
    """A clip within one window: the scene embedding is the model's own pooled embedding of the padded fbank."""
    model = tiny("ast-base384")
    audio = torch.randn(1, 2 * SR) * 0.1
    from tympan.features import ast_fbank

    expected = model.pooled(ast_fbank(audio, target_length=model.input_tdim))
    torch.testing.assert_close(HearModel(model).scene_embeddings(audio), expected, atol=1e-5, rtol=1e-5)


def test_ssam_matches_the_original_wrapper(shared_dir):
    """SSAM through tympan.hear equals the fixture's RuntimeSSAST scene / timestamp embeddings and timestamps."""
    folder = shared_dir / "fixtures" / "ssam-tiny"
    from safetensors.torch import load_file

    io = load_file(str(folder / "io.safetensors"))
    tolerance = json.loads((folder / "meta.json").read_text())["suggested_tolerance"]
    model = load_model(str(folder / "checkpoint.pt"), model_id="ssam-tiny")
    scene = get_scene_embeddings(io["waveform"], model)
    embeddings, timestamps = get_timestamp_embeddings(io["waveform"], model)
    emb_tol = tolerance["output/tokens/patch_tokens/embeddings"]
    torch.testing.assert_close(scene, io["scene_embedding"], atol=emb_tol["atol"], rtol=emb_tol["rtol"])
    torch.testing.assert_close(embeddings, io["timestamp_embedding"], atol=emb_tol["atol"], rtol=emb_tol["rtol"])
    torch.testing.assert_close(timestamps, io["timestamps"], atol=tolerance["timestamps"]["atol"], rtol=0)
    check_timestamps(timestamps, 2, io["waveform"].shape[1] / SR * 1000)


@settings(max_examples=60, deadline=None)
@given(first=st.floats(0.0, 400.0), hop=st.floats(5.0, 400.0), frames=st.integers(1, 40), duration=st.floats(30.0, 20000.0))
def test_hear_grid_rules(first, hop, frames, duration):
    native = torch.randn(1, frames, 3, dtype=torch.float64)
    embeddings, timestamps = to_hear_grid(native, first, hop, duration)
    check_timestamps(timestamps, 1, duration)
    assert embeddings.shape == (1, timestamps.shape[1], 3)
    # values are convex combinations of neighbouring native frames: within the native range per channel
    assert (embeddings >= native.amin(1, keepdim=True).float() - 1e-5).all()
    assert (embeddings <= native.amax(1, keepdim=True).float() + 1e-5).all()


def test_hear_grid_keeps_native_frames_when_fine_enough():
    native = torch.randn(2, 10, 4)
    embeddings, timestamps = to_hear_grid(native, 15.0, 40.0, 400.0)
    assert torch.allclose(timestamps[0], 15.0 + 40.0 * torch.arange(10.0))
    torch.testing.assert_close(embeddings, native)


def test_bad_input_gives_one_line_errors():
    model = HearModel(tiny("dass-small"))
    with pytest.raises(ValueError, match=r"\[n_sounds, n_samples\]"):
        model.scene_embeddings(torch.zeros(16000))
    with pytest.raises(ValueError, match="shorter than one 25 ms frame"):
        model.scene_embeddings(torch.zeros(1, 100))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model("/nonexistent/model.pt", model_id="dass-small")


def test_load_model_from_a_saved_checkpoint_and_env_default(tmp_path, monkeypatch):
    model = tiny("dass-small")
    path = tympan.save(model, tmp_path / "tiny.safetensors")
    monkeypatch.setenv("TYMPAN_HEAR_MODEL", "dass-small")
    hear = load_model(str(path))
    assert hear.model_id == "dass-small" and hear.scene_embedding_size == 64
    audio = torch.randn(1, SR) * 0.1
    torch.testing.assert_close(hear.scene_embeddings(audio), HearModel(model).scene_embeddings(audio))


# --------------------------------------------------------------------------------------------- tympan.eval.embed
@pytest.fixture(scope="module")
def esc10_subset(data_dir, tmp_path_factory):
    """Ten ESC-10 clips plus one corrupt file, as a JSON datafile."""
    from tympan.data import Record, esc10_datafile, read_datafile, write_datafile

    out = tmp_path_factory.mktemp("esc10")
    records = list(read_datafile(esc10_datafile(data_dir, out).datafile))[::32]
    bad = out / "corrupt.wav"
    bad.write_bytes(b"not audio at all")
    records.insert(2, Record(wav=str(bad), labels=("/m/07rwj00",), fold=1))
    return write_datafile(records, out / "subset.json"), len(records) - 1


def test_embed_datafile_skips_bad_files_and_probe_reads_it(esc10_subset, tmp_path):
    from tympan.eval.embed import embed_datafile
    from tympan.eval.probe import load_embeddings

    datafile, good = esc10_subset
    model = HearModel(tiny("dass-small"))
    result = embed_datafile(model, datafile, tmp_path / "emb.safetensors", batch_size=4, save_every=3, progress=False)
    assert result.rows == good and len(result.skipped) == 1 and "corrupt.wav" in result.skipped[0][0]
    stored = load_embeddings(result.path)
    assert stored.embeddings.shape == (good, 64) and stored.embeddings.dtype == np.float32
    assert stored.info["model"] == "dass-small" and len(stored.info["folds"]) == good
    assert all(len(labels) == 1 for labels in stored.info["labels"])
    assert not (tmp_path / "emb.safetensors.partial.safetensors").exists()
    # the first row equals a direct call on the same clip
    from tympan import audio

    clip = torch.from_numpy(audio.load(stored.keys[0]))[None]
    np.testing.assert_allclose(stored.embeddings[0], model.scene_embeddings(clip)[0].numpy(), atol=1e-5)


def test_embed_resumes_from_partial_results(esc10_subset, tmp_path):
    from tympan.data import read_datafile, write_datafile
    from tympan.eval.embed import embed_datafile
    from tympan.eval.probe import load_embeddings

    datafile, good = esc10_subset
    model = HearModel(tiny("sat-tiny-2s"))
    output = tmp_path / "emb.safetensors"
    first_half = write_datafile(list(read_datafile(datafile))[:5], tmp_path / "half.json")
    embed_datafile(model, first_half, output, pooling="meanmax", clip_seconds=2.0, progress=False)
    output.rename(tmp_path / "emb.safetensors.partial.safetensors")  # as if a full run had stopped after 5 clips
    resumed = embed_datafile(model, datafile, output, pooling="meanmax", clip_seconds=2.0, progress=False)
    fresh = embed_datafile(model, datafile, tmp_path / "fresh.safetensors", pooling="meanmax", clip_seconds=2.0,
                           progress=False)  # fmt: skip
    assert resumed.reused == 4 + 0 and resumed.rows == fresh.rows == good  # 4 good clips + the corrupt one
    assert len(resumed.skipped) == 1
    a, b = load_embeddings(output), load_embeddings(fresh.path)
    assert a.keys == b.keys and a.embeddings.shape[1] == 2 * 16
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        embed_datafile(model, datafile, output, pooling="median", progress=False)


def test_embed_skips_a_clip_the_model_rejects(tmp_path, data_dir):
    """A clip shorter than one SAT patch is reported under `skipped`; the other clips are kept."""
    import soundfile as sf

    from tympan.eval.embed import embed_datafile
    from tympan.eval.probe import load_embeddings

    good = sorted((data_dir / "esc10" / "audio").glob("1-*.flac"))[:2]
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(800, dtype=np.float32) + 0.01, SR)  # 50 ms: less than one 16-frame patch
    datafile = tmp_path / "d.json"
    datafile.write_text(json.dumps({"data": [{"wav": str(p), "labels": "x"} for p in [good[0], short, good[1]]]}))
    model = HearModel(tiny("sat-tiny-2s"))
    result = embed_datafile(model, datafile, tmp_path / "e.safetensors", clip_seconds=None, progress=False)
    assert [path for path, _ in result.skipped] == [str(short)]
    assert load_embeddings(tmp_path / "e.safetensors").keys == [str(good[0]), str(good[1])]
