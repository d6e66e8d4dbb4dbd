"""tympan: audio tagging and audio representation models under one roof.

>>> import tympan
>>> tympan.list_models("ast-*")            # registered ids
>>> model = tympan.load()                  # the shipped default model, offline, eval mode
>>> model = tympan.load("ast-base384")     # official weights (downloaded once), eval mode
>>> tympan.hear.load_model()               # the HEAR API (imported on first use)

Importing ``tympan`` alone imports nothing heavy (not even torch): the names below load on first use, so a command
can start reading a pipe before the models are imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "CheckpointError": "tympan.checkpoints",
    "load": "tympan.checkpoints",
    "save": "tympan.checkpoints",
    "create_model": "tympan.models.registry",
    "get_model_entry": "tympan.models.registry",
    "list_models": "tympan.models.registry",
    "DEFAULT_MODEL": "tympan.models.registry",
}
_SUBMODULES = ("hear", "audio", "features", "models", "inference", "eval", "data", "train", "ops", "teachers", "labels",
               "export", "checkpoints", "errors", "files")

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from tympan.checkpoints import CheckpointError, load, save
    from tympan.models.registry import DEFAULT_MODEL, create_model, get_model_entry, list_models


def __getattr__(name: str) -> Any:
    """Top-level names and subpackages (``tympan.hear``...) loaded on first access."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tympan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_SUBMODULES])


__all__ = ["CheckpointError", "DEFAULT_MODEL", "create_model", "get_model_entry", "list_models", "load", "save",
           "__version__"]
