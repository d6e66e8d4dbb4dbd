"""Model families over shared layers, and the registry that names them.

Every module in this package other than the shared ones (``registry``, ``protocol``, ``layers``, ``patching``) is a
model family; importing this package imports them all, which registers their model ids. Every family's models
implement :class:`~tympan.models.protocol.AudioModel`, the one surface the tools use.
"""

import importlib
import pkgutil

from tympan.models.protocol import AudioModel, Embeddings, audio_model
from tympan.models.registry import (
    DEFAULT_MODEL,
    ModelEntry,
    UnknownModelError,
    Weights,
    create_model,
    create_test_model,
    get_model_entry,
    list_models,
    register_model,
)

_SHARED = {"registry", "protocol", "layers", "patching"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DEFAULT_MODEL",
    "AudioModel",
    "Embeddings",
    "ModelEntry",
    "UnknownModelError",
    "Weights",
    "audio_model",
    "create_model",
    "create_test_model",
    "get_model_entry",
    "list_models",
    "register_model",
]
