"""YAMNet ONNX teacher on real ESC-10 clips: frontend geometry, shapes, batching, sensible top classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tympan import audio  # noqa: E402
from tympan.teachers.onnx import extract_model  # noqa: E402
from tympan.teachers.yamnet import YAMNet, log_mel_patches, mel_weight_matrix, pad_waveform  # noqa: E402

CLIPS = {"dog": "1-100032-A-0.flac", "rooster": "1-26806-A-1.flac", "rain": "1-17367-A-10.flac"}


@pytest.fixture(scope="module")
def yamnet(shared_dir, tmp_path_factory) -> YAMNet:
    zipped = shared_dir / "teachers" / "yamnet" / "YamNet_w8a8.onnx.zip"
    if not zipped.is_file():
        pytest.skip(f"{zipped} not found")
    return YAMNet(zipped, num_threads=2, batch_size=4, cache=tmp_path_factory.mktemp("onnx_cache"))


@pytest.fixture(scope="module")
def clips(data_dir) -> dict[str, np.ndarray]:
    return {name: audio.load(data_dir / "esc10" / "audio" / f) for name, f in CLIPS.items()}


def test_padding_and_patch_count():
    assert len(pad_waveform(np.zeros(80000))) == 84720  # 5 s -> 10 patches
    assert len(pad_waveform(np.zeros(100))) == 15600
    assert len(pad_waveform(np.zeros(15601))) == 15600 + 7680
    assert log_mel_patches(np.zeros(80000, np.float32)).shape == (10, 1, 96, 64)


def test_patch_i_sees_exactly_its_samples(clips):
    """Patch i covers samples [7680 i, 7680 i + 15600): framing, no centring, no padding in between."""
    wave = clips["rain"]
    patches = log_mel_patches(wave)
    for i in (0, 3, 9):
        alone = log_mel_patches(wave[7680 * i : 7680 * i + 15600])
        assert alone.shape == (1, 1, 96, 64)
        np.testing.assert_allclose(alone[0], patches[i], atol=1e-6)


def test_mel_matrix_is_tf_style():
    weights = mel_weight_matrix()
    assert weights.shape == (257, 64) and (weights[0] == 0).all() and weights.max() <= 1
    hz = np.linspace(0, 8000, 257)
    assert hz[weights[:, 0] > 0].min() > 125 and hz[weights[:, -1] > 0].max() < 7500
    assert (weights.sum(1)[(hz > 200) & (hz < 7000)] > 0).all()  # the triangles tile the band


def test_frames_and_clip_shapes(yamnet, clips):
    scores, embeddings = yamnet.frames(clips["dog"])
    assert scores.shape == (10, 521) and embeddings.shape == (10, 1024)
    assert scores.dtype == np.float32 and embeddings.dtype == np.float32
    assert ((scores > 0) & (scores < 1)).all() and (embeddings >= 0).all()  # sigmoid; post-ReLU average
    clip_scores, clip_embedding = yamnet.clip(clips["dog"])
    np.testing.assert_allclose(clip_scores, scores.mean(0), rtol=1e-6)
    np.testing.assert_allclose(clip_embedding, embeddings.mean(0), rtol=1e-6)
    np.testing.assert_allclose(yamnet.clip(clips["dog"], pooling="max")[0], scores.max(0))
    assert len(yamnet.labels) == 521 and yamnet.labels.names[0] == "Speech"
    np.testing.assert_allclose(yamnet.timestamps(3), [0.4875, 0.9675, 1.4475])


def test_batched_equals_one_by_one(yamnet, clips):
    waves = [clips["dog"], clips["rain"][:40000], clips["rooster"]]  # different lengths, batch_size 4 < 24 patches
    scores, embeddings = yamnet.clip(waves)
    assert scores.shape == (3, 521) and embeddings.shape == (3, 1024)
    for i, wave in enumerate(waves):
        one_scores, one_embedding = yamnet.clip(wave)
        np.testing.assert_array_equal(scores[i], one_scores)
        np.testing.assert_array_equal(embeddings[i], one_embedding)
    teacher = yamnet(torch.from_numpy(np.stack([clips["dog"][:80000], clips["rooster"][:80000]])))
    assert isinstance(teacher, torch.Tensor) and teacher.shape == (2, 521)


def test_top_classes_make_sense(yamnet, clips):
    def top(name: str, k: int = 5) -> set[str]:
        return {label for label, _ in yamnet.top_classes(yamnet.clip(clips[name])[0], k)}

    # short barks: mean pooling ranks Silence first (peers.md), yet the dog classes follow
    assert top("dog") & {"Dog", "Animal", "Domestic animals, pets"}
    assert top("rooster") & {"Chicken, rooster", "Fowl", "Animal"}
    assert "Rain" in top("rain", 3)


def test_errors_are_one_line(yamnet, tmp_path):
    with pytest.raises(ValueError, match="mono float waveform"):
        yamnet.frames(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        yamnet.frames(np.full(16000, np.nan, np.float32))
    with pytest.raises(FileNotFoundError, match="not found"):
        extract_model(tmp_path / "missing.onnx.zip")


def test_last_map_is_exposed_and_pools_to_the_embedding(yamnet, clips, tmp_path):
    """With ``embedding_output=FEATURE_MAP_TENSOR`` the teacher gives its last map ``[1024, 3, 2]`` per patch (the
    per-position distillation target): the same scores, and the map's mean is the embedding up to the graph's
    re-quantisation of the pooled vector."""
    from tympan.teachers.yamnet import FEATURE_MAP_SHAPE, FEATURE_MAP_TENSOR

    zipped = yamnet.path
    mapped = YAMNet(zipped, num_threads=1, batch_size=4, embedding_output=FEATURE_MAP_TENSOR)
    assert mapped.embedding_size == 1024 * 3 * 2
    patches = np.concatenate([log_mel_patches(w) for w in clips.values()])
    scores, embeddings = yamnet.run(patches)
    map_scores, maps = mapped.run(patches)
    np.testing.assert_array_equal(map_scores, scores)
    maps = maps.reshape(-1, *FEATURE_MAP_SHAPE)
    assert (maps >= 0).all() and maps.std(axis=(-2, -1)).mean() > 0.01  # ReLU outputs that differ by position
    pooled = maps.mean((-2, -1))
    cosine = (pooled * embeddings).sum(1) / np.linalg.norm(pooled, axis=1) / np.linalg.norm(embeddings, axis=1)
    assert cosine.min() > 0.999
    with pytest.raises(ValueError, match="embedding_output"):
        YAMNet(zipped, embedding_output="/model/layer3/missing")
