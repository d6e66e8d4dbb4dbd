"""Training checkpoints: everything a bit-exact resume needs, written atomically.

A checkpoint is one ``torch.save`` file holding the model and optimiser state (unsharded), the EMA, the counters
(epoch, the next batch of that epoch, optimiser steps), the best metric so far, and every rank's RNG states
(torch CPU and CUDA, numpy, Python), all as tensors and plain containers so that it loads with
``torch.load(weights_only=True)``. It is written to a temporary file in the same folder, flushed to disk and
renamed over the old one, so a process killed at any moment leaves either the old or the new checkpoint (its
temporary file is removed by the next save). A checkpoint that cannot be read is a one-line ResumeError.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tympan.errors import ResumeError
from tympan.files import atomic_write

__all__ = ["atomic_save", "capture_rng", "load_checkpoint", "restore_rng"]


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file + fsync + rename (:func:`tympan.files.atomic_write`):
    ordinary file mode, temporaries of crashed writers swept, a full disk is a one-line OutputError."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


REQUIRED = ("model", "optimizer", "trainer", "rng", "world_size")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint written by :func:`atomic_save`; a truncated, corrupt or foreign file is a
    :class:`~tympan.errors.ResumeError` with one line."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ResumeError(f"{path}: cannot resume, the checkpoint is truncated or corrupt ({reason}); delete it "
                          "to start the run over") from None  # fmt: skip
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED):
        raise ResumeError(f"{path}: not a tympan training checkpoint (needs {', '.join(REQUIRED)})")
    return state


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU/CUDA, numpy, Python) as tensors and ints."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},  # fmt: skip
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},  # fmt: skip
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
