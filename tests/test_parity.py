"""Parity with the original implementations, one test per fixture folder of ``$TYMPAN_FIXTURES``."""

import pytest

from tests.parity import Fixture, fixture_dirs, fixtures_root, registered_checks

FIXTURES = fixture_dirs()


def test_fixture_root_present():
    assert FIXTURES, f"no fixture folders under {fixtures_root()} (set TYMPAN_FIXTURES)"


@pytest.mark.parametrize("folder", FIXTURES, ids=[p.name for p in FIXTURES])
def test_parity(folder):
    fixture = Fixture(folder)
    checks = registered_checks(fixture.kind)
    assert checks, f"{folder.name}: no parity checks for fixture kind {fixture.kind!r}"
    for check in checks:
        check(fixture)
    fixture.verify()


# ------------------------------------------------------------------------------------------ issue 14 item 12
def _variant(tmp_path, name: str, tensors: dict, meta_changes: dict):
    """A copy of fixture ``name`` with some tensors replaced and meta.json entries changed (same checkpoint)."""
    import json
    import shutil

    from safetensors.torch import save_file

    source = fixtures_root() / name
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(source / "checkpoint.pt", folder / "checkpoint.pt")
    meta = json.loads((source / "meta.json").read_text())
    meta.update(meta_changes)
    (folder / "meta.json").write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "io.safetensors"))
    return Fixture(folder)


def _run(fixture: Fixture) -> None:
    for check in registered_checks(fixture.kind):
        check(fixture)
    fixture.verify()


def test_dasheng_fixture_with_lengths_beside_the_main_input(tmp_path):
    """An ``x_length`` given with ``input`` is passed to the model (the model is right when given it)."""
    import torch

    from tests.parity.check_transformers import _load

    original = Fixture(fixtures_root() / "dasheng-base")
    x_length = torch.tensor([original["input"].shape[-1] // 2])
    with torch.no_grad():
        expected = _load(original, "dasheng-base")(original["input"], x_length)
    tensors = {k: original[k] for k in ("input", "mel_db", "mel")}
    fixture = _variant(tmp_path, "dasheng-base", {**tensors, "x_length": x_length, "output": expected}, {})
    _run(fixture)
    assert any(r.name == "output" for r in fixture.results)


def test_ssam_fixture_whose_input_is_another_chunk(tmp_path):
    """meta.json may say the model input is chunk 1 of the padded log-mel: the harness follows it."""
    import torch

    from tests.parity.check_ssm import load_fixture_model, ssam_config_from_state
    from tympan.features import SSAMLogMel, pad_or_crop
    from tympan.models.ssam import regroup_tokens

    original = Fixture(fixtures_root() / "ssam-tiny")
    waveform = original["waveform"][:1]  # one clip of 2 s: 201 frames, padded to chunks 0 and 1
    logmel = SSAMLogMel()(waveform)
    chunk = original["input"].shape[-2]
    chunk1 = pad_or_crop(logmel, 2 * chunk)[..., chunk:2 * chunk, :]
    model = load_fixture_model(original, ssam_config_from_state)
    with torch.no_grad():
        output = regroup_tokens(model.forward_tokens(chunk1)[:, 1:], *model.grid)
    calls = dict(original.meta["forward_calls"])
    calls["output"] = "model.forward_features(input) (input = chunk 1 of the zero-padded logmel, frames [200:400])"
    fixture = _variant(tmp_path, "ssam-tiny", {"waveform": waveform, "logmel": logmel, "input": chunk1,
                                                "output": output}, {"forward_calls": calls})  # fmt: skip
    assert fixture.chunk_index("input") == 1
    _run(fixture)
    assert {"input", "output"} <= {r.name for r in fixture.results}
