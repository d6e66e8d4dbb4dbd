"""Fuzzing every entry point with random files, configs and arrays: only tympan's own errors may come out.

CLI commands run through ``main(argv)`` (a traceback would propagate out of it and fail the test; the exit status
must follow the one rule: 0 all good, 1 some inputs skipped, 2 usage or fatal error). The library entry points
(``tympan.load`` on random bytes and sidecars, the audio loaders, the frontends, the recipe loader, record
selections) may raise :class:`tympan.errors.TympanError` (or the checkpoint/registry errors the CLI reports in one
line) and nothing else.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tympan
from tympan import audio
from tympan.checkpoints import CheckpointError
from tympan.cli import main
from tympan.data import Manifest, Record
from tympan.errors import TympanError
from tympan.features import FRONTENDS, get_frontend
from tympan.models.registry import UnknownModelError
from tympan.train.config import DEFAULTS, ConfigError, load_config, parse_config
from tympan.train.data import select_records

OWN_ERRORS = (TympanError, CheckpointError, UnknownModelError)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", "")


def _wav_bytes(seconds: float = 0.3, rate: int = 16000, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    samples = np.random.default_rng(0).uniform(-0.5, 0.5, (int(seconds * rate), channels)).astype(np.float32)
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


WAV = _wav_bytes()


@st.composite
def hostile_audio(draw) -> tuple[bytes, str]:
    """Random bytes, or a real WAV with its header fields rewritten / bytes flipped / cut short."""
    kind = draw(st.sampled_from(["random", "header", "flip", "truncate"]))
    suffix = draw(st.sampled_from(SUFFIXES))
    if kind == "random":
        return draw(st.binary(max_size=2000)), suffix
    data = bytearray(WAV)
    if kind == "header":  # rate, byte rate, channels, bits, data size
        field = draw(st.sampled_from([(24, "<I"), (28, "<I"), (22, "<H"), (34, "<H"), (40, "<I"), (4, "<I")]))
        limit = 2 ** (8 * struct.calcsize(field[1])) - 1
        data[field[0]: field[0] + struct.calcsize(field[1])] = struct.pack(field[1], draw(st.integers(0, limit)))
    elif kind == "flip":
        for offset, value in draw(st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1,
                                           max_size=6)):  # fmt: skip
            data[offset] = value
    else:
        data = data[: draw(st.integers(0, len(data) - 1))]
    return bytes(data), ".wav" if kind != "random" else suffix


def _write(folder: Path, data: bytes, suffix: str, name: str = "clip") -> Path:
    path = folder / f"{name}{suffix}"
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------ audio loaders
@FUZZ
@given(hostile_audio())
def test_audio_loaders_on_hostile_files(sample):
    data, suffix = sample
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), data, suffix)
        for call in (audio.info, audio.load, lambda p: sum(len(b) for b in audio.stream(p, block_seconds=0.5))):
            try:
                call(path)
            except audio.AudioError as err:
                assert "\n" not in str(err)


@FUZZ
@given(hnp.arrays(st.sampled_from([np.float32, np.float64, np.int16, np.int32, np.uint8, np.bool_, np.complex64]),
                  hnp.array_shapes(min_dims=0, max_dims=2, max_side=3000)),
       st.one_of(st.integers(-5, 10**7), st.floats(allow_nan=True, allow_infinity=True)))  # fmt: skip
def test_from_array_on_random_arrays(array, rate):
    try:
        out = audio.from_array(array, rate)
    except OWN_ERRORS:
        return
    assert out.dtype == np.float32 and np.isfinite(out).all()


# ------------------------------------------------------------------------------------------ frontends
@FUZZ
@given(st.sampled_from(sorted(FRONTENDS)),
       hnp.arrays(st.sampled_from([np.float32, np.float64, np.float16, np.int16, np.int32, np.int64, np.uint8, np.int8,
                                   np.bool_, np.complex64]),
                  hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=1200).filter(
                      lambda shape: int(np.prod(shape)) <= 200_000)))  # fmt: skip
def test_frontends_on_random_arrays(name, array):
    frontend = get_frontend(name)
    try:
        with torch.no_grad():
            out = frontend(torch.from_numpy(np.ascontiguousarray(array)))
    except OWN_ERRORS:
        return
    assert bool(torch.isfinite(out).all()), f"{name} gave non-finite features for finite input"


# ------------------------------------------------------------------------------------------ recipes
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                  st.text(max_size=10), st.binary(max_size=4))  # fmt: skip
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), st.text(max_size=10))
_tree = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.one_of(st.text(max_size=8), st.integers()),
                                                                    inner, max_size=4)), max_leaves=12)  # fmt: skip
_sections = st.dictionaries(st.sampled_from([*DEFAULTS, "bogus"]),
                            st.one_of(_tree, st.dictionaries(st.sampled_from(
                                [k for s in DEFAULTS.values() for k in s] + ["mn", "max", "min"]), _tree, max_size=4)),
                            max_size=5)  # fmt: skip


@FUZZ
@given(_sections)
def test_recipe_loader_on_random_dicts(recipe):
    recipe.setdefault("model", {"id": "ssast-tiny-frame"})
    try:
        config = parse_config(recipe)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert parse_config(config.to_dict()) == config


@FUZZ
@given(st.binary(max_size=600) | st.text(max_size=600).map(str.encode))
def test_recipe_files_of_random_bytes(data):
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), data, ".yaml", "recipe")
        try:
            load_config(path)
        except ConfigError as err:
            assert "\n" not in str(err)


@FUZZ
@given(st.one_of(_tree, st.dictionaries(st.sampled_from(["take", "fold", "speaker", "split", "nope"]),
                                        _tree | st.dictionaries(st.sampled_from(["min", "max", "mn"]), _leaf),
                                        max_size=3)))  # fmt: skip
def test_record_selection_on_random_conditions(selection):
    records = Manifest([Record(f"/x/{i}.wav", fold=i % 5, split="train", extra={"take": i, "speaker": "theo"})
                        for i in range(30)])  # fmt: skip
    try:
        kept = select_records(records, selection, "data.train")
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert 0 < len(kept) <= len(records)


# ------------------------------------------------------------------------------------------ checkpoints
@FUZZ
@given(st.binary(max_size=3000), st.sampled_from([".pt", ".safetensors", ".ckpt", ".bin", ""]))
def test_tympan_load_on_random_bytes(data, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), data, suffix, "weights")
        try:
            tympan.load("ssast-tiny-frame", checkpoint=path)
        except OWN_ERRORS:
            pass


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                 st.fixed_dictionaries({"model_id": st.sampled_from(["ssast-tiny-frame", "nope", 3]),
                                        "config": st.dictionaries(st.sampled_from(
                                            ["embed_dim", "depth", "num_heads", "input_tdim", "bogus"]),
                                            _json_leaf.filter(lambda v: not isinstance(v, int) or v < 4096), max_size=3)}).map(json.dumps)))  # fmt: skip
def test_tympan_load_on_hostile_sidecars(sidecar):
    with tempfile.TemporaryDirectory() as folder:
        model = tympan.create_model("ssast-tiny-frame", embed_dim=32, num_heads=2, depth=1)
        path = tympan.save(model, Path(folder) / "m.safetensors")
        path.with_suffix(".json").write_text(sidecar)
        try:
            tympan.load("ssast-tiny-frame", checkpoint=path)
            tympan.load(None, checkpoint=path) if "model_id" in sidecar else None
        except (*OWN_ERRORS, TypeError):  # load(None) without a model id in the sidecar: a usage error
            pass


# ------------------------------------------------------------------------------------------ CLI
def _cli(argv: list[str]) -> int:
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
        assert status == 2, status
    assert status in (0, 1, 2), status
    return status


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(hostile_audio(), min_size=1, max_size=3), st.sampled_from(sorted(FRONTENDS)),
       st.sampled_from(["npy", "safetensors"]))  # fmt: skip
def test_cli_features_on_hostile_files(files, frontend, fmt):
    with tempfile.TemporaryDirectory() as folder:
        paths = [_write(Path(folder), data, suffix, f"f{i}") for i, (data, suffix) in enumerate(files)]
        _cli(["features", *map(str, paths), "--frontend", frontend, "-o", str(Path(folder) / "out"), "--format", fmt])


@pytest.fixture(scope="module")
def sat_checkpoint() -> str:
    from tests.parity import fixtures_root

    return str(fixtures_root() / "sat-tiny-2s" / "checkpoint.pt")


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(files=st.lists(hostile_audio(), min_size=1, max_size=2),
       chunk=st.sampled_from([None, "0.5", "2", "-1", "0", "nan"]), fmt=st.sampled_from(["text", "json", "csv"]))
def test_cli_tag_on_hostile_files(sat_checkpoint, files, chunk, fmt):
    with tempfile.TemporaryDirectory() as folder:
        paths = [_write(Path(folder), data, suffix, f"t,{i}\"") for i, (data, suffix) in enumerate(files)]
        argv = ["tag", *map(str, paths), "--model", "sat-tiny-2s", "--checkpoint", sat_checkpoint, "--format", fmt]
        _cli(argv + (["--chunk", chunk] if chunk else []))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(_sections, st.lists(st.text(max_size=20), max_size=2))
def test_cli_train_on_random_recipes(recipe, overrides):
    import yaml

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        try:
            path.write_text(yaml.safe_dump(recipe))
        except yaml.YAMLError:
            assume(False)
        argv = ["train", str(path)]
        for item in overrides:
            argv += ["--set", item]
        assert _cli(argv + ["--set", f"output.dir={folder}/run", "--set", "train.max_steps=1"]) == 2


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=2000))
def test_cli_probe_on_random_bytes(data):
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), data, ".safetensors", "emb")
        assert _cli(["probe", str(path)]) == 2
