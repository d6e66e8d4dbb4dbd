"""tympan.files: atomic writes and deterministic safetensors files."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from tympan.errors import OutputError
from tympan.files import canonical_safetensors, write_safetensors


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_identical_tensors_and_metadata_give_identical_bytes(tmp_path):
    """The safetensors library orders metadata by a randomly seeded hash: with six entries two plain writes almost
    never agree. Ours always do, whatever order the metadata dict was built in, and read back unchanged."""
    tensors = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5, dtype=torch.float16), "i": torch.arange(3)}
    metadata = {name: f"value of {name}" for name in ("format", "model_id", "keys", "info", "z", "a")}
    blobs = set()
    for i in range(8):
        order = list(metadata.items())
        np.random.default_rng(i).shuffle(order)
        path = write_safetensors(tmp_path / f"{i}.safetensors", tensors, dict(order))
        blobs.add(path.read_bytes())
    assert len(blobs) == 1
    meta, read = _read(tmp_path / "0.safetensors")
    assert meta == metadata
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    arrays = {k: v.numpy() for k, v in tensors.items()}  # numpy arrays write the same file
    assert write_safetensors(tmp_path / "np.safetensors", arrays, metadata).read_bytes() == blobs.pop()


def test_write_safetensors_names_the_file_it_cannot_write(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="taken: is a folder"):
        write_safetensors(tmp_path / "taken", {"x": torch.zeros(1)})


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=40), max_size=6),
       st.lists(st.integers(0, 4), min_size=0, max_size=3))
def test_canonical_header_keeps_what_the_file_says(metadata, shape):
    """Any metadata (unicode included) and tensor shape: the canonical file reads back the same metadata and tensor,
    its header is a multiple of 8 bytes, and canonicalising it again changes nothing."""
    from safetensors.torch import save

    tensor = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    blob = canonical_safetensors(save({"t": tensor}, metadata=metadata or None))
    with tempfile.TemporaryDirectory() as folder:  # the file writer gives the same bytes
        assert write_safetensors(Path(folder) / "t.safetensors", {"t": tensor}, metadata).read_bytes() == blob
    (size,) = struct.unpack("<Q", blob[:8])
    assert size % 8 == 0 and canonical_safetensors(blob) == blob
    header = json.loads(blob[8:8 + size])
    assert list(header.get("__metadata__", {})) == sorted(metadata)
    from safetensors.torch import load

    assert torch.equal(load(blob)["t"], tensor)


def test_a_header_of_another_length_is_rewritten_with_the_data_behind_it(tmp_path):
    """A header whose canonical form is shorter (here: written with spaces, as other writers may) takes the slow
    path: the data is streamed behind the new header, and the file reads back the same."""
    from tympan.files import _canonicalise_file

    data = np.arange(6, dtype=np.float32).tobytes()
    header = b'{"__metadata__": {"z": "1", "a": "2"}, "t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}'
    header += b" " * (-len(header) % 8)
    path = tmp_path / "spaced.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    _canonicalise_file(str(path))
    blob = path.read_bytes()
    assert len(blob) < 8 + len(header) + len(data) and blob.endswith(data)
    meta, read = _read(path)
    assert meta == {"a": "2", "z": "1"} and torch.equal(read["t"], torch.arange(6.0).reshape(2, 3))
    assert list(json.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])["__metadata__"]) == ["a", "z"]
    assert not list(tmp_path.glob("*.canonical"))
