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
    "prepare_run_dir",
    "save_config",
    "train_main",
]


def prepare_run_dir(out: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse to mix two runs in one folder: a non-empty ``out`` needs `resume` (continue it) or `overwrite`
    (replace it; only a folder holding a previous run's ``config.yaml`` or ``log.jsonl`` is emptied)."""
    import shutil
    from pathlib import Path

    from tympan.errors import ConfigError as RunFolderError

    out = Path(out)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other")
    if resume or not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise RunFolderError(f"output folder {out} is not empty: pass --resume to continue that run, --overwrite to "
                             "replace it, or --set output.dir=ANOTHER")  # fmt: skip
    if not ((out / "config.yaml").is_file() or (out / "log.jsonl").is_file()):
        raise RunFolderError(f"--overwrite: {out} does not hold a tympan run (no config.yaml or log.jsonl); not "
                             "emptying it")  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def train_main(config_path: str | os.PathLike | None, overrides: list[str] | None = None, resume: bool = False,
               overwrite: bool = False) -> int:
    """``tympan train RECIPE [--set key=value ...] [--resume | --overwrite]``: train, print per-epoch validation
    figures and the run folder on stderr and the final metrics as JSON on stdout (rank 0).

    Returns the process exit status (2 for a bad recipe or a run folder that is not empty)."""
    from tympan.train import distributed

    try:
        config = load_config(config_path, list(overrides or []))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prepare_run_dir(config["output"]["dir"], resume=resume, overwrite=overwrite)
    try:
        trainer = Trainer(config)
    except (ValueError, KeyError, OSError) as err:  # bad recipe values, unknown ids, missing files
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer.console = True
    summary = trainer.fit(resume=resume)
    if trainer.ctx.is_main:
        print(json.dumps(summary, indent=2))
        print(f"wrote {trainer.out / 'model.safetensors'} (use it with: tympan evaluate --checkpoint PATH --data DATA, "
              "tympan tag FILE --checkpoint PATH)", file=sys.stderr)  # fmt: skip
    distributed.teardown()
    return 0


def evaluate_main(checkpoint: str | os.PathLike, datafile: str | os.PathLike, labels: str | os.PathLike | None = None,
                  model_id: str | None = None, clip_seconds: float | None = None, metric: str | None = None,
                  select: dict[str, Any] | None = None, batch_size: int = 32) -> int:  # fmt: skip
    """``tympan evaluate --checkpoint C --data D``: a saved model on a dataset (a datafile, a dataset CSV, a class
    folder tree); prints mAP/mAUC/d-prime (and accuracy) as JSON.

    What the flags leave out comes from the checkpoint's sidecar, as ``tympan train`` wrote it: the model id, the label
    names (``model.labels``), the clip length and the headline metric of the recipe (``model.tympan_extra``); an
    official checkpoint needs `model_id`, `labels` and `clip_seconds` (default 10 s)."""
    import tympan
    from tympan.data import AudioDataset, load_dataset
    from tympan.errors import TympanError
    from tympan.labels import read_label_csv
    from tympan.train import distributed
    from tympan.train.config import DEFAULTS, merge
    from tympan.train.data import select_records
    from tympan.train.objectives import model_frontend
    from tympan.train.trainer import BatchAugment

    ctx = distributed.setup()
    model = tympan.load(model_id, checkpoint=checkpoint).to(ctx.device)
    extra = dict(getattr(model, "tympan_extra", None) or {})
    if clip_seconds is None:
        clip_seconds = float(extra.get("clip_seconds") or 10.0)
    metric = metric or extra.get("metric") or "mAP"
    dataset_source = load_dataset(datafile)
    label_set = read_label_csv(labels) if labels is not None else model.labels  # the sidecar's, or the model's own
    if label_set is None:
        raise TympanError(f"{checkpoint} is an encoder without a classification head: nothing to evaluate")
    config = merge(DEFAULTS, {"model": {"id": model.tympan_id, "checkpoint": str(checkpoint)},
                              "data": {"datafile": str(datafile), "valid": select or {}, "clip_seconds": clip_seconds},
                              "eval": {"metric": metric, "batch_size": batch_size}})  # fmt: skip
    try:
        dataset = AudioDataset(select_records(dataset_source.manifest, select), label_set, clip_seconds=clip_seconds)
    except KeyError as err:
        raise TympanError(f"{datafile}: a clip's label is not among the model's labels ({err}); give --labels CSV "
                          "(index,mid,display_name) naming the model's classes") from None
    augment = BatchAugment(config["augment"], model_frontend(model))

    def prepare(batch: dict[str, Any], generator: Any, train: bool) -> dict[str, Any]:
        inputs, waveform, target = augment(batch["waveform"].to(ctx.device), batch["target"].to(ctx.device),
                                           batch["lengths"], None, False)  # fmt: skip
        return {"inputs": inputs, "waveform": waveform, "target": target}

    kind = "ce" if metric == "accuracy" else "bce"
    metrics = evaluate_model(model, LabelObjective(kind), dataset, prepare, ctx, config, metric,
                             lambda: _NoAutocast())  # fmt: skip
    if not metrics:
        raise TympanError(f"{datafile}: no clip was evaluated")
    if ctx.is_main:
        print(json.dumps({"clips": len(dataset), "clip_seconds": clip_seconds, **metrics}, indent=2))
    return 0


class _NoAutocast:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None
