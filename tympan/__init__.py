"""tympan: audio tagging and audio representation models under one roof.

>>> import tympan
>>> tympan.list_models("ast-*")            # registered ids
>>> model = tympan.load("ast-base384")     # official weights, eval mode
"""

from tympan.checkpoints import CheckpointError, load, save
from tympan.models.registry import create_model, get_model_entry, list_models

__version__ = "0.1.0"

__all__ = ["CheckpointError", "create_model", "get_model_entry", "list_models", "load", "save", "__version__"]
