"""Model registry: named configurations, their builders and where their official weights live.

Modelled on timm: every model id maps to one :class:`ModelEntry` holding a builder, the keyword
configuration it is called with, the official weights (:class:`Weights`) and a pure function that
converts an official checkpoint's state dict into ours. Model code never downloads anything; the
registry only records sources, :mod:`tympan.checkpoints` fetches them.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]
# (official state dict with container/prefix already removed, freshly built model) -> our state dict
ConvertFn = Callable[[StateDict, nn.Module], StateDict]


@dataclass(frozen=True)
class Weights:
    """An official checkpoint: where to fetch it and how to recognise it."""

    url: str
    sha256: str | None = None
    filename: str | None = None  # name in the cache; defaults to the URL's basename
    license: str | None = None
    notes: str = ""


OUTPUT_KINDS = ("logits", "embeddings")


@dataclass(frozen=True)
class ModelEntry:
    """One registered model id."""

    name: str
    family: str
    build: Callable[..., nn.Module]
    config: Mapping[str, Any] = field(default_factory=dict)
    weights: Weights | None = None
    convert_checkpoint: ConvertFn | None = None
    description: str = ""
    input_kind: str = "waveform"  # "waveform" (16 kHz mono samples) or the frontend name from tympan.features
    input_shape: tuple[int, ...] = ()  # example shape of forward's input (the frontend's output) for one window
    sample_rate: int = 16000
    labels: str | None = None  # label set of the head ("audioset"), None for encoders
    output: str = "logits"  # what forward returns: "logits" (never a sigmoid inside) or "embeddings" (encoders)
    classifier: str | None = None  # name of the head submodule (head lr, fine-tuning); None for encoders
    block_types: tuple[type[nn.Module], ...] = ()  # repeated layers: FSDP units, layer-wise lr decay
    test_config: Mapping[str, Any] = field(default_factory=dict)  # overrides giving a tiny model for the tests

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_KINDS:
            raise ValueError(f"{self.name}: output must be one of {OUTPUT_KINDS}, got {self.output!r}")
        if not self.block_types:
            raise ValueError(f"{self.name}: declare the model's block_types (FSDP units, layer decay)")


_REGISTRY: dict[str, ModelEntry] = {}

# The model every tool uses when none is named (tympan.load(), tag, embed, listen, export, hear.load_model): trained
# here, shipped inside the package, loaded offline (see tympan/assets/MODEL_CARD.md).
DEFAULT_MODEL = "tymnet-s"


class UnknownModelError(KeyError):
    """Raised for a model id that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a readable sentence
        return str(self.args[0])


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add ``entry`` to the registry (ids are unique)."""
    if entry.name in _REGISTRY:
        raise ValueError(f"model id {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered model ids matching a shell-style ``pattern``; ``pretrained`` keeps those with official weights."""
    _import_families()
    return sorted(
        name
        for name, entry in _REGISTRY.items()
        if fnmatch.fnmatch(name, pattern) and (entry.weights is not None or not pretrained)
    )


def get_model_entry(name: str) -> ModelEntry:
    """The entry of ``name``, or an error that suggests the closest registered ids."""
    _import_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `tympan models` lists them"
        raise UnknownModelError(f"unknown model id {name!r}{hint}") from None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build ``name`` with random weights; ``overrides`` replace entries of its registered config.

    Overrides set to ``None`` are ignored so callers can pass optional CLI values straight through.
    The model remembers its id and full config (``model.tympan_id``, ``model.tympan_config``) so it can
    be saved and re-created with :func:`tympan.checkpoints.save`.
    """
    entry = get_model_entry(name)
    config = dict(entry.config)
    unknown = [k for k in overrides if k not in config and overrides[k] is not None]
    config.update({k: v for k, v in overrides.items() if v is not None})
    try:
        model = entry.build(**config)
    except TypeError as err:
        if unknown:
            raise TypeError(f"{name}: unsupported override(s) {', '.join(sorted(unknown))}: {err}") from None
        raise
    model.tympan_id = name
    model.tympan_config = config
    model.label_source = entry.labels
    model.classifier = entry.classifier if getattr(model, "num_classes", 0) else None
    model.block_types = entry.block_types
    return model


def create_test_model(name: str, **overrides: Any) -> nn.Module:
    """``name`` built with its tiny ``test_config`` (then ``overrides``): what the tests run every family on."""
    return create_model(name, **{**get_model_entry(name).test_config, **overrides})


def _import_families() -> None:
    """Import the model family modules so that their ``register_model`` calls run."""
    import tympan.models  # noqa: F401  (its __init__ imports every family)
