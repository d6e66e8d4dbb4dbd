"""DASS, SSAM and the Mamba mixer: builds, shapes at any length, gradients, converters and HEAR chunking."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tympan
from tests.parity import fixtures_root
from tympan.checkpoints import read_checkpoint
from tympan.models import dass as dass_module
from tympan.models.dass import convert_dass_checkpoint, cross_merge, cross_scan, dass_config_from_state
from tympan.models.mamba import MambaMixer
from tympan.models.ssam import hear_timestamps, regroup_tokens, ssam_config_from_state

TINY_DASS = dict(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), num_classes=5, drop_path_rate=0.1)
TINY_SSAM = dict(embed_dim=16, depth=2, d_state=4)
DASS_FIXTURE = fixtures_root() / "dass-small"
SSAM_FIXTURE = fixtures_root() / "ssam-tiny"


def esc10_clip(data_dir, seconds: float) -> torch.Tensor:
    """The first ESC-10 clip (16 kHz) from its first non-silent sample on, tiled or cut to ``seconds``."""
    path = sorted((data_dir / "esc10" / "audio").glob("*.flac"))[0]
    samples, rate = sf.read(path, dtype="float32")
    assert rate == 16000
    samples = samples[np.argmax(np.abs(samples) > 0.01):]  # digital silence makes the per-clip std 0
    n = int(round(seconds * rate))
    return torch.from_numpy(np.resize(samples, n))


# ------------------------------------------------------------------------------------------------ registry


@pytest.mark.parametrize(
    "name, trainable",
    [("dass-small", 29_884_463), ("dass-medium", 48_648_239), ("ssam-tiny", 4_710_912), ("ssam-small", 17_716_224),
     ("ssam-base", 68_610_048)],
)
def test_full_size_parameter_counts_match_the_originals(name, trainable):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = tympan.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == trainable


@pytest.mark.parametrize("name", ["dass-small", "dass-medium"])
def test_dass_ids_build_tiny_and_accept_any_length(name):
    model = tympan.create_model(name, **TINY_DASS).eval()
    for frames in (1, 5, 64, 203):
        fbank = torch.randn(2, frames, 128)
        with torch.no_grad():
            logits, features = model(fbank), model.forward_features(fbank)
        width = frames
        for _ in range(5):  # stem (2 strides) + 3 downsamplings, each ceil(n / 2)
            width = math.ceil(width / 2)
        assert logits.shape == (2, 5)
        assert features.shape == (2, 32, 4, width)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["ssam-tiny", "ssam-small", "ssam-base"])
def test_ssam_ids_build_tiny(name):
    model = tympan.create_model(name, **TINY_SSAM).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 1, 200, 80))
    assert out.shape == (3, 50, 5 * 16)


@pytest.mark.parametrize("seconds", [0.5, 5.0])
def test_dass_tags_real_audio_of_any_duration(data_dir, seconds):
    from tympan.features import get_frontend

    model = tympan.create_model("dass-small", **TINY_DASS).eval()
    fbank = get_frontend("ast-fbank")(esc10_clip(data_dir, seconds)[None])  # no target length: every frame
    with torch.no_grad():
        logits, embedding = model(fbank), model.pooled(fbank)
    assert fbank.shape == (1, 1 + (int(seconds * 16000) - 400) // 160, 128)
    assert logits.shape == (1, 5) and embedding.shape == (1, 32) and torch.isfinite(logits).all()


def test_bad_inputs_give_one_line_errors():
    dass = tympan.create_model("dass-small", **TINY_DASS)
    ssam = tympan.create_model("ssam-tiny", **TINY_SSAM)
    cases = (
        (dass, torch.randn(2, 10, 64)),  # 64 mel bins
        (ssam, torch.randn(2, 1, 150, 80)),  # not whole 200-frame chunks
        (ssam.forward_tokens, torch.randn(2, 1, 400, 80)),  # more than one chunk
        (ssam.scene_embeddings, torch.zeros(1, 2, 3)),  # not mono audio
    )
    for call, arg in cases:
        with pytest.raises(ValueError) as err:
            call(arg)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------- DASS properties


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9))
def test_cross_merge_undoes_cross_scan(height, width):
    x = torch.randn(2, 3, height, width)
    xs = cross_scan(x)
    assert torch.equal(xs[:, 0], x.flatten(2))
    assert torch.equal(xs[:, 1, :, : height], x[:, :, :, 0])  # column-major: down the first column first
    assert torch.equal(xs[:, 2], x.flatten(2).flip(-1))
    torch.testing.assert_close(cross_merge(xs, height, width), 4 * x)


def test_dass_batch_items_are_independent():
    model = tympan.create_model("dass-small", **TINY_DASS).eval()
    fbank = torch.randn(3, 40, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(fbank)[1:2], model(fbank[1:2]), atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 40), st.integers(1, 9))
def test_conv_columns_tiles_equal_the_whole_convolution(kernel, stride, width, tile):
    conv = torch.nn.Conv2d(3, 4, 2 * kernel - 1, stride=stride, padding=kernel - 1)
    x = torch.randn(2, 3, 5, width)
    whole = conv(x)
    with torch.no_grad():
        tiled = dass_module.map_columns(
            lambda lo, hi: dass_module.conv_columns(conv, lambda a, b: x[..., a:b], width, min(lo, hi), hi),
            dass_module.conv_width(conv, width), dass_module.TILE_POSITIONS // tile)
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=1e-6)


def test_dass_tiled_inference_matches_the_autograd_path():
    """Eval without grad runs long maps tile by tile (column tiles; per-direction scans): same numbers."""
    model = tympan.create_model("dass-small", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=5).eval()
    fbank = torch.randn(2, 1100, 128)  # stage 0: 2 x 32 x 275 positions, over TILE_POSITIONS
    assert 2 * 32 * 275 > dass_module.TILE_POSITIONS
    with torch.no_grad():
        tiled = model.forward_features(fbank)
    with torch.enable_grad():
        whole = model.forward_features(fbank)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tile_elements", [1, 3000])  # channel tiles of SCAN_TILE_CHANNELS, and of 3000 // L
def test_ss2d_scans_in_channel_tiles_like_the_grouped_scan(tile_elements):
    op = dass_module.SS2D(70, d_state=2).eval()
    u = torch.randn(2, 70, 5, 7)
    with torch.no_grad():
        tiled = op.mix(u, tile_elements=tile_elements)
    with torch.enable_grad():
        grouped = op.mix(u)
    torch.testing.assert_close(tiled, grouped, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- gradients


def assert_every_parameter_gets_gradient(model: torch.nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached: {missing}"


def test_gradients_reach_every_dass_parameter():
    model = tympan.create_model("dass-small", **{**TINY_DASS, "drop_path_rate": 0.0}).train()  # no random drops
    assert_every_parameter_gets_gradient(model, model(torch.randn(2, 37, 128)).square().mean())


def test_gradients_reach_every_ssam_parameter():
    model = tympan.create_model("ssam-tiny", **TINY_SSAM).train()
    assert_every_parameter_gets_gradient(model, model(torch.randn(2, 1, 200, 80)).square().mean())


def test_mamba_mixer_is_causal_and_differentiable():
    mixer = MambaMixer(12, d_state=3, d_conv=4, expand=2)
    x = torch.randn(2, 30, 12)
    y = mixer(x)
    changed = x.clone()
    changed[:, 20:] += 1.0
    torch.testing.assert_close(mixer(changed)[:, :20], y[:, :20])
    assert_every_parameter_gets_gradient(mixer, y.square().mean())


# --------------------------------------------------------------------------------------------- converters


def official_dass_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our DASS layout -> the release layout (``module.v.*`` with the original Sequential indices)."""
    renames = [
        (r"^patch_embed\.conv1\.", "patch_embed.0."), (r"^patch_embed\.norm1\.", "patch_embed.2."),
        (r"^patch_embed\.conv2\.", "patch_embed.5."), (r"^patch_embed\.norm2\.", "patch_embed.7."),
        (r"\.downsample\.conv\.", ".downsample.1."), (r"\.downsample\.norm\.", ".downsample.3."),
        (r"^norm\.", "classifier.norm."), (r"^head\.", "classifier.head."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        out["module.v." + key] = value
    return out


def hf_dass_keys(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release layout -> the transformers-DASS port's layout, as its converter renames (spec (c))."""
    out = {}
    for key, value in official.items():
        key = key.removeprefix("module.v.")
        if key.startswith("classifier.head."):
            out[key.removeprefix("classifier.")] = value
            continue
        key = key.replace("classifier.norm.", "norm.")
        for old, new in (("0", "0"), ("2", "1"), ("5", "3"), ("7", "4")):
            key = key.replace(f"patch_embed.{old}.", f"patch_embeddings.projection.{new}.")
        key = key.replace("downsample.1.", "downsample.down.").replace("downsample.3.", "downsample.norm.")
        if key.endswith("op.x_proj_weight"):
            key, value = key.replace("x_proj_weight", "x_proj.weight"), value.flatten(0, 1)
        elif key.endswith("op.dt_projs_weight"):
            key, value = key.replace("dt_projs_weight", "dt_projs.weight"), value.flatten(0, 1)
        out["dass." + key] = value
    return out


def test_dass_official_layout_round_trips_through_save(tmp_path):
    model = tympan.create_model("dass-small", **TINY_DASS).eval()
    official = tmp_path / "DASS_tiny.pth"
    torch.save(official_dass_keys(model.state_dict()), official)
    state, _ = read_checkpoint(official)
    assert dass_config_from_state(state) == dict(
        depths=[1, 2, 1, 1], dims=[8, 16, 24, 32], d_state=1, in_chans=1, num_classes=5
    )
    loaded = tympan.load("dass-small", official, **TINY_DASS)
    saved = tympan.save(loaded, tmp_path / "ours.safetensors")
    again = tympan.load(saved)
    assert convert_dass_checkpoint(model.state_dict()).keys() == model.state_dict().keys()
    fbank = torch.randn(1, 50, 128)
    with torch.no_grad():
        torch.testing.assert_close(again(fbank), model(fbank), atol=0, rtol=0)


@pytest.mark.skipif(not (DASS_FIXTURE / "checkpoint.pt").is_file(), reason="dass-small fixture not present")
def test_dass_hf_layout_loads_the_same_model(tmp_path):
    from safetensors.torch import load_file, save_file

    official, _ = read_checkpoint(DASS_FIXTURE / "checkpoint.pt")  # module. stripped -> v.*
    hf_path = tmp_path / "model.safetensors"
    hf_state = hf_dass_keys({"module." + k: v for k, v in official.items()})
    save_file({k: v.contiguous() for k, v in hf_state.items()}, hf_path)
    config = dass_config_from_state(official)
    a = tympan.load("dass-small", DASS_FIXTURE / "checkpoint.pt", **config)
    b = tympan.load("dass-small", hf_path, **config)
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key
    fbank = load_file(str(DASS_FIXTURE / "io.safetensors"))["input"][:1, :24]
    with torch.no_grad():
        torch.testing.assert_close(b(fbank), a(fbank), atol=0, rtol=0)


def test_dass_imagenet_stem_is_summed_over_rgb():
    model = tympan.create_model("dass-small", **TINY_DASS)
    state = official_dass_keys(model.state_dict())
    rgb = torch.randn(4, 3, 3, 3)
    state["module.v.patch_embed.0.weight"] = rgb
    converted = convert_dass_checkpoint({k.removeprefix("module."): v for k, v in state.items()}, model)
    torch.testing.assert_close(converted["patch_embed.conv1.weight"], rgb.sum(1, keepdim=True))


@pytest.mark.skipif(not (SSAM_FIXTURE / "checkpoint.pt").is_file(), reason="ssam-tiny fixture not present")
def test_ssam_official_container_round_trips_through_save(tmp_path):
    state, meta = read_checkpoint(SSAM_FIXTURE / "checkpoint.pt")
    assert "mask_token" in state and any(k.startswith("pred.") for k in state)
    model = tympan.load("ssam-tiny", SSAM_FIXTURE / "checkpoint.pt", **ssam_config_from_state(state))
    again = tympan.load(tympan.save(model, tmp_path / "ssam.safetensors"))
    expected = {k: v for k, v in state.items() if k != "mask_token" and not k.startswith("pred.")}
    assert again.state_dict().keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(again.state_dict()[key], value), key


# ------------------------------------------------------------------------------------- SSAM HEAR embeddings


def test_regrouping_quirk_is_literal():
    tokens = torch.arange(250.0).reshape(1, 250, 1).expand(1, 250, 2)
    out = regroup_tokens(tokens, grid_time=50, grid_freq=5)  # row j, slot k <- token k * 50 + j
    assert out.shape == (1, 50, 10)
    assert out[0, 7, 2 * 3].item() == 3 * 50 + 7


@pytest.mark.parametrize("frames", [1, 199, 200, 201, 401])
def test_hear_chunking_pads_and_trims_like_the_original(frames):
    model = tympan.create_model("ssam-tiny", **TINY_SSAM).eval()
    features = torch.randn(2, 1, frames, 80)
    with torch.no_grad():
        rows = model.encode_features(features, chunks_per_batch=1)
        pad = 200 - frames % 200
        chunks = torch.nn.functional.pad(features, (0, 0, 0, pad)).split(200, dim=2)
        expected = torch.cat([model.forward_features(c) for c in chunks], dim=1)
    keep = 50 * len(chunks) - int(50 * pad / 200)
    assert rows.shape == (2, keep, 80)
    torch.testing.assert_close(rows, expected[:, :keep], atol=1e-5, rtol=1e-5)


def test_hear_timestamps_formula():
    ts = hear_timestamps(32000, 51, 16000, batch=2)
    assert ts.shape == (2, 51) and ts.dtype == torch.float32
    torch.testing.assert_close(ts[1, 5], torch.tensor(5 * 2.0 / 51 * 1000))


@pytest.mark.parametrize("seconds", [0.3, 1.99, 2.0, 5.0])
def test_ssam_embeddings_of_real_audio_at_any_duration(data_dir, seconds):
    model = tympan.create_model("ssam-tiny", **TINY_SSAM).eval()
    clip = esc10_clip(data_dir, seconds)
    batch = torch.stack([clip, clip.flip(0)])
    with torch.no_grad():
        embeddings, timestamps = model.timestamp_embeddings(batch)
        scene = model.scene_embeddings(batch)
        single, _ = model.timestamp_embeddings(clip)
    frames = clip.shape[0] // 160 + 1
    pad = 200 - frames % 200
    rows = 50 * (frames + pad) // 200 - (50 * pad) // 200
    assert embeddings.shape == (2, rows, 80) and timestamps.shape == (2, rows) and scene.shape == (2, 80)
    torch.testing.assert_close(scene, embeddings.mean(1))
    torch.testing.assert_close(single[0], embeddings[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(embeddings).all()


def test_forward_features_on_several_chunks_concatenates_their_rows():
    model = tympan.create_model("ssam-tiny", **TINY_SSAM).eval()
    x = torch.randn(2, 1, 400, 80)
    with torch.no_grad():
        both = model.forward_features(x)
        torch.testing.assert_close(both, torch.cat([model(x[:, :, :200]), model(x[:, :, 200:])], dim=1))


class _ConfigLike(dict):  # stands for the ml_collections ConfigDict inside the official `args`
    pass


class _RunsCode:
    """Pickles as a call that would create a file when unpickled: what a malicious checkpoint could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_official_ssam_container_with_args_loads_without_running_its_pickles(tmp_path):
    import argparse

    model = tympan.create_model("ssam-tiny", **TINY_SSAM)
    official = {k: v for k, v in model.state_dict().items()}
    official.update(mask_token=torch.zeros(1, 1, 16), **{"pred.0.weight": torch.zeros(16, 16)})
    path = tmp_path / "checkpoint-99.pth"
    args = argparse.Namespace(config=_ConfigLike(model=dict(embed_dim=16)), precision="float16",
                              hook=_RunsCode(tmp_path / "ran"))  # fmt: skip
    torch.save({"model": official, "optimizer": {"state": {}}, "epoch": 99, "args": args}, path)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(path, weights_only=True)  # what plain weights-only loading says of it
    loaded = tympan.load("ssam-tiny", path, **TINY_SSAM)
    assert not (tmp_path / "ran").exists()  # the pickled callable was never called
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    state, meta = read_checkpoint(path)
    assert state.keys() == official.keys() and meta["container"]["epoch"] == 99
