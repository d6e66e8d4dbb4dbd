"""Training configuration: YAML recipes over built-in defaults, ``--set key.sub=value`` overrides, saved resolved.

The schema is typed: one dataclass per section (:class:`Config` holds them). A recipe is a nested mapping
with those sections; anything it leaves out keeps the default. Overrides are ``dotted.key=value`` strings whose
value is parsed as YAML (``train.epochs=3``, ``optim.betas=[0.9,0.95]``, ``model.checkpoint=null``).

Everything is checked before training starts, and every refusal is a :class:`ConfigError` whose one-line
message names the key: unknown keys (also inside record selections, ``model.overrides`` and the teacher's
overrides, which are checked against the registered model's config), values outside an enumeration
(``eval.metric=f1``), out-of-range numbers (``augment.freqm=-5``) and wrong types (``optim.lr=fast``,
``train.seed=abc``, ``data.clip_seconds=1.2s``). YAML is read with YAML 1.2's number rules, so ``lr: 3e-3`` is
the float it looks like (PyYAML's YAML 1.1 would read a string).

:func:`load_config` returns the validated config as plain nested dicts (``config["train"]["seed"]``), which
is what the trainer and the saved ``config.yaml`` use; :func:`parse_config` gives the dataclasses.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from tympan.errors import ConfigError

__all__ = ["Config", "ConfigError", "DEFAULTS", "apply_overrides", "check_model_overrides", "check_selection",
           "load_config", "merge", "parse_config", "read_yaml", "save_config"]  # fmt: skip

# ------------------------------------------------------------------------------------------------ YAML 1.2
_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)  # fmt: skip


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``3e-3`` as a float (YAML 1.2), not a string (YAML 1.1)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def read_yaml(text: str, where: str) -> Any:
    """Parse YAML text with YAML 1.2 numbers; a syntax error is a one-line :class:`ConfigError`."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: invalid YAML ({' '.join(str(err).split())})") from None


# ------------------------------------------------------------------------------------------------ schema
def _opt(default: Any = None, **meta: Any) -> Any:
    """A dataclass field with its checks in the metadata (choices, ge, gt, le, lt, kind)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


Pair = list  # [low, high] of two numbers, typed by the field's `kind` metadata


@dataclass
class ModelConfig:
    id: Optional[str] = None  # registered model id (tympan.list_models())
    overrides: dict = _opt({}, kind="model_overrides")  # entries of the registered config (depth, num_classes...)
    checkpoint: Optional[str] = None  # initial weights: a path, or "official" for the registry's weights
    strict: bool = True  # False: load only tensors whose name and shape match


@dataclass
class BalancedConfig:
    smoothing: float = _opt(0.01, ge=0)
    scale: float = _opt(1000.0, gt=0)
    num_samples: Optional[int] = _opt(None, ge=1)


@dataclass
class DataConfig:
    datafile: Union[str, list[str], None] = None  # JSON datafile, or "fsdd"/"esc10" built from data.root
    root: Optional[str] = None  # dataset folder for the built-in converters
    labels: Optional[str] = None  # label CSV
    shards: Optional[str] = None  # tar-shard folder/index.json to stream training data from
    train: Union[dict, list] = _opt({}, kind="selection")  # e.g. {fold: [1, 2, 3]} or {take: {min: 10, max: 49}}
    valid: Union[dict, list, None] = _opt(None, kind="selection")  # None: no evaluation
    clip_seconds: float = _opt(10.0, gt=0, le=86400)
    sample_rate: int = _opt(16000, ge=1000, le=384000)
    num_workers: int = _opt(0, ge=0, le=256)
    cache: bool = False  # keep decoded clips in memory
    precompute_features: bool = False  # compute model inputs once (feature-domain augmentation only)
    balanced: Optional[BalancedConfig] = None  # label-balanced draws with replacement
    fbank_stats: Optional[Pair] = _opt(None, kind="mean_std")  # [mean, std] of the fbank frontend
    teacher_outputs: Optional[str] = None  # precomputed teacher logits (safetensors)


@dataclass
class AugmentConfig:
    mixup: float = _opt(0.0, ge=0, le=1)  # probability per clip
    mixup_alpha: float = _opt(10.0, gt=0)
    gain_db: Optional[Pair] = _opt(None, kind="range", ge=-120, le=120)  # [low, high] random gain
    noise_snr_db: Optional[Pair] = _opt(None, kind="range", ge=-120, le=120)  # [low, high] white noise SNR
    freqm: int = _opt(0, ge=0, le=100000)  # SpecAugment widths (frequency, time) on fbank features
    timem: int = _opt(0, ge=0, le=100000)
    noise_roll: bool = False  # AST's noise=True on features


@dataclass
class DistillConfig:
    weight: float = _opt(0.5, ge=0, le=1)  # lambda
    loss: str = _opt("kl", choices=("kl", "bce", "cosine", "l2", "embedding_cosine"))
    temperature: float = _opt(1.0, gt=0)
    teacher_activation: str = _opt("sigmoid", choices=("sigmoid", "softmax"))
    top_k: Optional[int] = _opt(None, ge=1)
    label_map: str = _opt("none", choices=("none", "mid", "append"))


@dataclass
class TeacherConfig:
    kind: Optional[str] = _opt(None, choices=(None, "tympan", "onnx", "yamnet", "precomputed"))
    id: Optional[str] = None  # tympan model id
    checkpoint: Optional[str] = None
    overrides: dict = _opt({}, kind="model_overrides")
    path: Optional[str] = None  # ONNX model (zip) path
    labels: Optional[str] = None
    precompute: bool = False
    name: Optional[str] = None


@dataclass
class MaeConfig:
    mask_ratio: float = _opt(0.75, gt=0, lt=1)
    decoder_dim: int = _opt(512, ge=1, le=65536)
    decoder_depth: int = _opt(8, ge=1, le=1024)
    decoder_heads: int = _opt(16, ge=1, le=1024)
    group: int = _opt(2, ge=1, le=1024)


@dataclass
class ObjectiveConfig:
    kind: str = _opt("bce", choices=("bce", "ce", "distill", "ssast", "mae"))
    label_weight: float = _opt(1.0, ge=0)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)
    mask_padding: bool = False


@dataclass
class OptimConfig:
    name: str = _opt("adamw", choices=("adamw", "adam"))
    lr: float = _opt(1e-4, gt=0, le=10)
    weight_decay: float = _opt(0.01, ge=0)
    betas: Pair = _opt([0.9, 0.999], kind="betas")
    head_lr: float = _opt(1.0, ge=0)
    layer_decay: Optional[float] = _opt(None, gt=0, le=1)
    no_decay_1d: bool = True
    clip_grad: Optional[float] = _opt(None, gt=0)


@dataclass
class ScheduleConfig:
    kind: str = _opt("cosine", choices=("cosine", "multistep", "constant"))
    warmup_steps: int = _opt(0, ge=0)
    warmup_epochs: float = _opt(0.0, ge=0)
    warmup_style: str = _opt("linear", choices=("linear", "ast"))
    min_lr_ratio: float = _opt(0.0, ge=0, le=1)
    milestones: list[int] = _opt([], ge=0)
    gamma: float = _opt(0.5, gt=0)


@dataclass
class TrainConfig:
    epochs: int = _opt(10, ge=1, le=1_000_000)
    batch_size: int = _opt(32, ge=1, le=1_000_000)
    accumulation: int = _opt(1, ge=1, le=1_000_000)
    drop_last: bool = True
    precision: str = _opt("fp32", choices=("fp32", "bf16"))
    seed: int = _opt(0, ge=0, le=2**63 - 1)
    threads: Optional[int] = _opt(None, ge=1, le=4096)
    ema: Optional[float] = _opt(None, gt=0, lt=1)
    average_last: int = _opt(0, ge=0)
    checkpoint_every: int = _opt(0, ge=0)
    keep_epoch_checkpoints: bool = False
    log_every: int = _opt(10, ge=1)
    progress: bool = True
    max_steps: Optional[int] = _opt(None, ge=1)


@dataclass
class EvalConfig:
    metric: Optional[str] = _opt(None, choices=(None, "accuracy", "mAP"))
    batch_size: int = _opt(64, ge=1, le=1_000_000)
    every: int = _opt(1, ge=1)


@dataclass
class DistributedConfig:
    backend: Optional[str] = _opt(None, choices=(None, "gloo", "nccl", "mpi"))
    fsdp: bool = False


@dataclass
class OutputConfig:
    dir: str = _opt("out/runs/run", nonempty=True)


@dataclass
class Config:
    """A whole training recipe, validated; :meth:`to_dict` is what the trainer reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULTS: dict[str, Any] = Config().to_dict()
FREE_FORM = {("model", "overrides"), ("data", "train"), ("data", "valid"), ("objective", "teacher", "overrides")}


# ------------------------------------------------------------------------------------------------ checking
def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any, key: str, integer: bool) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {kind}, got {_describe(value)}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {_describe(value)}")
    if integer:
        return value
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {_describe(value)}")
    return number


def _bounds(value: int | float, key: str, meta: dict[str, Any]) -> None:
    checks = (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"), ("le", lambda a, b: a <= b, "<="),
              ("lt", lambda a, b: a < b, "<"))  # fmt: skip
    for name, ok, sign in checks:
        if name in meta and not ok(value, meta[name]):
            raise ConfigError(f"{key} must be {sign} {meta[name]}, got {_describe(value)}")


def _check_pair(value: Any, key: str, meta: dict[str, Any]) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{key} must be a list of two numbers, got {_describe(value)}")
    pair = [_number(v, key, integer=False) for v in value]
    kind = meta.get("kind")
    for v in pair:
        if kind == "betas" and not 0 <= v < 1:
            raise ConfigError(f"{key} must hold two numbers in [0, 1), got {_describe(value)}")
        _bounds(v, key, meta)
    if kind == "range" and pair[0] > pair[1]:
        raise ConfigError(f"{key} must be [low, high] with low <= high, got {_describe(value)}")
    if kind == "mean_std" and not pair[1] > 0:
        raise ConfigError(f"{key} must be [mean, std] with std > 0, got {_describe(value)}")
    return pair


def _check_value(value: Any, hint: Any, key: str, meta: dict[str, Any]) -> Any:
    """`value` checked against the type `hint` and the field's `meta`; returns the normalised value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        if origin in (Union, types.UnionType) and type(None) in args:
            return None
        raise ConfigError(f"{key} must not be null")
    if meta.get("kind") == "selection":
        return check_selection(value, key)
    if meta.get("kind") == "model_overrides":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key} must be a mapping of config names to values, got {_describe(value)}")
        return copy.deepcopy(value)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _check_value(value, option, key, meta)
            except ConfigError as err:
                errors.append(err)
        if len(options) == 1:
            raise errors[0]
        names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
        raise ConfigError(f"{key} must be {names}, got {_describe(value)}")
    if hint is Pair or meta.get("kind") in ("range", "betas", "mean_std"):
        return _check_pair(value, key, meta)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {_describe(value)}")
        return value
    if hint in (int, float):
        number = _number(value, key, integer=hint is int)
        _bounds(number, key, meta)
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {_describe(value)}")
        if "choices" in meta and value not in meta["choices"]:
            allowed = ", ".join(str(c) for c in meta["choices"] if c is not None)
            raise ConfigError(f"{key} must be one of {allowed}, got {_describe(value)}")
        if meta.get("nonempty") and not value.strip():
            raise ConfigError(f"{key} must not be empty")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {_describe(value)}")
        return [_check_value(v, args[0], key, meta) for v in value] if args else list(value)
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {_describe(value)}")
        return copy.deepcopy(value)
    raise ConfigError(f"{key}: unsupported value {_describe(value)}")  # pragma: no cover (schema types only)


def _build(cls: type, values: Any, where: str) -> Any:
    """A dataclass of `cls` from a mapping; unknown keys and bad values are ConfigErrors naming the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'the recipe'} must be a mapping, got {_describe(values)}")
    hints = typing.get_type_hints(cls, globals())
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            name = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"unknown config key {name!r}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in values:
            kwargs[name] = _check_value(values[name], hints[name], key, dict(f.metadata))
    return cls(**kwargs)


_CONDITION_KEYS = ("min", "max")


def check_selection(selection: Any, where: str) -> dict | list:
    """A record selection: a mapping ``{field: value | [values] | {min, max}}`` or a list of such mappings."""
    alternatives = selection if isinstance(selection, list) else [selection]
    if isinstance(selection, list) and not selection:
        raise ConfigError(f"{where} must not be an empty list of selections")
    for choice in alternatives:
        if not isinstance(choice, dict):
            raise ConfigError(f"{where} must be a mapping of record fields to conditions, got {_describe(choice)}")
        for name, condition in choice.items():
            key = f"{where}.{name}"
            if not isinstance(name, str):
                raise ConfigError(f"{where}: record field names are strings, got {_describe(name)}")
            if isinstance(condition, dict):
                unknown = [k for k in condition if k not in _CONDITION_KEYS]
                if unknown:
                    raise ConfigError(f"unknown key {unknown[0]!r} in range selection {key} (use min and max)")
                if not condition:
                    raise ConfigError(f"{key}: a range selection needs min and/or max")
                for bound, value in condition.items():
                    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                        raise ConfigError(f"{key}.{bound} must be a number or a string, got {_describe(value)}")
                if "min" in condition and "max" in condition:
                    low, high = condition["min"], condition["max"]
                    if type(low) is not type(high) and not all(isinstance(v, (int, float)) for v in (low, high)):
                        raise ConfigError(f"{key}: min and max must be of one type, got {_describe(condition)}")
                    if low > high:
                        raise ConfigError(f"{key}: min {low!r} is above max {high!r}, nothing would match")
            elif isinstance(condition, list):
                if not all(isinstance(v, (int, float, str, bool)) for v in condition):
                    raise ConfigError(f"{key} must list plain values, got {_describe(condition)}")
            elif condition is not None and not isinstance(condition, (int, float, str, bool)):
                raise ConfigError(f"{key} must be a value, a list of values or {{min, max}}, got {_describe(condition)}")
    return copy.deepcopy(selection)


# ------------------------------------------------------------------------------------------------ model configs
def check_model_overrides(model_id: str, overrides: dict[str, Any], where: str = "model.overrides") -> dict[str, Any]:
    """Check config entries for a registered model (``model.overrides``, the teacher's overrides): known names,
    the registered value's type and range, sane sizes. The check itself is the registry's, shared with checkpoint
    sidecars: :func:`tympan.models.registry.check_config`."""
    from tympan.models.registry import check_config

    return check_config(model_id, overrides, where)


# ------------------------------------------------------------------------------------------------ loading
def merge(base: dict[str, Any], update: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`; a key unknown to `base` is a :class:`ConfigError`."""
    if update is not None and not isinstance(update, dict):
        raise ConfigError(f"{'.'.join(path) or 'the recipe'} must be a mapping, got {_describe(update)}")
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        where = (*path, key)
        if not isinstance(key, str):
            raise ConfigError(f"config keys are strings, got {_describe(key)} under {'.'.join(path) or 'the top'}")
        if path in FREE_FORM or where in FREE_FORM:
            out[key] = copy.deepcopy(value)
            continue
        if key not in out:
            raise ConfigError(f"unknown config key {'.'.join(where)!r}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge(out[key], value, where)
        elif out[key] is None and isinstance(value, dict) and where == ("data", "balanced"):
            out[key] = merge(dataclasses.asdict(BalancedConfig()), value, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (value parsed as YAML 1.2) to a config."""
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {_describe(item)} is not a key.sub=value string")
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        value = read_yaml(raw, f"override {key.strip()}") if raw.strip() else None
        parts = tuple(key.strip().split("."))
        if any(not part for part in parts):
            raise ConfigError(f"override {item!r}: empty part in the key")
        free = next((f for f in FREE_FORM if parts[: len(f)] == f and len(parts) > len(f)), None)
        if free is not None:  # inside a free-form mapping (model.overrides.depth=2): set that entry only
            config = copy.deepcopy(config)
            target = config
            for part in parts[:-1]:
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target = target[part]
            target[parts[-1]] = value
            continue
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        config = merge(config, nested)
    return config


def parse_config(values: dict[str, Any]) -> Config:
    """The typed, validated :class:`Config` of a full or partial config mapping (missing keys keep defaults)."""
    config = _build(Config, merge(DEFAULTS, values), "")
    _check(config)
    return config


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Defaults <- recipe YAML (if any) <- overrides; validated (see the module docstring), as plain dicts."""
    recipe: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read recipe ({err})") from None
        recipe = read_yaml(text, str(path)) or {}
        if not isinstance(recipe, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping")
    config = apply_overrides(merge(DEFAULTS, recipe), list(overrides))
    return parse_config(config).to_dict()


def _check(config: Config) -> None:
    """Checks across keys (after each value passed its own)."""
    if not config.model.id:
        raise ConfigError("model.id is required")
    check_model_overrides(config.model.id, config.model.overrides, "model.overrides")
    teacher = config.objective.teacher
    if teacher.overrides:
        if teacher.kind != "tympan" or not teacher.id:
            raise ConfigError("objective.teacher.overrides needs objective.teacher.kind=tympan and a teacher id")
        check_model_overrides(teacher.id, teacher.overrides, "objective.teacher.overrides")
    if config.data.datafile is None and config.data.shards is None:
        raise ConfigError("data.datafile or data.shards is required")
    if config.objective.mask_padding and (config.objective.kind != "ssast" or config.data.precompute_features):
        raise ConfigError("objective.mask_padding needs objective.kind=ssast on waveforms (no data.precompute_features)")


def save_config(config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (the run folder's ``config.yaml``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
