"""Model families over shared layers, and the registry that names them.

Every module in this package other than ``registry`` and ``layers`` is a model family; importing this
package imports them all, which registers their model ids.
"""

import importlib
import pkgutil

from tympan.models.registry import (
    ModelEntry,
    UnknownModelError,
    Weights,
    create_model,
    get_model_entry,
    list_models,
    register_model,
)

_SHARED = {"registry", "layers", "patching"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ModelEntry",
    "UnknownModelError",
    "Weights",
    "create_model",
    "get_model_entry",
    "list_models",
    "register_model",
]
