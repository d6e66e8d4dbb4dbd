"""tympan.train: one trainer for supervised fine-tuning, distillation and self-supervised pretraining.

>>> from tympan.train import load_config, Trainer
>>> config = load_config("recipes/fsdd_ssast_tiny.yaml", ["train.epochs=2"])
>>> Trainer(config).fit()

Command line (wired by ``tympan train``): :func:`train_main` and :func:`evaluate_main`; multi-process runs go
through ``torchrun --nproc-per-node N`` (see ``recipes/README.md``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from tympan.train.averaging import EMA, average_checkpoints, average_state_dicts
from tympan.train.config import ConfigError, apply_overrides, load_config, save_config
from tympan.train.objectives import (
    DistillationObjective,
    LabelObjective,
    ModelLossObjective,
    ModelTeacher,
    OnnxLogits,
    PrecomputedTeacher,
    distillation_loss,
    label_loss,
    label_mapping,
    precompute_teacher_outputs,
)
from tympan.train.schedules import lr_multiplier
from tympan.train.trainer import Trainer, build_model, evaluate_model

__all__ = [
    "ConfigError",
    "DistillationObjective",
    "EMA",
    "LabelObjective",
    "ModelLossObjective",
    "ModelTeacher",
    "OnnxLogits",
    "PrecomputedTeacher",
    "Trainer",
    "apply_overrides",
    "average_checkpoints",
    "average_state_dicts",
    "build_model",
    "distillation_loss",
    "evaluate_main",
    "evaluate_model",
    "label_loss",
    "label_mapping",
    "load_config",
    "lr_multiplier",
    "precompute_teacher_outputs",
    "save_config",
    "train_main",
]


def train_main(config_path: str | os.PathLike | None, overrides: list[str] | None = None, resume: bool = False) -> int:
    """``tympan train RECIPE [--set key=value ...] [--resume]``: train, print the final metrics as JSON (rank 0).

    Returns the process exit status (2 for a bad recipe)."""
    from tympan.train import distributed

    try:
        config = load_config(config_path, list(overrides or []))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(config)
    except (ValueError, KeyError, OSError) as err:  # bad recipe values, unknown ids, missing files
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = trainer.fit(resume=resume)
    if trainer.ctx.is_main:
        print(json.dumps(summary, indent=2))
    distributed.teardown()
    return 0


def evaluate_main(checkpoint: str | os.PathLike, datafile: str | os.PathLike, labels: str | os.PathLike | None = None,
                  model_id: str | None = None, clip_seconds: float = 10.0, metric: str = "mAP",
                  select: dict[str, Any] | None = None, batch_size: int = 32) -> int:  # fmt: skip
    """``tympan evaluate CHECKPOINT DATAFILE``: a saved model (our safetensors + sidecar, or `model_id` with an
    official checkpoint) on a datafile; prints mAP/mAUC/d-prime (and accuracy with ``metric="accuracy"``) as JSON."""
    import tympan
    from tympan.checkpoints import read_checkpoint
    from tympan.train.config import DEFAULTS, merge

    if model_id is None:
        _, meta = read_checkpoint(checkpoint)
        model_id = meta.get("model_id")
        if model_id is None:
            print(f"error: {checkpoint} does not name its model; pass model_id", file=sys.stderr)
            return 2
    config = merge(DEFAULTS, {"model": {"id": model_id, "checkpoint": str(checkpoint)},
                              "data": {"datafile": str(datafile), "labels": labels, "valid": select or {},
                                       "clip_seconds": clip_seconds},
                              "eval": {"metric": metric, "batch_size": batch_size}})  # fmt: skip
    from tympan.data import AudioDataset
    from tympan.train import distributed
    from tympan.train.data import select_records
    from tympan.data import read_datafile
    from tympan.train.objectives import model_frontend
    from tympan.train.trainer import BatchAugment

    ctx = distributed.setup()
    model = tympan.load(model_id, checkpoint=checkpoint).to(ctx.device)
    dataset = AudioDataset(select_records(read_datafile(datafile), select), labels, clip_seconds=clip_seconds)
    augment = BatchAugment(config["augment"], model_frontend(model))

    def prepare(batch: dict[str, Any], generator: Any, train: bool) -> dict[str, Any]:
        inputs, waveform, target = augment(batch["waveform"].to(ctx.device), batch["target"].to(ctx.device),
                                           batch["lengths"], None, False)  # fmt: skip
        return {"inputs": inputs, "waveform": waveform, "target": target}

    kind = "ce" if metric == "accuracy" else "bce"
    metrics = evaluate_model(model, LabelObjective(kind), dataset, prepare, ctx, config, metric,
                             lambda: _NoAutocast())  # fmt: skip
    if ctx.is_main:
        print(json.dumps(metrics, indent=2))
    return 0


class _NoAutocast:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None
