"""Training configuration: YAML recipes over built-in defaults, ``--set key.sub=value`` overrides, saved resolved.

A recipe is a nested mapping with the sections of :data:`DEFAULTS`; anything it leaves out keeps the default.
Overrides are ``dotted.key=value`` strings whose value is parsed as YAML (``train.epochs=3``,
``optim.betas=[0.9,0.95]``, ``model.checkpoint=null``). Unknown keys are errors, except under the free-form
mappings ``model.overrides`` and ``data.train``/``data.valid`` (record selections), so typos fail early.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "DEFAULTS", "apply_overrides", "load_config", "merge", "save_config"]


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and the reason."""


DEFAULTS: dict[str, Any] = {
    "model": {
        "id": None,  # registered model id (tympan.list_models())
        "overrides": {},  # replace entries of the registered config (num_classes, depth, input_tdim, ...)
        "checkpoint": None,  # initial weights: a path, or "official" for the registry's weights
        "strict": True,  # False: load only tensors whose name and shape match (e.g. pretrained encoder -> tagger)
    },
    "data": {
        "datafile": None,  # JSON datafile (tympan.data); or "fsdd"/"esc10" to build one from data.root
        "root": None,  # dataset folder for the built-in converters
        "labels": None,  # label CSV (None: the converter's, or no labels for self-supervised training)
        "shards": None,  # tar-shard folder/index.json to stream training data from instead of the datafile
        "train": {},  # record selection for training, e.g. {fold: [1, 2, 3]} or {split: train, take: [10, 49]}
        "valid": None,  # selection for validation (None: no evaluation)
        "clip_seconds": 10.0,  # training crop (random) and evaluation crop (start); shorter clips are zero-padded
        "sample_rate": 16000,
        "num_workers": 0,
        "cache": False,  # keep decoded clips in memory (small datasets, num_workers 0)
        "precompute_features": False,  # compute model inputs once (feature-domain augmentation only)
        "balanced": None,  # label-balanced draws with replacement: {smoothing: 0.01, scale: 1000, num_samples: null}
        "fbank_stats": None,  # [mean, std] of the fbank frontend (AST ESC-50: [-6.6268077, 5.358466])
        "teacher_outputs": None,  # precomputed teacher logits (safetensors written by precompute_teacher_outputs)
    },
    "augment": {
        "mixup": 0.0,  # probability per clip (AST: 0.5 AudioSet, 0.6 Speech Commands)
        "mixup_alpha": 10.0,
        "gain_db": None,  # [low, high] random gain (Dasheng: [-6, 10])
        "noise_snr_db": None,  # [low, high] white noise at this SNR
        "freqm": 0,  # SpecAugment widths (frequency, time) on fbank features
        "timem": 0,
        "noise_roll": False,  # AST's noise=True on features
    },
    "objective": {
        "kind": "bce",  # bce | ce | distill | ssast | mae
        "label_weight": 1.0,  # weight of the label loss next to the distillation loss (DASS: 1 - lambda)
        "distill": {
            "weight": 0.5,  # lambda
            "loss": "kl",  # kl | bce | cosine | l2 | embedding_cosine
            "temperature": 1.0,
            "teacher_activation": "sigmoid",  # bce targets: sigmoid(t / T) or softmax(t / T)
            "top_k": None,  # keep the teacher's k best probabilities, zero the rest (SAT/CED soft labels)
            "label_map": "none",  # none | mid (teacher classes -> student classes by label id) | append
        },
        "teacher": {
            "kind": None,  # tympan | onnx | yamnet | precomputed
            "id": None,  # tympan model id
            "checkpoint": None,  # its weights ("official" for the registry's)
            "overrides": {},  # config overrides of the teacher model
            "path": None,  # ONNX model (zip) path
            "labels": None,  # teacher label CSV (ONNX teachers)
            "precompute": False,  # run the teacher once over the datafile, store its logits beside it, reuse them
            "name": None,  # name in the stored file (default: the model id or the ONNX file's stem)
        },
        "mae": {"mask_ratio": 0.75, "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16, "group": 2},
        "mask_padding": False,  # ssast: mask patches of each clip's audio, never of its zero-padding (frame masking)
    },
    "optim": {
        "name": "adamw",  # adamw | adam
        "lr": 1e-4,
        "weight_decay": 0.01,
        "betas": [0.9, 0.999],
        "head_lr": 1.0,  # multiplier for parameters under the classifier head (SSAST head_lr)
        "layer_decay": None,  # e.g. 0.75: lr x layer_decay^(layers above), embeddings lowest (BEiT/MAE fine-tuning)
        "no_decay_1d": True,  # no weight decay on biases and norm weights
        "clip_grad": None,  # max global grad norm
    },
    "schedule": {
        "kind": "cosine",  # cosine | multistep | constant
        "warmup_steps": 0,
        "warmup_epochs": 0.0,  # alternative to warmup_steps (fractional epochs)
        "warmup_style": "linear",  # linear (every step) | ast (AST/DASS: lr * step/1000 refreshed every 50 steps)
        "min_lr_ratio": 0.0,  # cosine floor as a fraction of lr
        "milestones": [],  # multistep: epochs after which lr *= gamma
        "gamma": 0.5,
    },
    "train": {
        "epochs": 10,
        "batch_size": 32,  # global batch per optimiser micro-step (split over ranks)
        "accumulation": 1,
        "drop_last": True,
        "precision": "fp32",  # fp32 | bf16 (autocast)
        "seed": 0,
        "threads": None,  # torch intra-op threads (1 is fastest on a small, busy CPU)
        "ema": None,  # EMA decay (e.g. 0.999); evaluated and saved beside the raw weights
        "average_last": 0,  # average the weights of the last N epoch checkpoints at the end (AST/DASS wa)
        "checkpoint_every": 0,  # also checkpoint every N optimiser steps (mid-epoch resume); 0: per epoch only
        "keep_epoch_checkpoints": False,  # keep every epoch-N.pt (else only the last average_last of them)
        "log_every": 10,
        "progress": True,  # tqdm bar on rank 0
        "max_steps": None,  # stop after this many optimiser steps (smoke tests)
    },
    "eval": {
        "metric": None,  # accuracy | mAP (default: accuracy for ce, mAP otherwise); the best epoch is kept
        "batch_size": 64,
        "every": 1,  # epochs
    },
    "distributed": {
        "backend": None,  # None: nccl on GPU, gloo on CPU
        "fsdp": False,  # FSDP2 fully_shard per block (large Dasheng)
    },
    "output": {"dir": "out/runs/run"},
}

FREE_FORM = {("model", "overrides"), ("data", "train"), ("data", "valid"), ("objective", "teacher", "overrides")}


def merge(base: dict[str, Any], update: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`; a key unknown to `base` is a :class:`ConfigError`."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        where = (*path, key)
        if path in FREE_FORM or (where in FREE_FORM):
            out[key] = copy.deepcopy(value)
            continue
        if key not in out:
            raise ConfigError(f"unknown config key {'.'.join(where)!r}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge(out[key], value, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (value parsed as YAML) to a resolved config."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        parts = tuple(key.strip().split("."))
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


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Defaults <- recipe YAML (if any) <- overrides; checks the result."""
    recipe: dict[str, Any] = {}
    if path is not None:
        try:
            recipe = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read recipe ({err})") from None
        if not isinstance(recipe, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping")
    config = apply_overrides(merge(DEFAULTS, recipe), list(overrides))
    _check(config)
    return config


def _check(config: dict[str, Any]) -> None:
    if not config["model"]["id"]:
        raise ConfigError("model.id is required")
    choices = {
        ("objective", "kind"): ("bce", "ce", "distill", "ssast", "mae"),
        ("train", "precision"): ("fp32", "bf16"),
        ("optim", "name"): ("adamw", "adam"),
        ("schedule", "kind"): ("cosine", "multistep", "constant"),
        ("schedule", "warmup_style"): ("linear", "ast"),
    }
    for (section, key), allowed in choices.items():
        if config[section][key] not in allowed:
            raise ConfigError(f"{section}.{key} must be one of {', '.join(allowed)}, got {config[section][key]!r}")
    train = config["train"]
    for key in ("epochs", "batch_size", "accumulation"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {train[key]!r}")
    if config["data"]["datafile"] is None and config["data"]["shards"] is None:
        raise ConfigError("data.datafile or data.shards is required")
    if config["objective"]["mask_padding"] and (config["objective"]["kind"] != "ssast"
                                                or config["data"].get("precompute_features")):  # fmt: skip
        raise ConfigError("objective.mask_padding needs objective.kind=ssast on waveforms (no data.precompute_features)")


def save_config(config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (the run folder's ``config.yaml``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
