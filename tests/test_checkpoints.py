"""Registry, checkpoint reading/conversion/saving and downloads."""

import argparse
import os
import hashlib
import json

import pytest
import torch
from torch import nn

import tympan
from tympan.checkpoints import (
    CheckpointError,
    download,
    load_state_dict_strict,
    read_checkpoint,
    sidecar_path,
)
from tympan.models.registry import UnknownModelError, Weights, get_model_entry, list_models

from tests.parity import fixtures_root

AST_FIXTURE = fixtures_root() / "ast-base384-f10t10"


def _fixture_depth(state: dict) -> int:
    return len({k.split(".")[3] for k in state if k.startswith("module.v.blocks.")})


def test_registry_lists_every_family():
    names = list_models()
    for family_member in ("ast-base384", "ssast-tiny-patch", "dasheng-base", "sat-tiny-2s", "dass-small", "ssam-tiny"):
        assert family_member in names
    assert list_models("ast-*") == sorted(n for n in names if n.startswith("ast-"))
    assert all(get_model_entry(n).weights is not None for n in list_models(pretrained=True))


def test_unknown_model_suggests_close_ids():
    with pytest.raises(UnknownModelError, match="did you mean.*ast-base384"):
        tympan.create_model("ast-base38")


def test_every_registered_entry_has_a_source_and_description():
    for name in list_models():
        entry = get_model_entry(name)
        assert entry.description, name
        assert entry.sample_rate == 16000
        if entry.weights is not None:
            assert entry.weights.url.startswith("https://"), name


def test_official_dataparallel_checkpoint_loads_and_is_eval(tmp_path):
    state = torch.load(AST_FIXTURE / "checkpoint.pt", weights_only=True)
    model = tympan.load("ast-base384", checkpoint=AST_FIXTURE / "checkpoint.pt", depth=_fixture_depth(state))
    assert not model.training
    assert torch.equal(model.state_dict()["pos_embed"], state["module.v.pos_embed"])


@pytest.mark.parametrize("container", ["model", "state_dict"])
def test_wrapped_containers_load(tmp_path, container):
    state = torch.load(AST_FIXTURE / "checkpoint.pt", weights_only=True)
    path = tmp_path / "wrapped.pth"
    torch.save({container: {k.removeprefix("module."): v for k, v in state.items()}, "epoch": 3}, path)
    loaded, meta = read_checkpoint(path)
    assert set(loaded) == {k.removeprefix("module.") for k in state}
    assert meta["container"] == {"epoch": 3}
    model = tympan.load("ast-base384", checkpoint=path, depth=_fixture_depth(state))
    assert torch.equal(model.state_dict()["cls_token"], state["module.v.cls_token"])


def test_safetensors_round_trip(tmp_path):
    model = tympan.create_model("ast-tiny224", input_tdim=128, num_classes=7, depth=2)
    path = tympan.save(model, tmp_path / "tiny")
    assert path.suffix == ".safetensors" and sidecar_path(path).is_file()
    assert json.loads(sidecar_path(path).read_text())["model_id"] == "ast-tiny224"
    again = tympan.load(path)  # the sidecar names the model and its config
    x = torch.randn(2, 128, 128)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again(x))


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    model = tympan.create_model("ast-tiny224", input_tdim=128, depth=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.pop("blocks.1.mlp.fc2.bias")
    state["blocks.9.unknown.weight"] = torch.zeros(3)
    state["cls_token"] = torch.zeros(1, 1, 5)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(model, state, source="bad.pth")
    message = str(err.value)
    assert "bad.pth" in message and "\n" not in message
    for fragment in ("missing keys: blocks.1.mlp.fc2.bias", "unexpected keys: blocks.9.unknown.weight", "cls_token"):
        assert fragment in message


class _Payload:
    """Unpickling this would run a shell command: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_run(tmp_path):
    """Objects outside the weights-only allow-list become inert placeholders: the tensors load, nothing runs."""
    path, marker = tmp_path / "legacy.pth", tmp_path / "ran"
    torch.save({"model": {"w": torch.arange(3.0)}, "args": argparse.Namespace(lr=0.1, hook=_Payload(marker))}, path)
    state, meta = read_checkpoint(path)
    assert not marker.exists()
    assert list(state) == ["w"] and torch.equal(state["w"], torch.arange(3.0))
    assert meta["container"]["args"] == {}  # the Namespace, emptied


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_unreadable_checkpoint_is_one_clear_error(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.pt"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing.pt: no such"):
        read_checkpoint(tmp_path / "missing.pt")


def test_download_verifies_and_caches(tmp_path):
    source = tmp_path / "src" / "weights.pth"
    source.parent.mkdir()
    source.write_bytes(b"\x00" * 3000 + b"weights")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    weights = Weights(url=source.as_uri(), sha256=digest)
    first = download(weights, cache, progress=False)
    assert first.read_bytes() == source.read_bytes()
    source.unlink()  # a verified cached copy is reused without fetching
    assert download(weights, cache, progress=False) == first
    first.write_bytes(b"tampered")  # a cached file with the wrong checksum is fetched again: here that fails
    with pytest.raises(CheckpointError, match="download failed"):
        download(weights, cache, progress=False)


def test_download_rejects_a_wrong_checksum(tmp_path):
    source = tmp_path / "weights.pth"
    source.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        download(Weights(url=source.as_uri(), sha256="0" * 64), tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache").iterdir())  # no partial file is left behind


def test_strict_loading_of_a_plain_module():
    model = nn.Linear(3, 2)
    load_state_dict_strict(model, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    assert torch.equal(model.weight, torch.ones(2, 3))
