"""Dasheng, the SAT repo's AudioTransformer and SAT: builds, shapes, gradients, long-input and masking semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tympan
from tympan.models import create_model, list_models
from tympan.models.audiotransformer import convert_official_checkpoint, frontend_buffers

TINY = dict(embed_dim=32, depth=2, num_heads=2)
IDS = list_models("dasheng-*") + list_models("audiotransformer-*") + list_models("sat-*")
# parameter counts of the originals (specs/dasheng.md, specs/sat.md)
PARAMS = {
    "dasheng-base": 85_447_808, "dasheng-0.6b": 630_333_568, "dasheng-1.2b": 1_134_047_360,
    "audiotransformer-tiny": 5_503_183, "audiotransformer-small": 21_623_311, "audiotransformer-base": 85_711_759,
    "sat-tiny-2s": 5_495_695, "sat-tiny-1s": 5_493_391, "sat-small-2s": 21_608_335, "sat-small-1s": 21_608_335,
    "sat-base-2s": 85_681_807, "sat-base-1s": 85_672_591,
}  # fmt: skip


def tiny(model_id: str, **overrides):
    torch.manual_seed(0)
    return create_model(model_id, **{**TINY, **overrides}).eval()


def test_ids_registered_with_official_weights():
    assert set(PARAMS) | {"dasheng-base-audioset"} == set(IDS)
    for model_id in IDS:
        entry = tympan.get_model_entry(model_id)
        assert entry.weights is not None and entry.weights.url.startswith("https://zenodo.org/")
        assert entry.input_kind == "waveform"


@pytest.mark.parametrize("model_id", sorted(PARAMS))
def test_full_size_parameter_counts(model_id):
    with torch.device("meta"):
        model = create_model(model_id)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[model_id]


@pytest.mark.parametrize("model_id", IDS)
def test_tiny_forward_shapes(model_id):
    model = tiny(model_id)
    wave = torch.randn(2, 32000 if model_id.startswith("sat-") else 16000) * 0.1
    with torch.no_grad():
        out = model(wave)
    if model_id.startswith("dasheng-") and not model.num_classes:
        assert out.shape == (2, 25, 32)  # ((16000 // 160 + 1) - 4) // 4 + 1 tokens at 40 ms
    else:
        probs = model.probabilities(out)  # forward gives logits; the originals' sigmoid is the protocol's
        assert out.shape == (2, 527) and bool(((probs > 0) & (probs < 1)).all())
    if model_id.startswith("sat-"):
        _, cache = model(wave, return_cache=True)
        assert model.cache_size == 4 * (model.cache_length // 16)
        assert cache.shape == (2, 2, model.cache_size, 32)


@pytest.mark.parametrize("model_id", ["dasheng-base", "audiotransformer-small", "sat-small-2s"])
def test_gradients_reach_every_parameter(model_id):
    model = tiny(model_id).train()
    wave = torch.randn(2, 32000) * 0.1
    if model_id.startswith("sat-"):
        _, cache = model(wave, return_cache=True)
        out = model(wave, cache=cache)
    elif model_id.startswith("dasheng-"):
        out = model(wave, x_length=torch.tensor([24000, 12000]))
    else:
        out = model(wave)
    out.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_dasheng_long_input_runs_independent_pieces():
    """Pieces of target_length // 4 patches, positions restarting, the last short piece unpadded."""
    model = tiny("dasheng-base", target_length=32)  # 8 patches per piece
    spec = torch.randn(2, 64, 80)  # 20 patches -> 8 + 8 + 4
    with torch.no_grad():
        whole = model.forward_features(spec)
        pieces = torch.cat([model.forward_features(spec[..., a:b]) for a, b in ((0, 32), (32, 64), (64, 80))], dim=1)
    assert whole.shape == (2, 20, 32)
    torch.testing.assert_close(whole, pieces, atol=1e-5, rtol=1e-5)


def test_dasheng_x_length_masks_keys_only():
    model = tiny("dasheng-base", target_length=32)
    spec = torch.randn(2, 64, 80)
    x_length = torch.tensor([80 * 160, 37 * 160])  # item 1: floor(5920 / 640) = 9 valid patches
    assert model.padding_mask(x_length, 20).sum(1).tolist() == [0, 11]
    with torch.no_grad():
        masked = model.forward_features(spec, x_length)
        changed = spec.clone()
        changed[1, :, 36:] = torch.randn(64, 44)  # content of masked patches (frames >= 36) only
        masked_changed = model.forward_features(changed, x_length)
        unmasked = model.forward_features(spec)
    torch.testing.assert_close(masked[0], unmasked[0])  # full length: no mask
    torch.testing.assert_close(masked[1, :9], masked_changed[1, :9])  # valid queries ignore masked keys
    assert not torch.allclose(masked[1, 9:16], masked_changed[1, 9:16])  # padded queries still computed
    # piece 2 and 3 of item 1 are fully masked: uniform attention, finite (not NaN as with -inf)
    assert torch.isfinite(masked).all()


def test_audiotransformer_long_input_split_pad_average():
    model = tiny("audiotransformer-tiny", target_length=64)  # 4 time patches, single pass up to 79 frames
    spec = torch.randn(1, 64, 150)  # 64 + 64 + 22 (zero-padded)
    with torch.no_grad():
        pieces = [spec[..., :64], spec[..., 64:128], F.pad(spec[..., 128:], (0, 42))]
        probs = lambda x: model.probabilities(model.forward_spectrogram(x))  # noqa: E731  (pieces average probabilities)
        expected = torch.stack([probs(p) for p in pieces]).mean(0)
        torch.testing.assert_close(probs(spec), expected, atol=1e-6, rtol=1e-5)
        # an exact multiple keeps its last piece (the original drops it: fixed on purpose)
        exact = spec[..., :128]
        expected = (probs(exact[..., :64]) + probs(exact[..., 64:])) / 2
        torch.testing.assert_close(probs(exact), expected, atol=1e-6, rtol=1e-5)


def test_sat_long_input_runs_pieces_sequentially():
    model = tiny("sat-tiny-2s")
    wave = torch.randn(1, 64000) * 0.1  # 401 frames -> 192 + 192 (+ 17 skipped)
    with torch.no_grad():
        logits, cache = model(wave, return_cache=True)
        spec = model.forward_to_spec(wave)
        l1, c1 = model.step_spectrogram(spec[..., :192])
        l2, c2 = model.step_spectrogram(spec[..., 192:384], c1)
    torch.testing.assert_close(model.probabilities(logits), (model.probabilities(l1) + model.probabilities(l2)) / 2)
    torch.testing.assert_close(cache, c2)


def test_sat_memory_and_initial_cache():
    model = tiny("sat-tiny-2s")
    cache = model.initial_cache(3)
    assert cache.shape == (2, 3, 48, 32)
    torch.testing.assert_close(cache[:, 0], cache[:, 2])
    # memory positions: time positions 12..23 on top of the frequency rows, frequency-major
    pos = model.memory_positions(48).view(4, 12, 32)
    torch.testing.assert_close(pos[1, 3], model.time_pos_embed[0, :, 0, 15] + model.freq_pos_embed[0, :, 1, 0])
    with pytest.raises(ValueError, match="cache must be"):
        model(torch.zeros(2, 32000), cache=cache)
    with pytest.raises(ValueError, match="too short"):
        model(torch.zeros(1, 1000))


def test_bad_inputs_raise_one_line_errors():
    model = tiny("dasheng-base")
    with pytest.raises(ValueError, match=r"\[B, samples\]"):
        model(torch.zeros(16000))
    with pytest.raises(ValueError, match="x_length"):
        model(torch.zeros(2, 16000), x_length=torch.tensor([16000]))


def _official_layout(model) -> dict[str, torch.Tensor]:
    """Our state dict written in the SAT repo's layout (to_q/to_kv, init_bn.1, front_end.0 buffers)."""
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            prefix, kind = key.rsplit(".qkv.", 1)
            d = value.shape[0] // 3
            state[f"{prefix}.to_q.{kind}"], state[f"{prefix}.to_kv.{kind}"] = value[:d], value[d:]
        elif key.startswith("init_bn."):
            state["init_bn.1." + key[len("init_bn."):]] = value
        elif not key.startswith("front_end."):
            state[key] = value
    for name, buf in frontend_buffers(model.front_end).items():
        state[f"front_end.0.{name}"] = buf
    return state


def test_converter_maps_official_layout_and_passes_ours():
    model = tiny("sat-small-2s")
    ours = model.state_dict()
    converted = convert_official_checkpoint(_official_layout(model), model)
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
    official = _official_layout(model)
    assert {"front_end.0.mel_scale.fb", "front_end.0.spectrogram.window"} <= set(official)
    official["front_end.0.mel_scale.fb"] = official["front_end.0.mel_scale.fb"] * 1.01
    with pytest.raises(ValueError, match="mel_scale.fb differs"):
        convert_official_checkpoint(official, model)
    again = convert_official_checkpoint(dict(ours), model)
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    # a 2 s checkpoint into a true 1 s model: time positions cut to 12, as the original load_state_dict
    short = tiny("sat-small-1s", target_length=96, cache_length=96)
    cut = convert_official_checkpoint(_official_layout(model), short)
    torch.testing.assert_close(cut["time_pos_embed"], ours["time_pos_embed"][..., :12])
    short.load_state_dict(cut)


def test_save_load_roundtrip(tmp_path):
    model = tiny("sat-tiny-1s")
    path = tympan.save(model, tmp_path / "sat")
    loaded = tympan.load(str(path))
    wave = torch.randn(1, 16000) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(loaded(wave), model(wave))
