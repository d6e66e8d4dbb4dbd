"""tympan: audio tagging and audio representation models under one roof.

>>> import tympan
>>> tympan.list_models("ast-*")            # registered ids
>>> model = tympan.load("ast-base384")     # official weights, eval mode
>>> tympan.hear.load_model("ast-base384")  # the HEAR API (imported on first use)
"""

from __future__ import annotations

import importlib
from typing import Any

from tympan.checkpoints import CheckpointError, load, save
from tympan.models.registry import create_model, get_model_entry, list_models

__version__ = "0.1.0"

_SUBMODULES = ("hear", "audio", "features", "models", "inference", "eval", "data", "train", "ops", "teachers", "labels")


def __getattr__(name: str) -> Any:
    """``tympan.hear`` (and the other subpackages) without an explicit import: loaded on first access."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tympan' has no attribute {name!r}")


__all__ = ["CheckpointError", "create_model", "get_model_entry", "list_models", "load", "save", "__version__"]
