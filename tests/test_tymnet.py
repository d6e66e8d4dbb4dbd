"""TymNet, the default model: its torch frontend equals YAMNet's numpy one, streaming equals whole-clip patches,
the protocol's shapes, and the shipped weights (offline, SHA-256 checked, sensible tags on real clips)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tympan import audio
from tympan.models import create_model
from tympan.models.protocol import AudioModel
from tympan.models.tymnet import LABELS_CSV, ChecksumError, TymNet, YAMNetLogMel, load_shipped
from tympan.teachers.yamnet import log_mel_patches, log_mel_spectrogram, pad_waveform

ASSETS = LABELS_CSV.parent
SHIPPED = ASSETS / "tymnet-s.json"


@pytest.fixture(scope="module")
def dog(data_dir) -> np.ndarray:
    return audio.load(data_dir / "esc10" / "audio" / "1-100032-A-0.flac")


@pytest.fixture(scope="module")
def small() -> TymNet:
    torch.manual_seed(0)
    return create_model("tymnet-s", channels=(8, 16, 16), strides=(2, 2), teacher_dim=32).eval()


@pytest.mark.parametrize("dft", ["fft", "matmul"])
def test_frontend_equals_yamnet_numpy(dog, dft):
    for waveform in (dog, dog[:9000], dog[:15601]):
        reference = log_mel_spectrogram(pad_waveform(waveform))
        ours = YAMNetLogMel(dft=dft)(torch.from_numpy(waveform)[None])[0].numpy()
        assert ours.shape == reference.shape
        np.testing.assert_allclose(ours, reference, atol=2e-4)
    patches = TymNet.patches(YAMNetLogMel()(torch.from_numpy(dog)[None]))[0].numpy()
    np.testing.assert_allclose(patches, log_mel_patches(dog)[:, 0], atol=2e-4)


def test_batched_frontend_equals_one_by_one(dog):
    frontend = YAMNetLogMel()
    batch = torch.from_numpy(np.stack([dog, dog[::-1].copy()]))
    together = frontend(batch)
    np.testing.assert_allclose(together[1].numpy(), frontend(batch[1:])[0].numpy(), atol=1e-5)


@torch.no_grad()
def test_streaming_equals_whole_clip_patches(small, dog):
    """Step k sees exactly patch k of the clip left-padded with 7,920 zeros (the initial state)."""
    x = torch.from_numpy(dog)
    chunks = len(dog) // small.chunk_samples
    state = small.init_state(1)
    assert isinstance(state, tuple) and state[0].shape == (1, 7920)
    streamed = []
    for k in range(chunks):
        logits, state = small.step(x[None, k * 7680 : (k + 1) * 7680], state)
        streamed.append(logits)
        assert state[0].shape == (1, 7920)  # bounded state
    padded = torch.cat([torch.zeros(7920), x[: chunks * 7680]])[None]
    whole = small.frame_logits(YAMNetLogMel(pad=False)(padded))[0]
    assert whole.shape[0] == chunks
    torch.testing.assert_close(torch.cat(streamed), whole, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="7680"):
        small.step(x[None, :100], state)


@torch.no_grad()
def test_protocol_outputs(small, dog):
    assert isinstance(small, AudioModel) and small.streaming and small.chunk_samples <= 8000  # a frame every 0.48 s
    features = small.frontend(torch.from_numpy(np.stack([dog, dog])))
    logits = small(features)
    frames = small.frame_logits(features)
    assert logits.shape == (2, 521) and frames.shape == (2, 10, 521)
    torch.testing.assert_close(torch.sigmoid(logits), torch.sigmoid(frames).mean(1), atol=1e-5, rtol=1e-4)
    emb = small.embed(features, windows_per_batch=1)
    assert emb.scene.shape == (2, 32) and emb.frames.shape == (2, 10, 32)
    torch.testing.assert_close(emb.scene, emb.frames.mean(1))
    assert emb.timestamps()[:2].tolist() == pytest.approx([0.4875, 0.9675])
    short = small(small.frontend(torch.zeros(1, 100)))  # shorter than one patch: padded to one
    assert short.shape == (1, 521)
    assert small.labels is not None and small.labels.mids[0] == "/m/09x0r" and small.labels.names[69] == "Dog"


def test_registered_default_config_size():
    model = create_model("tymnet-s")
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("projection"))
    assert backbone < 1_000_000  # the shipped model stays small (wheel size, CPU speed)
    assert model.describe()["streaming"] is True


# ------------------------------------------------------------------------------------------ shipped weights
shipped = pytest.mark.skipif(not SHIPPED.is_file(), reason="tymnet-s weights not shipped in tympan/assets")


@shipped
def test_shipped_weights_load_offline_and_checksum(tmp_path):
    sidecar = json.loads(SHIPPED.read_text())
    weights = ASSETS / sidecar["weights"]
    assert weights.stat().st_size < 20e6
    model = load_shipped()
    assert isinstance(model, TymNet) and not model.training
    copy = tmp_path / weights.name
    shutil.copy(weights, copy)
    shutil.copy(SHIPPED, copy.with_suffix(".json"))
    load_shipped(copy)  # an intact copy loads
    data = bytearray(copy.read_bytes())
    data[-5] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        load_shipped(copy)


@shipped
@torch.no_grad()
def test_shipped_model_tags_make_sense(data_dir):
    """The AudioSet group of the best class over clips of shared ESC-10 categories (dog, rooster: animal; rain:
    nature) and a spoken digit (speech)."""
    from tympan.data.corpus import GROUPS, class_groups

    model = load_shipped()
    groups = class_groups()
    cases = {"esc10/audio/1-100032-A-0.flac": "animal", "esc10/audio/1-26806-A-1.flac": "animal",
             "esc10/audio/1-17367-A-10.flac": "nature", "fsdd/recordings/0_george_5.wav": "speech"}  # fmt: skip
    for path, expected in cases.items():
        waveform = torch.from_numpy(audio.load(data_dir / path))[None]
        probs = torch.sigmoid(model.frame_logits(model.frontend(waveform)))[0].max(0).values
        probs[[494]] = 0  # Silence: the quiet gaps between barks
        top = int(probs.argmax())
        assert GROUPS[groups[top]] == expected, f"{path}: {model.labels.names[top]}"
