"""The model protocol over every registered id (tiny test configs): forward, backward, save -> load round trip,
and the protocol's shapes. Families are never named here: a new registry entry is covered as soon as it exists.

Other test modules (ONNX export, for instance) reuse :data:`MODEL_IDS` and :func:`tiny_model` to run over every id.
"""

from __future__ import annotations

import math

import pytest
import torch

import tympan
from tympan.models import list_models
from tympan.models.protocol import ACTIVATIONS, AudioModel, Embeddings, audio_model
from tympan.models.registry import create_test_model, get_model_entry

MODEL_IDS = list_models()  # every registered id; parametrise over this list to cover every family
BATCH = 2


def tiny_model(model_id: str, **overrides) -> AudioModel:
    """The registry's tiny test model of ``model_id``, seeded, in eval mode."""
    torch.manual_seed(0)
    return create_test_model(model_id, **overrides).eval()


def example_waveform(model: AudioModel, seed: int = 0) -> torch.Tensor:
    """``[BATCH, N]`` noise with a tone: one window (or a streaming chunk), 2 s for models that read any length."""
    samples = model.chunk_samples if model.streaming else (model.window_samples or 2 * model.sample_rate)
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / model.sample_rate
    return 0.1 * torch.randn(BATCH, samples, generator=generator) + 0.3 * torch.sin(2 * math.pi * 440.0 * t)


def _loss(model: AudioModel, features: torch.Tensor) -> torch.Tensor:
    """A scalar through the protocol: the head's logits for taggers, the embeddings for encoders."""
    if model.has_head:
        return model(features).float().pow(2).mean()
    embedded = model.embed(features)
    return embedded.scene.float().pow(2).mean() + embedded.frames.float().pow(2).mean()


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_registered_config_builds_within_the_size_limit(model_id):
    """`check_config` trusts the registered config as it is (no meta build at every load): here each one must build
    on the meta device within MAX_PARAMETERS (a changed config is built and checked at load: tests/test_config.py)."""
    from tympan.models.registry import check_builds

    check_builds(model_id, dict(get_model_entry(model_id).config))


def test_loading_a_registered_config_does_not_import_dynamo():
    """A meta build's first Python meta kernel imports torch._dynamo (~1.5 s of every `tympan tag` run): checking a
    registered config (what a shipped or official checkpoint's sidecar holds) must not."""
    import subprocess
    import sys

    code = ("import sys; from tympan.models import list_models; from tympan.models.registry import check_config; "
            "[check_config(m, {}) for m in list_models()]; print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_registry_entry_declares_the_protocol(model_id):
    entry = get_model_entry(model_id)
    model = tiny_model(model_id)
    assert isinstance(model, AudioModel) and audio_model(model) is model
    assert model.block_types == entry.block_types and model.block_modules(), "no declared blocks found"
    assert all(isinstance(block, entry.block_types) for block in model.block_modules())
    assert entry.input_shape and entry.input_shape[0] == 1, "input_shape is an example with batch 1"
    assert model.activation in ACTIVATIONS and model.sample_rate == entry.sample_rate
    assert model.embedding_size > 0 and model.frame_embedding_size > 0 and model.frame_hop_seconds > 0
    if model.has_head:
        assert entry.output == "logits" and model.classifier == entry.classifier is not None
        assert isinstance(model.classifier_module(), torch.nn.Module)
        assert len(model.labels) == model.num_classes
    else:
        assert model.classifier is None and model.labels is None
    facts = model.describe()
    assert facts["model_id"] == model_id and facts["num_classes"] == model.num_classes


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_forward_backward_and_shapes(model_id):
    entry = get_model_entry(model_id)
    model = tiny_model(model_id).train()
    waveform = example_waveform(model)
    features = model.frontend(waveform)
    assert features.shape[0] == BATCH and features.ndim == len(entry.input_shape)
    loss = _loss(model, features)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for b in model.block_modules() for p in b.parameters() if (g := p.grad) is not None)

    model.eval()
    with torch.no_grad():
        if model.has_head:
            logits = model(features)
            probs = model.probabilities(logits)
            assert logits.shape == (BATCH, model.num_classes) and torch.isfinite(logits).all()
            assert torch.allclose(model.predict(waveform), probs)
            if model.activation == "sigmoid":
                assert torch.allclose(probs, torch.sigmoid(logits)), "the activation is applied outside forward"
        embedded = model.embed_waveform(waveform)
    assert isinstance(embedded, Embeddings)
    assert embedded.scene.shape == (BATCH, model.embedding_size)
    frames = embedded.frames
    assert frames.ndim == 3 and frames.shape[0] == BATCH and frames.shape[2] == model.frame_embedding_size
    assert frames.shape[1] >= 1 and torch.isfinite(frames).all()
    times = embedded.timestamps()
    assert times.shape == (frames.shape[1],) and bool((times.diff() > 0).all())


@pytest.mark.parametrize("model_id", [m for m in MODEL_IDS if tiny_model(m).streaming])
def test_streaming_state_round(model_id):
    """``init_state`` / ``step``: the state keeps its shapes and matters (the same chunk after another one scores
    differently); an empty state (``warm=False``) steps too."""
    model = tiny_model(model_id)
    waveform = example_waveform(model)
    with torch.no_grad():
        state = model.init_state(BATCH)
        logits, after = model.step(waveform, state)
        assert logits.shape == (BATCH, model.num_classes)
        assert isinstance(after, tuple) and [s.shape for s in after] == [s.shape for s in state]
        again, _ = model.step(waveform, after)
        cold, _ = model.step(waveform, model.init_state(BATCH, warm=False))
    assert not torch.allclose(again, logits)
    assert cold.shape == logits.shape and torch.isfinite(cold).all()


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_save_load_round_trip_is_identical(model_id, tmp_path):
    model = tiny_model(model_id)
    with torch.no_grad():  # non-default weights, so that a freshly initialised model would not pass
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    again = tympan.load(tympan.save(model, tmp_path / "model.safetensors"))
    assert type(again) is type(model) and again.tympan_id == model_id
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and not any(k.split(".")[0] == "frontend" for k in mine)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    waveform = example_waveform(model, seed=1)
    with torch.no_grad():
        assert torch.equal(model.embed_waveform(waveform).scene, again.embed_waveform(waveform).scene)
        if model.has_head:
            assert torch.equal(model.predict(waveform), again.predict(waveform))


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_builds_on_the_meta_device_at_full_size(model_id):
    """Every registered config builds on the meta device (nothing allocated): checkpoint sidecars are size-checked
    this way before a model is built for real, and large models can be materialised shard by shard."""
    with torch.device("meta"):
        model = tympan.create_model(model_id)
    params = sum(p.numel() for p in model.parameters())
    assert params > 0 and all(p.is_meta for p in model.parameters())
