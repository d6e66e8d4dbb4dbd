"""Writing result files safely: atomic replacement with ordinary permissions, no temporary files left behind.

:func:`atomic_write` writes through a temporary file in the target's folder (named
``.{name}.tmp{pid}.{random}``), flushes it to disk and renames it over the target, so readers see the old or the
new file, never a torn one, and two writers never share a temporary file. The result gets the mode a plain
``open()`` would give (``0666 & ~umask``), not ``mkstemp``'s 0600. Temporary files of processes that died mid-write
are removed by the next write to the same target. A failing write (disk full, permission denied) raises
:class:`~tympan.errors.OutputError` with one line naming the file.

:func:`write_safetensors` is the one way tympan writes safetensors files: atomically, and byte for byte the same for
the same tensors and metadata (the safetensors library orders the metadata by a randomly seeded hash, so two
exports of identical weights had different bytes and SHA-256s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from tympan.errors import OutputError

__all__ = ["atomic_write", "cache_root", "canonical_safetensors", "sweep_stale_temporaries", "unique_names",
           "write_safetensors"]

_TMP = re.compile(r"\.tmp(\d+)(?:\.|$)")


def cache_root() -> Path:
    """tympan's cache folder (downloaded weights, unzipped ONNX models, built C kernels): ``$TYMPAN_CACHE`` (``~``
    expanded), else ``~/.cache/tympan``. An empty ``TYMPAN_CACHE`` counts as unset (not the current folder)."""
    value = os.environ.get("TYMPAN_CACHE", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "tympan"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove ``.{name}.tmp{pid}*`` files beside `path` whose process is gone; returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f".{path.name}.tmp*"):
        match = _TMP.search(candidate.name[len(path.name) + 1:])
        if match and not _alive(int(match.group(1))):
            try:
                candidate.unlink()
                removed.append(candidate)
            except OSError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int | None = None) -> Path:
    """Call ``write(tmp_path)`` then move the result to `path` atomically (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{path}: cannot create its folder ({err.strerror or err})") from None
    sweep_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp{os.getpid()}.")
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or err})") from None
    os.close(fd)
    try:
        try:
            write(tmp)
        except OSError:
            raise
        except Exception as err:  # writers wrap I/O failures in their own types (safetensors, matplotlib)
            if "error" not in str(err).lower() and not isinstance(err, RuntimeError):
                raise
            raise OSError(" ".join(str(err).split())) from None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def unique_names(paths: list[Path], suffix: str) -> list[str]:
    """Output file names for input `paths`: ``{stem}{suffix}`` when the stem is unique, else the path's parent
    folders and full name joined by ``__`` (``a__x.flac{suffix}``), numbered if still equal. Never two alike."""
    stems = [p.stem for p in paths]
    names = []
    for path, stem in zip(paths, stems):
        if stems.count(stem) == 1:
            names.append(f"{stem}{suffix}")
            continue
        parts = [part for part in Path(os.path.normpath(path)).parts if part not in ("/", "..", ".")]
        names.append("__".join(parts[-3:]).replace(os.sep, "_") + suffix)
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        if count:
            stem, dot, ext = name.partition(".")
            name = f"{stem}-{count + 1}{dot}{ext}"
        out.append(name)
    while len(set(out)) < len(out):  # a numbered name met an original one: number again
        out = [f"{i}-{name}" if out.count(name) > 1 else name for i, name in enumerate(out)]
    return out


def _canonical_header(header: bytes) -> bytes:
    """A safetensors JSON header with its ``__metadata__`` entries in sorted order, padded with spaces to a multiple
    of 8 bytes as the format asks (the tensors' entries stay as written: the library orders those deterministically,
    and their offsets are relative to the data, so the data is untouched)."""
    parsed = json.loads(header)
    if "__metadata__" in parsed:
        parsed = {"__metadata__": dict(sorted(parsed["__metadata__"].items())),
                  **{k: v for k, v in parsed.items() if k != "__metadata__"}}  # fmt: skip
    text = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (-len(text) % 8)


def canonical_safetensors(blob: bytes) -> bytes:
    """A serialized safetensors file (bytes) with its header made canonical (:func:`_canonical_header`)."""
    (size,) = struct.unpack("<Q", blob[:8])
    header = _canonical_header(blob[8 : 8 + size])
    return struct.pack("<Q", len(header)) + header + blob[8 + size :]


def _canonicalise_file(path: str) -> None:
    """:func:`canonical_safetensors` on a file, in place: the header is rewritten where it stands when its length is
    unchanged (the usual case: same entries, other order), else the data is streamed behind the new one."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = _canonical_header(f.read(size))
        if len(header) == size:
            f.seek(8)
            f.write(header)
            return
    with open(path, "rb") as src, open(path + ".canonical", "wb") as dst:
        dst.write(struct.pack("<Q", len(header)) + header)
        src.seek(8 + size)
        shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(path + ".canonical", path)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> Path:  # fmt: skip
    """Write `tensors` (all torch tensors or all numpy arrays) and string `metadata` to `path` as safetensors,
    atomically (:func:`atomic_write`) and deterministically (:func:`canonical_safetensors`), streamed to disk as the
    library writes it (no copy of the weights in memory)."""
    import numpy as np

    if tensors and all(isinstance(t, np.ndarray) for t in tensors.values()):
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file

    def write(tmp: str) -> None:
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata else None)
        _canonicalise_file(tmp)

    return atomic_write(path, write)
