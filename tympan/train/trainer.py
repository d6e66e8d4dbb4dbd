"""The training loop shared by every recipe: supervised, distillation and self-supervised, 1 to N processes.

One :class:`Trainer` builds everything from a resolved config (:mod:`tympan.train.config`): the model (plus
initial weights), the datasets (:mod:`tympan.train.data`), the objective (:mod:`tympan.train.objectives`),
AdamW/Adam with per-group weight decay, the lr schedule (:mod:`tympan.train.schedules`), bf16 autocast,
gradient accumulation and clipping, EMA and last-N weight averaging (:mod:`tympan.train.averaging`),
evaluation every epoch, JSONL logs with a tqdm bar, and checkpoints that resume bit-for-bit, mid-epoch too.

Per-step randomness is reproducible and sample-keyed: batch augmentation draws each clip's randomness from
its own generator seeded by ``(seed, epoch, position of the clip in the epoch's global order)``
(:class:`~tympan.data.augment.SampleGenerators`), never from the rank, so 1 and N processes augment every clip alike and
train the same run. Randomness inside the model (dropout, stochastic depth, SSAST/MAE masking) uses the global
RNGs, seeded ``seed + rank`` and saved with every checkpoint; evaluation runs under a forked RNG so it does not
move them.

Run folder (``output.dir``): ``config.yaml`` (resolved), ``log.jsonl``, ``checkpoint.pt`` (latest, for
``--resume``), ``epoch-N.pt`` (weights of the last ``average_last`` epochs, or all with
``keep_epoch_checkpoints``), ``model.safetensors`` (final), ``best.safetensors``, ``averaged.safetensors`` /
``ema.safetensors`` when enabled, ``encoder.safetensors`` for MAE, ``metrics.json`` (final evaluation). Every
``.safetensors`` has its JSON sidecar, so ``tympan.load(model_id, checkpoint=...)`` reads it.

The environment variable ``TYMPAN_TRAIN_KILL_AFTER_STEP=N`` makes the process SIGKILL itself after optimiser step
``N`` (fault injection for the resume tests).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import tympan
from tympan.checkpoints import read_checkpoint
from tympan.data import AddNoise, Mixup, NoiseRoll, RandomGain, SpecAugment, collate_audio
from tympan.data.augment import SampleGenerators
from tympan.data.sampling import DistributedSampler
from tympan.eval.metrics import multilabel_metrics, singlelabel_metrics
from tympan.models.protocol import audio_model
from tympan.train import distributed as dist_utils
from tympan.train.averaging import EMA, average_checkpoints
from tympan.errors import ResumeError
from tympan.train.checkpointing import atomic_save, capture_rng, load_checkpoint, restore_rng
from tympan.train.config import ConfigError, save_config
from tympan.train.data import FeatureCache, SkipSampler, build_datasets, rank_sampler
from tympan.train.objectives import (
    DistillationObjective,
    LabelObjective,
    ModelLossObjective,
    PrecomputedTeacher,
    build_teacher,
    precompute_teacher_outputs,
    teacher_outputs_path,
    model_frontend,
    label_mapping,
)
from tympan.train.schedules import lr_multiplier

__all__ = ["Trainer", "build_model", "evaluate_model"]

KILL_ENV = "TYMPAN_TRAIN_KILL_AFTER_STEP"  # fault injection for the resume tests: SIGKILL after this step


def _load_matching(model: nn.Module, state: dict[str, Tensor]) -> tuple[int, int]:
    """Copy tensors whose name and shape match (a pretrained encoder into a tagger); returns (loaded, total)."""
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matching, strict=False)
    return len(matching), len(own)


def build_model(spec: dict[str, Any], num_classes: int | None = None) -> tuple[nn.Module, str]:
    """The configured model (random init, or initial weights) and a line saying what was loaded."""
    overrides = dict(spec.get("overrides") or {})
    entry = tympan.get_model_entry(spec["id"])
    if num_classes is not None and "num_classes" in entry.config and "num_classes" not in overrides:
        overrides["num_classes"] = num_classes
    checkpoint = spec.get("checkpoint")
    if checkpoint is None:
        return tympan.create_model(spec["id"], **overrides), "random initialisation"
    if spec.get("strict", True):
        model = tympan.load(spec["id"], checkpoint=None if checkpoint == "official" else checkpoint, **overrides)
        return model.train(), f"weights from {checkpoint}"
    model = tympan.create_model(spec["id"], **overrides)
    state, _ = read_checkpoint(checkpoint)
    state = state.get("model", state) if isinstance(state.get("model"), dict) else state
    loaded, total = _load_matching(model, state)
    return model, f"{loaded}/{total} tensors from {checkpoint} (name and shape match)"


class BatchAugment:
    """Waveform -> model input with the recipe's augmentation: gain, noise, mixup (waveform), the model's
    frontend, then SpecAugment and AST's noise+roll on features."""

    def __init__(self, augment: dict[str, Any], frontend: nn.Module | None) -> None:
        a = augment
        self.gain = RandomGain(*a["gain_db"]) if a["gain_db"] else None
        self.noise = AddNoise(tuple(a["noise_snr_db"])) if a["noise_snr_db"] else None
        self.mixup = Mixup(a["mixup_alpha"], a["mixup"]) if a["mixup"] else None
        self.spec = SpecAugment(a["freqm"], a["timem"]) if (a["freqm"] or a["timem"]) and frontend is not None else None
        self.noise_roll = NoiseRoll() if a["noise_roll"] and frontend is not None else None
        self.frontend = frontend

    def __call__(self, waveform: Tensor | None, target: Tensor, lengths: Tensor, generator: torch.Generator | None,
                 train: bool, features: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:  # fmt: skip
        """``(inputs, waveform, target)`` for the model, the teacher and the loss (`features`: precomputed
        inputs, which skip the waveform augmentations and the frontend)."""
        if features is not None:
            return self.feature_augment(features, generator, train), None, target
        if train:
            if self.gain is not None:
                waveform = self.gain(waveform, generator=generator)
            if self.noise is not None:
                waveform = self.noise(waveform, lengths, generator=generator)
            if self.mixup is not None:
                waveform, target = self.mixup(waveform, target, lengths, generator=generator)
        inputs = waveform if self.frontend is None else self.frontend(waveform)
        return self.feature_augment(inputs, generator, train), waveform, target

    def feature_augment(self, inputs: Tensor, generator: torch.Generator | None, train: bool) -> Tensor:
        if train and self.spec is not None:
            inputs = self.spec(inputs, generator=generator)
        if train and self.noise_roll is not None:
            inputs = self.noise_roll(inputs, generator=generator)
        return inputs


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Each parameter's depth for layer-wise lr decay: the model's declared ``block_types`` (the registry's, e.g. DASS
    VSS blocks inside stages) count 1, 2, ... in the order the model registers them; what comes before the first block
    (patch and positional embeddings, prefix tokens) is 0, what sits between blocks (downsampling) takes the depth of
    the block before it, what comes after the last (final norm, head) is the top."""
    types = tuple(getattr(model, "block_types", ()))
    blocks = [name for name, module in model.named_modules() if types and isinstance(module, types)]
    names = [name for name, _ in model.named_parameters()]
    block_of = {name: block for name in names for block in blocks if name.startswith(block + ".")}
    if not block_of:
        raise ConfigError(f"optim.layer_decay needs a model with declared block_types, {type(model).__name__} has none")
    order = {key: i + 1 for i, key in enumerate(dict.fromkeys(block_of.values()))}
    last = max(i for i, name in enumerate(names) if name in block_of)
    depths, depth = {}, 0
    for i, name in enumerate(names):
        if name in block_of:
            depth = order[block_of[name]]
        depths[name] = len(order) + 1 if i > last else depth
    return depths


def _param_groups(model: nn.Module, optim: dict[str, Any]) -> list[dict[str, Any]]:
    """Parameter groups by weight decay (none on 1-D tensors and biases) and lr: ``head_lr`` times the head's
    parameters, and with ``layer_decay`` (BEiT/MAE fine-tuning) ``layer_decay ** (top - depth)`` per layer."""
    depths = layer_depths(model) if optim["layer_decay"] is not None else {}
    top = max(depths.values(), default=0)
    head = getattr(model, "classifier", None)  # the protocol's head submodule name, declared by the registry
    groups: dict[tuple[bool, float], list[Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = optim["no_decay_1d"] and (param.ndim <= 1 or name.endswith(".bias"))
        scale = optim["head_lr"] if head and name.startswith(head + ".") else 1.0
        if depths:
            scale *= optim["layer_decay"] ** (top - depths[name])
        groups.setdefault((no_decay, scale), []).append(param)
    return [{"params": params, "weight_decay": 0.0 if no_decay else optim["weight_decay"],
             "base_lr": optim["lr"] * scale} for (no_decay, scale), params in sorted(groups.items())]  # fmt: skip


def build_optimizer(model: nn.Module, optim: dict[str, Any]) -> torch.optim.Optimizer:
    groups = _param_groups(model, optim)
    cls = torch.optim.AdamW if optim["name"] == "adamw" else torch.optim.Adam
    return cls(groups, lr=optim["lr"], betas=tuple(optim["betas"]))


class Trainer:
    """Train one recipe; ``Trainer(config).fit(resume=False)``. See the module docstring.

    With ``console = True`` (as ``tympan train`` sets it) the run folder and one line per epoch (train loss,
    validation metrics) go to stderr."""

    console = False

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.ctx = dist_utils.setup(config["distributed"]["backend"])
        self.out = Path(config["output"]["dir"])
        train = config["train"]
        if train["threads"]:
            torch.set_num_threads(int(train["threads"]))
        torch.manual_seed(train["seed"] + self.ctx.rank)
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        dist_utils.barrier(self.ctx)

        self.data = build_datasets(config, self.out, self.ctx)
        self.labels = self.data["labels"]
        objective_cfg = config["objective"]
        kind = objective_cfg["kind"]
        self.teacher = None
        num_labels = len(self.labels) if self.labels is not None else None
        if kind == "distill":
            self.teacher = self._teacher()
            label_map = objective_cfg["distill"]["label_map"]
            if label_map == "append":
                num_classes = (num_labels or 0) + self.teacher.num_classes
            elif label_map == "none":  # the student speaks the teacher's label set (SAT, DASS on AudioSet)
                num_classes = self.teacher.num_classes
                if objective_cfg["label_weight"] and num_labels not in (None, num_classes):
                    raise ValueError(f"label_map 'none': the teacher has {num_classes} classes but the labels "
                                     f"{num_labels}; set objective.label_weight=0 or another label_map")  # fmt: skip
            else:
                num_classes = num_labels
        else:
            num_classes = num_labels
        torch.manual_seed(train["seed"])  # identical initial weights on every rank
        model, self.init_note = build_model(config["model"], num_classes if kind not in ("ssast", "mae") else None)
        self.model_id = config["model"]["id"]
        self.entry = tympan.get_model_entry(self.model_id)
        frontend = model_frontend(model)
        if frontend is not None and config["data"]["fbank_stats"]:
            frontend.mean, frontend.std = (float(v) for v in config["data"]["fbank_stats"])
        live_teacher = self.teacher is not None and not isinstance(self.teacher, PrecomputedTeacher)
        if live_teacher and config["data"]["precompute_features"]:
            raise ValueError("a live teacher needs waveforms: set data.precompute_features=false or precompute the "
                             "teacher outputs (objective.teacher.precompute=true)")  # fmt: skip
        if frontend is not None and config["data"]["precompute_features"]:
            self.data["train"] = FeatureCache(self.data["train"], frontend)
            if self.data["valid"] is not None:
                self.data["valid"] = FeatureCache(self.data["valid"], frontend)
        self.augment = BatchAugment(config["augment"], None if frontend is None else frontend.to(self.ctx.device))
        self.objective = self._objective(model, kind, num_labels)
        model.to(self.ctx.device)
        self.model = dist_utils.wrap_model(model, self.ctx, config["distributed"]["fsdp"])
        self.optimizer = build_optimizer(dist_utils.unwrap(self.model), config["optim"])  # names without "module."
        if train["ema"] and config["distributed"]["fsdp"] and self.ctx.distributed:
            raise ValueError("train.ema is not supported with distributed.fsdp (the EMA would hold sharded tensors)")
        self.ema = EMA(dist_utils.unwrap(self.model), train["ema"]) if train["ema"] else None
        torch.manual_seed(train["seed"] + self.ctx.rank)

        self.global_batch = train["batch_size"]
        self.local_batch = self.global_batch // self.ctx.world_size
        if self.local_batch * self.ctx.world_size != self.global_batch:
            raise ValueError(f"train.batch_size {self.global_batch} must split evenly over {self.ctx.world_size} ranks")
        self.steps_per_epoch = self._batches_per_epoch() // train["accumulation"]
        if self.steps_per_epoch < 1:
            raise ValueError("fewer batches per epoch than train.accumulation: no optimiser step would run")
        self.total_steps = self.steps_per_epoch * train["epochs"]
        if train["max_steps"]:
            self.total_steps = min(self.total_steps, int(train["max_steps"]))
        self.state = {"epoch": 0, "batch": 0, "step": 0, "best": None, "best_epoch": None, "epochs_done": []}
        metric = config["eval"]["metric"] or ("accuracy" if kind == "ce" or (kind == "distill" and
                                               self._label_kind() == "ce") else "mAP")  # fmt: skip
        self.metric = "loss" if kind in ("ssast", "mae") else metric

    # ------------------------------------------------------------------------------ construction pieces
    def _label_kind(self) -> str:
        return "ce" if self.config["objective"]["kind"] == "ce" or self.config["eval"]["metric"] == "accuracy" else "bce"

    def _teacher(self) -> Any:
        spec, data = self.config["objective"]["teacher"], self.config["data"]
        if spec["kind"] == "precomputed" or data["teacher_outputs"]:
            return PrecomputedTeacher(data["teacher_outputs"] or spec["path"])
        if not spec["precompute"]:
            return build_teacher(spec).to(self.ctx.device)
        if self.data["datafile"] is None:
            raise ValueError("objective.teacher.precompute needs data.datafile (clips are looked up by path)")
        name = spec["name"] or spec["id"] or Path(spec["path"]).name.split(".")[0]
        path = teacher_outputs_path(self.data["datafile"], name)
        if self.ctx.is_main and not path.is_file():
            teacher = build_teacher(spec)
            precompute_teacher_outputs(teacher, self.data["datafile"], name, data["clip_seconds"],
                                       labels=teacher.labels)  # fmt: skip
        dist_utils.barrier(self.ctx)
        return PrecomputedTeacher(path)

    def _objective(self, model: nn.Module, kind: str, num_labels: int | None) -> nn.Module:
        if kind in ("ssast", "mae"):
            return ModelLossObjective(pass_lengths=self.config["objective"]["mask_padding"])
        if kind in ("bce", "ce"):
            return LabelObjective(kind)
        cfg = self.config["objective"]
        distill = cfg["distill"]
        label_kind = self._label_kind()
        num_classes = audio_model(model).num_classes
        student_cols, teacher_cols = label_mapping(distill["label_map"], num_classes, self.teacher.labels,
                                                   self.teacher.num_classes, self.labels, num_labels or 0)  # fmt: skip
        head_labels = num_labels if distill["label_map"] == "append" else None
        objective = DistillationObjective(label_kind, None, student_cols, teacher_cols, distill,
                                          cfg["label_weight"] if num_labels else 0.0, head_labels)  # fmt: skip
        objective.teacher = self.teacher  # not a submodule: never trained, never checkpointed
        return objective

    def _batches_per_epoch(self) -> int:
        train = self.data["train"]
        if isinstance(train, torch.utils.data.IterableDataset):
            return len(train) // self.local_batch
        n = len(self.data["balanced"]) if self.data["balanced"] is not None else len(train)
        return n // self.global_batch if self.config["train"]["drop_last"] else math.ceil(n / self.global_batch)

    def _loader(self, epoch: int, skip_batches: int) -> Any:
        train, cfg = self.data["train"], self.config
        train.set_epoch(epoch)
        common = dict(batch_size=self.local_batch, collate_fn=collate_audio, num_workers=cfg["data"]["num_workers"],
                      generator=torch.Generator().manual_seed(cfg["train"]["seed"]))  # fmt: skip
        if isinstance(train, torch.utils.data.IterableDataset):
            # a stream: workers hand over items (each reads its own piece), batches are cut here so that no
            # worker drops a partial batch of its own; the batches already trained are skipped on resume
            items = torch.utils.data.DataLoader(train, batch_size=None, collate_fn=_identity,
                                                num_workers=common["num_workers"], generator=common["generator"])  # fmt: skip
            return itertools.islice(_batches(items, self.local_batch), skip_batches, None)
        sampler = rank_sampler(len(train), self.global_batch, self.ctx, cfg["train"]["seed"], cfg["train"]["drop_last"],
                               self.data["balanced"])  # fmt: skip
        sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(train, sampler=SkipSampler(sampler, skip_batches * self.local_batch),
                                           drop_last=False, **common)  # fmt: skip

    # ------------------------------------------------------------------------------ one step
    def _prepare(self, batch: dict[str, Any], generator: torch.Generator | None, train: bool) -> dict[str, Any]:
        device = self.ctx.device
        waveform = batch["waveform"].to(device) if "waveform" in batch else None
        features = batch["features"].to(device) if "features" in batch else None
        inputs, waveform, target = self.augment(waveform, batch["target"].to(device), batch["lengths"].to(device),
                                                generator, train, features)
        out = {"inputs": inputs, "waveform": waveform, "target": target, "index": batch["index"], "path": batch["path"]}
        if self.config["objective"]["mask_padding"]:  # real input frames per clip (the batch's are samples)
            frames = [self.augment.frontend.content_frames(int(n)) for n in batch["lengths"]]
            out["input_lengths"] = torch.tensor(frames, device=device)
        if isinstance(self.teacher, PrecomputedTeacher):
            out["teacher_logits"] = self.teacher.lookup(batch["path"]).to(device)
        return out

    def _sample_generators(self, epoch: int, batch: int, size: int) -> SampleGenerators:
        """One generator per clip of this rank's piece of global batch `batch`, keyed by the clip's position in
        the epoch's global order (rank r holds positions ``r * local_batch ...`` of each global batch)."""
        first = batch * self.global_batch + self.ctx.rank * self.local_batch
        return SampleGenerators.keyed(self.config["train"]["seed"], epoch, range(first, first + size))

    def _autocast(self):
        enabled = self.config["train"]["precision"] == "bf16"
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _set_lr(self, step: int) -> float:
        factor = lr_multiplier(self.config["schedule"], step, self.steps_per_epoch, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self) -> dict[str, Any] | None:
        """Gather the full training state (collective); rank 0 gets the dict, others None."""
        model_state, optim_state = dist_utils.full_state_dict(self.model, self.optimizer)
        rngs = dist_utils.gather_objects(capture_rng(), self.ctx)
        if not self.ctx.is_main:
            return None
        state = {"model": model_state, "optimizer": optim_state, "trainer": dict(self.state), "rng": rngs,
                 "world_size": self.ctx.world_size, "run": self._run_identity()}  # fmt: skip
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save_checkpoint(self) -> None:
        state = self._checkpoint_state()
        if state is not None:
            atomic_save(state, self.out / "checkpoint.pt")
        dist_utils.barrier(self.ctx)

    def _run_identity(self) -> dict[str, Any]:
        """What a checkpoint must share with the run resuming it (model) and what may change with a warning."""
        return {"model_id": self.model_id, "model_config": json.dumps(self.config["model"]["overrides"], sort_keys=True),
                "lr": float(self.config["optim"]["lr"]), "seed": int(self.config["train"]["seed"])}  # fmt: skip

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` of the run folder if there is one; True when resumed.

        A truncated checkpoint, another model or world size is a one-line :class:`ResumeError`; a changed lr or
        seed is resumed with a warning on stderr."""
        path = self.out / "checkpoint.pt"
        if not path.is_file():
            return False
        state = load_checkpoint(path)
        if state["world_size"] != self.ctx.world_size:
            raise ResumeError(f"{path} was written by {state['world_size']} processes; resume with the same number "
                              f"(now {self.ctx.world_size}) for an exact continuation")  # fmt: skip
        saved, now = state.get("run") or {}, self._run_identity()
        for key in ("model_id", "model_config"):
            if key in saved and saved[key] != now[key]:
                raise ResumeError(f"{path} belongs to a run of model {saved['model_id']} {saved['model_config']}, not "
                                  f"{now['model_id']} {now['model_config']}; use another output.dir")  # fmt: skip
        for key, name in (("lr", "optim.lr"), ("seed", "train.seed")):
            if key in saved and saved[key] != now[key] and self.ctx.is_main:
                print(f"warning: {name} changed since the checkpoint ({saved[key]} -> {now[key]}); the resumed run "
                      "is not the run that was started", file=sys.stderr)  # fmt: skip
        try:
            dist_utils.load_full_state_dict(self.model, state["model"], self.optimizer, state["optimizer"])
            if self.ema is not None and "ema" in state:
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, KeyError, ValueError) as err:
            reason = " ".join(str(err).split())[:200]
            raise ResumeError(f"{path} does not fit this run's model or optimiser ({reason})") from None
        self.state = dict(state["trainer"])
        restore_rng(state["rng"][self.ctx.rank])
        return True

    def _save_weights(self, name: str, model_state: dict[str, Tensor]) -> Path:
        """A model state as ``name.safetensors`` + sidecar, loadable with ``tympan.load`` (rank 0).

        The sidecar carries what the tools need to use the model with no flag: the run's label set (when the head
        predicts it) and ``extra``: the clip length, the headline metric, the frontend settings (fbank statistics...)
        and the resolved recipe."""
        model = tympan.create_model(self.model_id, **dist_utils.unwrap(self.model).tympan_config)
        model.load_state_dict(model_state)
        if self.labels is not None and getattr(model, "num_classes", 0) == len(self.labels):
            model.labels = self.labels
        model.tympan_extra = {"clip_seconds": self.config["data"]["clip_seconds"], "metric": self.metric,
                              "frontend": frontend_settings(model_frontend(dist_utils.unwrap(self.model))),
                              "recipe": json.loads(json.dumps(self.config, default=str))}  # fmt: skip
        return tympan.save(model, self.out / f"{name}.safetensors")

    # ------------------------------------------------------------------------------ logging
    def log(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics on the validation set (every rank takes part; rank 0's dict is the one to use)."""
        valid = self.data["valid"]
        if valid is None:
            return {}
        return evaluate_model(self.model, self.objective, valid, self._prepare, self.ctx, self.config, self.metric,
                              self._autocast)  # fmt: skip

    def _swap_evaluate(self, state: dict[str, Tensor]) -> dict[str, float]:
        """Evaluate other weights (EMA, average) in place of the current ones, then put them back."""
        current, _ = dist_utils.full_state_dict(self.model)
        dist_utils.load_full_state_dict(self.model, state)
        metrics = self.evaluate()
        dist_utils.load_full_state_dict(self.model, current)
        return metrics

    # ------------------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> dict[str, Any]:
        cfg, train = self.config, self.config["train"]
        resumed = resume and self.resume()  # checked before config.yaml is replaced: a refused resume keeps it
        if self.ctx.is_main:
            save_config(cfg, self.out / "config.yaml")
            if self.console:
                print(f"run folder: {self.out}", file=sys.stderr, flush=True)
        if resumed and self.ctx.is_main:
            print(f"resumed at epoch {self.state['epoch']}, batch {self.state['batch']}, step {self.state['step']}")
        elif self.ctx.is_main:
            self.log({"event": "start", "model": self.model_id, "init": self.init_note, "world_size": self.ctx.world_size,
                      "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps})  # fmt: skip
        kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
        accumulation = train["accumulation"]
        started = time.perf_counter()
        progress = None
        if self.ctx.is_main and train["progress"]:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.state["step"], desc="train", dynamic_ncols=True)
        while self.state["epoch"] < train["epochs"] and self.state["step"] < self.total_steps:
            epoch = self.state["epoch"]
            self.model.train()
            epoch_start = time.perf_counter()
            losses: list[float] = []
            micro, pending = 0, []
            for batch in self._loader(epoch, self.state["batch"]):
                if self.state["step"] >= self.total_steps or self.state["batch"] >= self.steps_per_epoch * accumulation:
                    break
                generator = self._sample_generators(epoch, self.state["batch"], len(batch["path"]))
                prepared = self._prepare(batch, generator, train=True)
                micro += 1
                last_micro = micro == accumulation
                sync = last_micro or not isinstance(self.model, nn.parallel.DistributedDataParallel)
                context = self.model.no_sync() if not sync else _null()
                with context:
                    with self._autocast():
                        loss, logs = self.objective(self.model, prepared)
                    (loss / accumulation).backward()
                pending.append(loss.detach().float())
                self.state["batch"] += 1
                if not last_micro:
                    continue
                lr = self._set_lr(self.state["step"])
                grad_norm = None
                if cfg["optim"]["clip_grad"]:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["optim"]["clip_grad"]))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(dist_utils.unwrap(self.model))
                self.state["step"] += 1
                step_loss = float(dist_utils.all_reduce_mean(torch.stack(pending).mean(), self.ctx))
                losses.append(step_loss)
                micro, pending = 0, []
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch)
                if self.state["step"] % max(1, train["log_every"]) == 0 or self.state["step"] == 1:
                    record = {"step": self.state["step"], "epoch": epoch, "loss": step_loss, "lr": lr,
                              **{k: v for k, v in logs.items()}}  # fmt: skip
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    self.log(record)
                if train["checkpoint_every"] and self.state["step"] % train["checkpoint_every"] == 0:
                    self.save_checkpoint()
                if kill_after and self.state["step"] == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            self._end_epoch(epoch, losses, time.perf_counter() - epoch_start)
        if progress is not None:
            progress.close()
        return self._finish(time.perf_counter() - started)

    def _end_epoch(self, epoch: int, losses: list[float], seconds: float) -> None:
        train = self.config["train"]
        self.state["epoch"], self.state["batch"] = epoch + 1, 0
        metrics = self.evaluate() if (epoch + 1) % self.config["eval"]["every"] == 0 else {}
        if self.ctx.is_main:
            record = {"event": "epoch", "epoch": epoch, "step": self.state["step"], "seconds": round(seconds, 2),
                      "train_loss": sum(losses) / max(1, len(losses)), **metrics}  # fmt: skip
            self.log(record)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            if self.console:
                print(f"epoch {epoch + 1}/{train['epochs']}: train loss {record['train_loss']:.4g}"
                      + (f"; valid {shown}" if shown else ""), file=sys.stderr, flush=True)  # fmt: skip
            value = metrics.get(self.metric)
            better = value is not None and (self.state["best"] is None or (value < self.state["best"] if
                                            self.metric == "loss" else value > self.state["best"]))  # fmt: skip
            if better:
                self.state["best"], self.state["best_epoch"] = value, epoch
        self.state = dist_utils.broadcast_object(self.state, self.ctx)
        model_state, _ = dist_utils.full_state_dict(self.model)
        if self.ctx.is_main:
            if train["keep_epoch_checkpoints"] or train["average_last"]:
                atomic_save({"model": model_state}, self.out / f"epoch-{epoch}.pt")
            if not train["keep_epoch_checkpoints"] and epoch - train["average_last"] >= 0:
                (self.out / f"epoch-{epoch - train['average_last']}.pt").unlink(missing_ok=True)
            if self.state["best_epoch"] == epoch:
                self._save_weights("best", model_state)
            self.state["epochs_done"].append(epoch)
        self.state = dist_utils.broadcast_object(self.state, self.ctx)
        self.save_checkpoint()

    def _finish(self, seconds: float) -> dict[str, Any]:
        train = self.config["train"]
        summary: dict[str, Any] = {"seconds": round(seconds, 2), "steps": self.state["step"],
                                   f"best_{self.metric}": self.state["best"],
                                   "best_epoch": self.state["best_epoch"]}  # fmt: skip
        final_state, _ = dist_utils.full_state_dict(self.model)
        summary["final"] = self.evaluate()
        if self.ctx.is_main:
            path = self._save_weights("model", final_state)
            encoder = getattr(dist_utils.unwrap(self.model), "encoder", None)
            if encoder is not None and hasattr(encoder, "tympan_id"):  # MAE: the pretrained encoder on its own
                model = tympan.load(self.model_id, checkpoint=path)
                tympan.save(model.encoder, self.out / "encoder.safetensors")
        done = self.state["epochs_done"]
        if train["average_last"] and len(done) >= 2:
            chosen = done[-train["average_last"]:]
            averaged = average_checkpoints([self.out / f"epoch-{e}.pt" for e in chosen])
            summary["averaged_epochs"] = chosen
            summary["averaged"] = self._swap_evaluate(averaged)
            if self.ctx.is_main:
                self._save_weights("averaged", averaged)
        if self.ema is not None:
            ema_state = self.ema.state_dict()
            summary["ema"] = self._swap_evaluate(ema_state)
            if self.ctx.is_main:
                self._save_weights("ema", ema_state)
        if self.ctx.is_main:
            (self.out / "metrics.json").write_text(json.dumps(summary, indent=2))
            self.log({"event": "end", **summary})
        return summary


def frontend_settings(frontend: nn.Module | None) -> dict[str, Any]:
    """The scalar settings of a frontend (``mean``, ``std``, bins...) that its constructor or the trainer set, for the
    checkpoint sidecar; :func:`tympan.load` puts them back."""
    if frontend is None:
        return {}
    return {k: v for k, v in vars(frontend).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))}  # fmt: skip


def _identity(item: Any) -> Any:
    return item


def _batches(items: Any, size: int) -> Any:
    """Collated batches of `size` consecutive items; a last incomplete batch is dropped."""
    while True:
        chunk = list(itertools.islice(items, size))
        if len(chunk) < size:
            return
        yield collate_audio(chunk)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


@torch.no_grad()
def evaluate_model(model: nn.Module, objective: nn.Module, dataset: Any, prepare: Any, ctx: Any,
                   config: dict[str, Any], metric: str, autocast: Any) -> dict[str, float]:  # fmt: skip
    """Validation metrics: loss for self-supervised objectives; accuracy (single-label) or mAP/mAUC/d-prime
    (multi-label) from :mod:`tympan.eval.metrics`; for distillation also the student-teacher agreement (mAP of
    the student's teacher-class scores against the teacher's top-1 class). Rank 0 returns them."""
    was_training = model.training
    model.eval()
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False, remainder="pad")
    batch_size = max(1, config["eval"]["batch_size"] // ctx.world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_audio,
                                         num_workers=config["data"]["num_workers"])  # fmt: skip
    rows: dict[str, list[Tensor]] = {}
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        torch.manual_seed(config["train"]["seed"])
        for batch in loader:
            prepared = prepare(batch, None, train=False)
            with autocast():
                if isinstance(objective, ModelLossObjective):
                    loss, _ = objective(model, prepared)
                    outputs = {"loss": loss.float().reshape(1).expand(len(batch["index"]))}
                else:
                    outputs = objective.scores(model, prepared)
            outputs = {k: v.float().cpu() for k, v in outputs.items()}
            outputs["target"], outputs["index"] = prepared["target"].cpu(), batch["index"]
            for key, value in outputs.items():
                rows.setdefault(key, []).append(value)
    local = {k: torch.cat(v) for k, v in rows.items()}
    gathered = dist_utils.gather_objects(local, ctx)
    model.train(was_training)
    if not ctx.is_main:
        return {}
    merged = {k: torch.cat([g[k] for g in gathered]) for k in gathered[0]}
    keep = torch.zeros(len(merged["index"]), dtype=torch.bool)
    seen: set[int] = set()
    for i, index in enumerate(merged["index"].tolist()):  # drop the padding's repeats
        if index not in seen:
            seen.add(index)
            keep[i] = True
    merged = {k: v[keep] for k, v in merged.items()}
    if "loss" in merged:
        return {"loss": float(merged["loss"].mean())}
    scores, target = merged["scores"], merged["target"]
    out: dict[str, float] = {}
    if target.shape[-1] and target.shape[-1] == scores.shape[-1]:  # labels in the student's label space
        out.update(multilabel_metrics(scores, (target > 0.5).float()))
        if metric == "accuracy":
            out.update(singlelabel_metrics(scores, target.argmax(-1), top_k=()))
    if "teacher_scores" in merged:
        teacher = merged["teacher_scores"]
        top1 = torch.zeros_like(teacher).scatter(1, teacher.argmax(-1, keepdim=True), 1.0)
        out["teacher_agreement_mAP"] = multilabel_metrics(merged["student_teacher_scores"], top1)["mAP"]
        student_top1 = merged["student_teacher_scores"].argmax(-1)
        out["teacher_top1_match"] = float((student_top1 == teacher.argmax(-1)).float().mean())
    return {k: float(v) for k, v in out.items()}
