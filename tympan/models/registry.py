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

from tympan.errors import TympanError

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


class UnknownModelError(TympanError, KeyError):
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


MAX_PARAMETERS = 20_000_000_000  # 80 GB of float32 weights: far past any registered model (Dasheng 1.2B)
MAX_INT_SETTING = 1 << 20  # no model dimension, depth or frame count is near this; 1e9 widths are refused


def builder_settings(entry: ModelEntry) -> dict[str, Any]:
    """Every setting ``entry`` takes: its registered config plus the builder's other keyword arguments, with defaults
    (``None`` where the builder gives none)."""
    import inspect

    settings = dict(entry.config)
    try:
        parameters = inspect.signature(entry.build).parameters
    except (TypeError, ValueError):  # pragma: no cover (builtins)
        parameters = {}
    for name, param in parameters.items():
        if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and name not in settings:
            settings[name] = None if param.default is param.empty else param.default
    return settings


def check_config(model_id: str, config: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """Refuse settings ``model_id`` does not take: unknown names, values unlike the registered ones (type, list length,
    range), and sizes past :data:`MAX_PARAMETERS`, counted on the meta device so nothing is allocated.

    One check for every place a config comes from: recipe ``model.overrides``, teacher overrides, checkpoint
    sidecars. Raises :class:`tympan.errors.ConfigError` naming ``where.key``.
    """
    from tympan.errors import ConfigError

    try:
        entry = get_model_entry(model_id)
    except UnknownModelError as err:
        raise ConfigError(f"{where}: {err}") from None
    settings = builder_settings(entry)
    for name, value in config.items():
        if name not in settings:
            raise ConfigError(f"unknown config key {where}.{name} for model {model_id!r}")
        _check_value(value, settings[name], f"{where}.{name}")
    full = {**dict(entry.config), **{k: v for k, v in config.items() if v is not None}}
    if full != dict(entry.config):  # the registered config itself builds (tests check every one): no meta build,
        check_builds(model_id, full, where)  # whose first Python meta kernel imports torch._dynamo (~1.5 s a load)
    return dict(config)


def check_builds(model_id: str, config: Mapping[str, Any], where: str = "config") -> None:
    """Build ``model_id`` with the complete `config` on the meta device (nothing allocated): the builder's own refusal
    of an impossible config, or a size past :data:`MAX_PARAMETERS`, raises :class:`tympan.errors.ConfigError`."""
    import torch

    from tympan.errors import ConfigError

    try:
        with torch.device("meta"):
            probe = get_model_entry(model_id).build(**config)
    except Exception as err:  # noqa: BLE001 (the builder's own refusal of an impossible config)
        text = str(err).strip().splitlines()
        raise ConfigError(f"{where}: does not build {model_id} ({text[0] if text else type(err).__name__})") from None
    count = sum(p.numel() for p in probe.parameters()) + sum(b.numel() for b in probe.buffers())
    if count > MAX_PARAMETERS:
        raise ConfigError(f"{where}: {model_id} with these settings would hold {count:.3g} weights "
                          f"(limit {MAX_PARAMETERS:.0e}); check the sizes")  # fmt: skip


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_value(value: Any, default: Any, key: str) -> None:
    """``value`` must be like the registered ``default``: same kind, integers in [0, MAX_INT_SETTING], finite floats."""
    import math

    from tympan.errors import ConfigError

    if value is None:
        return
    if default is None:  # no registered value to compare with: only numbers are range-checked
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_value(value, value, key)
        return
    if isinstance(default, bool) or isinstance(value, bool):
        if not (isinstance(default, bool) and isinstance(value, bool)):
            raise ConfigError(f"{key} must be {'true or false' if isinstance(default, bool) else 'a number'}, "
                              f"got {_describe(value)}")  # fmt: skip
    elif isinstance(default, int):
        if not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {_describe(value)}")
        if not 0 <= value <= MAX_INT_SETTING:
            raise ConfigError(f"{key} must be in [0, {MAX_INT_SETTING}], got {_describe(value)}")
    elif isinstance(default, float):
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {_describe(value)}")
        if not math.isfinite(value) or abs(value) > 1e6:
            raise ConfigError(f"{key} is out of range, got {_describe(value)}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {_describe(value)}")
    elif isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ConfigError(f"{key} must be a list of {len(default)} values, got {_describe(value)}")
        for item, item_default in zip(value, default):
            _check_value(item, item_default, key)


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
