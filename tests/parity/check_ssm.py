"""Parity of the state-space families with their reference fixtures: DASS, the Mamba mixer, SSAM.

Model sizes come from each fixture's checkpoint (depths, widths, state sizes), tolerances from its meta.json.
"""

from __future__ import annotations

import torch

import tympan
from tests.parity import Fixture, checks_for
from tympan.checkpoints import read_checkpoint
from tympan.models.dass import dass_config_from_state
from tympan.models.mamba import MambaMixer, mamba_config_from_state
from tympan.models.ssam import regroup_tokens, ssam_config_from_state

_FALLBACK = {"atol": 1e-4, "rtol": 1e-4}


def tolerance(fx: Fixture, name: str) -> dict[str, float]:
    """``{"atol", "rtol"}`` for tensor ``name`` from meta ``suggested_tolerance``.

    Reads the three layouts the fixtures use: per tensor (``{"output": {...}}``), grouped keys
    (``{"output/tokens/embeddings": {...}}``, where ``embeddings`` covers ``*_embedding``) and one flat pair.
    """
    table = fx.meta.get("suggested_tolerance", {})
    for key, value in table.items():
        if isinstance(value, dict) and any(
            part == name or name.endswith(part.rstrip("s")) for part in key.split("/")
        ):
            return {"atol": float(value["atol"]), "rtol": float(value.get("rtol", 0.0))}
    if "atol" in table:
        return {"atol": float(table["atol"]), "rtol": float(table.get("rtol", 0.0))}
    return dict(_FALLBACK)


def compare(fx: Fixture, name: str, actual: torch.Tensor) -> None:
    fx.compare(name, actual, **tolerance(fx, name))


def load_fixture_model(fx: Fixture, config_from_state) -> torch.nn.Module:
    """``tympan.load`` the fixture's checkpoint into a model sized from the checkpoint itself."""
    state, _ = read_checkpoint(fx.checkpoint)
    return tympan.load(fx.kind, fx.checkpoint, **config_from_state(state))


@checks_for("dass-small", "dass-medium")
def check_dass(fx: Fixture) -> None:
    model = load_fixture_model(fx, dass_config_from_state)
    with torch.no_grad():
        features = model.forward_features(fx["input"])
        embedding = model.pool(features)
        logits = model.head(embedding)
    for name, value in (("output", logits), ("embedding", embedding), ("feature_map", features)):
        if fx.has(name):
            compare(fx, name, value)


@checks_for("mamba-block")
def check_mamba_block(fx: Fixture) -> None:
    state, _ = read_checkpoint(fx.checkpoint)
    mixer = MambaMixer(**mamba_config_from_state(state))
    tympan.checkpoints.load_state_dict_strict(mixer, state, source=str(fx.checkpoint))
    with torch.no_grad():
        trace = mixer.eval().trace(fx["input"])._asdict()
    for name, value in trace.items():
        if fx.has(name):
            compare(fx, name, value)


@checks_for("ssam-tiny", "ssam-small", "ssam-base")
def check_ssam(fx: Fixture) -> None:
    model = load_fixture_model(fx, ssam_config_from_state)
    with torch.no_grad():
        if fx.has("input"):
            chunk = fx["input"]
            if fx.has("patch_tokens"):
                compare(fx, "patch_tokens", model.patch_embed(chunk))
            tokens = model.forward_tokens(chunk)
            if fx.has("tokens"):
                compare(fx, "tokens", tokens)
            if fx.has("output"):  # forward_features without a second encoder pass
                compare(fx, "output", regroup_tokens(tokens[:, 1:], *model.grid))
        wanted = [n for n in ("timestamp_embedding", "timestamps", "scene_embedding") if fx.has(n)]
        if fx.has("waveform") and wanted:
            embeddings, timestamps = model.timestamp_embeddings(fx["waveform"])
            for name, value in (
                ("timestamp_embedding", embeddings),
                ("timestamps", timestamps),
                ("scene_embedding", embeddings.mean(dim=1)),  # == scene_embeddings (tests/test_ssm_models.py)
            ):
                if fx.has(name):
                    compare(fx, name, value)
