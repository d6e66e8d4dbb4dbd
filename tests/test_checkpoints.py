"""Registry, checkpoint reading/conversion/saving and downloads."""

import argparse
import io
import pickle
import pickletools
import os
import hashlib
import json
from pathlib import Path

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
from tympan.labels import LabelSet
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
        if entry.weights is not None:  # official files over https, or ours shipped in the package with a checksum
            assert entry.weights.url.startswith(("https://", "package://")), name
            if entry.weights.url.startswith("package://"):
                assert entry.weights.sha256 is not None and len(entry.weights.sha256) == 64, name


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


def _tiny_saved(tmp_path):
    model = tympan.create_model("ast-tiny224", input_tdim=128, num_classes=3, depth=1)
    return model, tympan.save(model, tmp_path / "tiny")


def test_labels_and_extra_travel_with_the_checkpoint(tmp_path):
    model = tympan.create_model("ast-tiny224", input_tdim=128, num_classes=3, depth=1)
    model.labels = LabelSet(("/m/a", "/m/b", "/m/c"), ("dog", "rain, heavy", 'say "hi"'))
    model.tympan_extra = {"clip_seconds": 1.28, "frontend": {"num_mel_bins": 128}}
    again = tympan.load(tympan.save(model, tmp_path / "tiny"))
    assert again.labels == model.labels
    assert again.tympan_extra == {"clip_seconds": 1.28, "frontend": {"num_mel_bins": 128}}


@pytest.mark.parametrize(
    "sidecar, expected",
    [
        ("{not json", "not a readable JSON sidecar"),
        ("[1, 2]", "must be a JSON object"),
        ('{"model_id": 7}', "'model_id' must be a str"),
        ('{"model_id": "ast-tiny224", "config": {"widht": 10}}', "unknown config key config.widht"),
        ('{"model_id": "ast-tiny224", "config": {"embed_dim": 1e9}}', "config.embed_dim must be an integer"),
        ('{"model_id": "ast-tiny224", "config": {"embed_dim": "big"}}', "config.embed_dim must be an integer"),
        ('{"model_id": "ast-tiny224", "config": {"embed_dim": 1000000000, "num_heads": 1}}', "must be in \\[0, "),
        ('{"model_id": "ast-tiny224", "config": {"embed_dim": 100000, "num_heads": 1}}', "weights \\(limit"),
        ('{"model_id": "ast-tiny224", "config": {"num_heads": 5}}', "does not build ast-tiny224"),
        ('{"model_id": "ast-tiny224", "config": {"depth": -3}}', "config.depth must be in"),
        ('{"model_id": "ast-tiny224", "labels": {"mids": ["a"], "names": []}}', "'labels' must hold"),
    ],
)
def test_a_hostile_sidecar_is_one_line_naming_it(tmp_path, sidecar, expected):
    """Invalid JSON, wrong types, unknown keys and absurd sizes in the sidecar: one error, nothing allocated."""
    _, path = _tiny_saved(tmp_path)
    sidecar_path(path).write_text(sidecar)
    with pytest.raises(CheckpointError, match=expected) as err:
        tympan.load(path)
    assert "tiny.json" in str(err.value) and "\n" not in str(err.value)


def test_packaged_weights_resolve_offline_and_check_the_checksum(tmp_path):
    """``package://`` weights come from the installed package, never the network, and only with a matching SHA-256."""
    csv = Path(tympan.__file__).parent / "assets" / "audioset_labels.csv"
    good = Weights(url="package://tympan/assets/audioset_labels.csv", sha256=hashlib.sha256(csv.read_bytes()).hexdigest())
    assert download(good, tmp_path / "never-used", progress=False) == csv
    assert not (tmp_path / "never-used").exists()
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        download(Weights(url=good.url, sha256="0" * 64), progress=False)
    with pytest.raises(CheckpointError, match="must carry a SHA-256"):
        download(Weights(url=good.url), progress=False)
    with pytest.raises(CheckpointError, match="missing from the installed package"):
        download(Weights(url="package://tympan/assets/nothing.safetensors", sha256="0" * 64), progress=False)


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


class _Exec:
    """Unpickles as a call of a builtin (``exec``/``eval``) on source text: code that runs while the file is read."""

    def __init__(self, builtin, marker):
        self.builtin, self.marker = builtin, marker

    def __reduce__(self):
        return (self.builtin, (f"open({str(self.marker)!r}, 'w').close()",))


def _pickle_records(data: bytes) -> list[bytes]:
    """Split a legacy torch file into its consecutive pickles; the raw storage bytes come last."""
    stream, records = io.BytesIO(data), []
    for _ in range(5):  # magic number, protocol version, system info, the object, storage keys
        start = stream.tell()
        for opcode, _arg, _pos in pickletools.genops(stream):
            if opcode.name == "STOP":
                break
        records.append(data[start : stream.tell()])
    records.append(data[stream.tell() :])
    return records


@pytest.mark.parametrize("builtin", [exec, eval])
@pytest.mark.parametrize("record", [0, 1, 2, 3, 4])
def test_legacy_format_records_never_run_code(tmp_path, builtin, record):
    """Every pickle of a legacy (non-zip) checkpoint, the header records too, resolves only the allow-list.

    A file whose record (magic number, protocol, system info, data or storage keys) calls ``exec``/``eval`` used to
    run that code through a plain ``pickle.load`` in the fallback loader; now nothing runs and the load either fails
    with one line naming the file or returns the tensors alone.
    """
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buffer, _use_new_zipfile_serialization=False)
    records = _pickle_records(buffer.getvalue())
    marker = tmp_path / "ran"
    payload = _Exec(builtin, marker)
    if record == 3:  # the data record: the hostile object sits beside the tensor
        state = {"w": torch.arange(4.0), "hook": payload}
        buffer = io.BytesIO()
        torch.save(state, buffer, _use_new_zipfile_serialization=False)
        records = _pickle_records(buffer.getvalue())
    else:
        records[record] = pickle.dumps(payload, protocol=2)
    path = tmp_path / "legacy.pth"
    path.write_bytes(b"".join(records))
    try:
        state, _ = read_checkpoint(path)
    except CheckpointError as err:
        assert "legacy.pth" in str(err)
    else:
        assert torch.equal(state["w"], torch.arange(4.0))
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        tympan.load("ast-tiny224", checkpoint=path)
    assert not marker.exists()


def test_a_78_byte_exec_file_runs_nothing(tmp_path):
    """The smallest hostile file: one pickle whose first record calls ``exec``; it is refused, nothing runs."""
    marker = tmp_path / "ran"
    path = tmp_path / "tiny.pth"
    path.write_bytes(pickle.dumps(_Exec(exec, marker), protocol=2))
    with pytest.raises(CheckpointError, match="tiny.pth"):
        read_checkpoint(path)
    assert not marker.exists()


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
