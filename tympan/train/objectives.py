"""Training objectives: label losses, distillation from live or precomputed teachers, and model-side losses.

Every objective is called as ``objective(model, batch) -> (loss, logs)``: `loss` is the mean over this rank's
batch, `logs` a dict of detached scalars. ``batch`` holds ``inputs`` (what the model takes: features or
waveform), ``waveform`` (the augmented waveform, for live teachers), ``target`` ``[B, C]`` (multi-hot or mixed
soft labels) and, with precomputed teacher outputs, ``teacher_logits``.

Teachers are anything that maps a 16 kHz waveform batch to logits ``[B, Ct]``: :class:`ModelTeacher` (any
tympan model, in eval mode, no gradient) or :class:`OnnxLogits` around :class:`tympan.teachers.OnnxTeacher` /
:class:`~tympan.teachers.YAMNet` (their sigmoid scores turned back into logits). :func:`precompute_teacher_outputs`
stores a teacher's logits beside a datafile so that training does not run the teacher again.

Distillation losses (DASS ``dist_loss_type``, SAT/CED soft labels):

* ``kl``: ``KL(softmax(t / T) || softmax(s))``, batch mean, student not divided by T, no T^2 (DASS kldiv);
* ``bce``: ``BCEWithLogits(s, sigmoid(t / T))`` (or softmax), optionally on the teacher's top-k only (SAT);
* ``cosine``: ``1 - mean sigmoid(cos(s, t))`` over classes (DASS cosine); ``l2``: MSE of logits.

Label spaces (``label_map``): ``none`` (identical), ``mid`` (teacher classes matched to student classes by label
id, e.g. YAMNet's 521 AudioSet classes -> AudioSet 527; unmatched classes take no distillation loss) or
``append`` (the student's head is ``labels + teacher classes`` wide: labels on the first columns, the teacher's
classes distilled on the rest; e.g. an ESC-10 student learning YAMNet's 521 scores).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.labels import LabelSet
from tympan.models.protocol import audio_model

__all__ = [
    "DistillationObjective",
    "LabelObjective",
    "ModelLossObjective",
    "ModelTeacher",
    "OnnxLogits",
    "PrecomputedTeacher",
    "distillation_loss",
    "label_loss",
    "label_mapping",
    "precompute_teacher_outputs",
    "positionwise_cosine",
    "scores_embedding_loss",
    "to_logits",
]

Logs = dict[str, float]
PROB_EPS = 1e-7


def to_logits(outputs: Tensor, kind: str) -> Tensor:
    """A model's outputs as logits: unchanged for ``"logits"``, ``logit(p)`` (clamped) for ``"probabilities"``."""
    if kind == "probabilities":
        return torch.logit(outputs.float().clamp(PROB_EPS, 1 - PROB_EPS))
    return outputs.float()


def label_loss(logits: Tensor, target: Tensor, kind: str) -> Tensor:
    """``bce``: BCEWithLogits on (soft) multi-hot targets; ``ce``: cross-entropy against the target distribution
    (a one-hot target gives the usual CE of its argmax; mixup targets are normalised to sum 1)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "ce":
        distribution = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
        return -(distribution * logits.log_softmax(-1)).sum(-1).mean()
    raise ValueError(f"label loss must be 'bce' or 'ce', got {kind!r}")


def sparsify_top_k(probs: Tensor, k: int | None) -> Tensor:
    """Keep each row's `k` largest probabilities and zero the rest (SAT's top-10 soft labels)."""
    if k is None or k >= probs.shape[-1]:
        return probs
    values, indices = probs.topk(k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, indices, values)


def distillation_loss(student: Tensor, teacher: Tensor, loss: str = "kl", temperature: float = 1.0,
                      teacher_activation: str = "sigmoid", top_k: int | None = None) -> Tensor:  # fmt: skip
    """Distillation loss between student and teacher logits ``[B, C]`` (module docstring)."""
    student, teacher = student.float(), teacher.float().detach()
    if loss == "kl":
        return F.kl_div(student.log_softmax(-1), (teacher / temperature).log_softmax(-1), reduction="batchmean",
                        log_target=True)  # fmt: skip
    if loss == "bce":
        if teacher_activation == "softmax":
            probs = (teacher / temperature).softmax(-1)
        else:
            probs = torch.sigmoid(teacher / temperature)
        return F.binary_cross_entropy_with_logits(student, sparsify_top_k(probs, top_k))
    if loss == "cosine":
        return 1.0 - torch.sigmoid(F.cosine_similarity(student, teacher, dim=-1)).mean()
    if loss == "l2":
        return F.mse_loss(student, teacher)
    raise ValueError(f"distillation loss must be kl, bce, cosine or l2, got {loss!r}")


def label_mapping(mode: str, student_classes: int, teacher_labels: LabelSet | None, num_teacher: int,
                  student_labels: LabelSet | None = None, num_labels: int = 0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(student_columns, teacher_columns)``: which student outputs are distilled from which teacher outputs."""
    if mode == "none":
        if student_classes != num_teacher:
            raise ValueError(f"student has {student_classes} classes, teacher {num_teacher}: set a label_map "
                             "('mid' or 'append')")  # fmt: skip
        return torch.arange(num_teacher), torch.arange(num_teacher)
    if mode == "append":
        if student_classes != num_labels + num_teacher:
            raise ValueError(f"label_map 'append' needs a head of {num_labels} labels + {num_teacher} teacher classes "
                             f"= {num_labels + num_teacher} outputs, the student has {student_classes}")  # fmt: skip
        return num_labels + torch.arange(num_teacher), torch.arange(num_teacher)
    if mode == "mid":
        if teacher_labels is None or student_labels is None:
            raise ValueError("label_map 'mid' needs label ids for both the teacher and the student")
        position = {mid: i for i, mid in enumerate(student_labels.mids)}
        pairs = [(position[mid], t) for t, mid in enumerate(teacher_labels.mids) if mid in position]
        if not pairs:
            raise ValueError("label_map 'mid': the teacher and the student share no label id")
        student_cols, teacher_cols = zip(*pairs)
        return torch.tensor(student_cols), torch.tensor(teacher_cols)
    raise ValueError(f"label_map must be none, mid or append, got {mode!r}")


def model_frontend(model: nn.Module) -> nn.Module | None:
    """The model's frontend (``model.frontend`` of the protocol), ``None`` for a model that reads the waveform."""
    frontend = audio_model(model).frontend
    return None if isinstance(frontend, nn.Identity) else frontend


# ------------------------------------------------------------------------------------------ teachers
class ModelTeacher(nn.Module):
    """A frozen tympan model as a teacher: 16 kHz waveform ``[B, N]`` -> logits ``[B, C]``."""

    def __init__(self, model_id: str, checkpoint: str | None = None, **overrides: Any) -> None:
        super().__init__()
        import tympan
        if checkpoint is None:
            model = tympan.create_model(model_id, **overrides)
        else:
            model = tympan.load(model_id, checkpoint=None if checkpoint == "official" else checkpoint, **overrides)
        if not model.has_head:
            raise ValueError(f"teacher {model_id} is an encoder without classes")
        self.model = model.eval().requires_grad_(False)
        self.labels = model.labels if model.label_source else None  # generic names carry no label ids
        self.num_classes = model.num_classes

    def train(self, mode: bool = True) -> ModelTeacher:  # always frozen
        return super().train(False)

    @torch.no_grad()
    def forward(self, waveform: Tensor) -> Tensor:
        return self.model(self.model.frontend(waveform)).float()


class OnnxLogits(nn.Module):
    """An ONNX teacher (:class:`tympan.teachers.OnnxTeacher`, e.g. YAMNet) as waveform -> logits (clip mean of
    its window scores, then ``logit``)."""

    def __init__(self, teacher: Any) -> None:
        super().__init__()
        self.teacher = teacher
        self.labels = teacher.labels
        self.num_classes = teacher.num_classes

    @torch.no_grad()
    def forward(self, waveform: Tensor) -> Tensor:
        return to_logits(self.teacher(waveform.float().cpu()).to(waveform.device), "probabilities")


def build_teacher(spec: dict[str, Any]) -> nn.Module:
    """A live teacher from the ``objective.teacher`` config section."""
    kind = spec.get("kind")
    if kind == "tympan":
        return ModelTeacher(spec["id"], spec.get("checkpoint"), **(spec.get("overrides") or {}))
    if kind in ("onnx", "yamnet"):
        from tympan.teachers import OnnxTeacher, YAMNet

        if kind == "yamnet":
            return OnnxLogits(YAMNet(spec["path"], class_map=spec.get("labels")))
        return OnnxLogits(OnnxTeacher(spec["path"], labels=spec.get("labels")))
    raise ValueError(f"objective.teacher.kind must be tympan, onnx, yamnet or precomputed, got {kind!r}")


def teacher_outputs_path(datafile: str | os.PathLike, name: str) -> Path:
    """Where :func:`precompute_teacher_outputs` stores a teacher's outputs: beside the datafile."""
    datafile = Path(datafile)
    return datafile.with_name(f"{datafile.stem}.teacher-{name}.safetensors")


@torch.no_grad()
def precompute_teacher_outputs(teacher: Callable[[Tensor], Tensor], datafile: str | os.PathLike, name: str,
                               clip_seconds: float | None = None, batch_size: int = 32,
                               labels: LabelSet | None = None, out: str | os.PathLike | None = None) -> Path:  # fmt: skip
    """Run `teacher` (waveform -> logits) over every clip of `datafile` (cropped/padded from the start to
    `clip_seconds`) and store ``logits`` ``[N, C]`` with the clips' paths (and the teacher's label ids) in a
    safetensors file beside the datafile (:func:`teacher_outputs_path`)."""
    from tympan.data import AudioDataset, collate_audio
    from tympan.files import write_safetensors

    dataset = AudioDataset(datafile, None, clip_seconds=clip_seconds)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_audio)
    rows = [teacher(batch["waveform"]).float().cpu() for batch in loader]
    path = Path(out) if out is not None else teacher_outputs_path(datafile, name)
    metadata = {"paths": json.dumps([record.wav for record in dataset.manifest]), "teacher": name,
                "clip_seconds": json.dumps(clip_seconds)}  # fmt: skip
    if labels is not None:
        metadata["label_ids"] = json.dumps(list(labels.mids))
    return write_safetensors(path, {"logits": torch.cat(rows).contiguous()}, metadata)


class PrecomputedTeacher:
    """Teacher logits read back from :func:`precompute_teacher_outputs`, looked up by clip path."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            self.logits = f.get_tensor("logits")
            metadata = f.metadata()
        paths = json.loads(metadata["paths"])
        self.row = {p: i for i, p in enumerate(paths)}
        self.num_classes = self.logits.shape[1]
        self.labels = None
        if "label_ids" in metadata:
            mids = tuple(json.loads(metadata["label_ids"]))
            self.labels = LabelSet(mids, mids)

    def lookup(self, paths: Sequence[str]) -> Tensor:
        missing = [p for p in paths if p not in self.row]
        if missing:
            raise KeyError(f"no precomputed teacher output for {missing[0]}: recompute them for this datafile")
        return self.logits[[self.row[p] for p in paths]]


# ------------------------------------------------------------------------------------------ objectives
class LabelObjective(nn.Module):
    """Supervised training on labels (``bce`` or ``ce``) of a model returning logits (the model protocol)."""

    def __init__(self, kind: str, num_labels: int | None = None) -> None:
        super().__init__()
        self.kind, self.num_labels = kind, num_labels

    def logits(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return model(batch["inputs"]).float()

    def label_part(self, logits: Tensor) -> Tensor:
        return logits if self.num_labels is None else logits[:, : self.num_labels]

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Logs]:
        loss = label_loss(self.label_part(self.logits(model, batch)), batch["target"], self.kind)
        return loss, {"label_loss": float(loss.detach())}

    @torch.no_grad()
    def scores(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Evaluation outputs: ``scores`` (probabilities over the labels) and, when distilling, ``teacher_scores``."""
        logits = self.logits(model, batch)
        part = self.label_part(logits)
        return {"scores": part.softmax(-1) if self.kind == "ce" else torch.sigmoid(part), "logits": logits}


class DistillationObjective(LabelObjective):
    """``label_weight * label loss + weight * distillation loss`` (DASS: 0.5 / 0.5 with kl, T = 1)."""

    def __init__(self, kind: str, teacher: nn.Module | PrecomputedTeacher | None, student_columns: Tensor,
                 teacher_columns: Tensor, distill: dict[str, Any], label_weight: float,
                 num_labels: int | None = None) -> None:  # fmt: skip
        super().__init__(kind, num_labels)
        self.teacher = teacher
        self.register_buffer("student_columns", student_columns, persistent=False)
        self.register_buffer("teacher_columns", teacher_columns, persistent=False)
        self.distill, self.label_weight = distill, label_weight

    def teacher_logits(self, batch: dict[str, Any]) -> Tensor:
        if "teacher_logits" in batch:
            return batch["teacher_logits"]
        return self.teacher(batch["waveform"])

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Logs]:
        logits = self.logits(model, batch)
        teacher = self.teacher_logits(batch).to(logits.device)
        d = self.distill
        distill = distillation_loss(logits[:, self.student_columns], teacher[:, self.teacher_columns], d["loss"],
                                    d["temperature"], d["teacher_activation"], d.get("top_k"))  # fmt: skip
        loss = d["weight"] * distill
        logs = {"distill_loss": float(distill.detach())}
        if self.label_weight and batch["target"].shape[-1]:
            labels = label_loss(self.label_part(logits), batch["target"], self.kind)
            loss = loss + self.label_weight * labels
            logs["label_loss"] = float(labels.detach())
        return loss, logs

    @torch.no_grad()
    def scores(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        out = super().scores(model, batch)
        out["student_teacher_scores"] = torch.sigmoid(out["logits"][:, self.student_columns])
        out["teacher_scores"] = torch.sigmoid(self.teacher_logits(batch).float()[:, self.teacher_columns])
        return out


class ModelLossObjective(nn.Module):
    """Self-supervised models whose forward returns their own loss (SSAST MPC+MPG, MAE): a NamedTuple with
    ``loss`` first; its other scalar fields are logged. With `pass_lengths`, the model also gets the batch's
    ``input_lengths`` (real input frames per clip; SSAST then masks audio, not padding)."""

    def __init__(self, pass_lengths: bool = False) -> None:
        super().__init__()
        self.pass_lengths = pass_lengths

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Logs]:
        extra = {"lengths": batch["input_lengths"]} if self.pass_lengths else {}
        output = model(batch["inputs"], **extra)
        loss = output[0] if isinstance(output, tuple) else output
        logs = {"loss": float(loss.detach())}
        if hasattr(output, "_asdict"):
            logs.update({k: float(v.detach()) for k, v in output._asdict().items() if v.ndim == 0})
        return loss, logs


# ------------------------------------------------------------------------------------------ scores + embedding
def scores_embedding_loss(logits: Tensor, projected: Tensor | None, teacher_probs: Tensor,
                          teacher_embedding: Tensor | None, embed_weight: float = 1.0, temperature: float = 1.0,
                          logit_weight: float = 0.0, logit_floor: float = -8.0) -> tuple[Tensor, Logs]:  # fmt: skip
    """Distillation on a teacher's per-window class probabilities and embedding (the default model's objective).

    ``BCEWithLogits(logits, teacher_probs) + embed_weight * (1 - cos(projected, teacher_embedding))``, batch means:
    the student learns the teacher's multi-label scores and, through a projection of its own embedding, the
    direction of the teacher's embedding (YAMNet's 1024-d), which carries what a probe later reads.

    Two optional terms weigh what plain BCE barely sees, the order of the *unlikely* classes (a teacher score of
    0.02 against 0.002 moves BCE's gradient by 0.018; it decides which clips rank first for a rare class):
    ``temperature`` T > 1 compares ``sigmoid(z / T)`` (scaled by T^2, the usual distillation form) instead of the
    probabilities; ``logit_weight`` adds a Smooth-L1 between the logits, both floored at ``logit_floor`` (below it
    the teacher says "absent" and the exact value carries no ranking).
    """
    logits, teacher_probs = logits.float(), teacher_probs.float()
    teacher_logits = torch.logit(teacher_probs, eps=1e-7) if temperature != 1.0 or logit_weight else None
    if teacher_logits is None or temperature == 1.0:
        bce = F.binary_cross_entropy_with_logits(logits, teacher_probs)
    else:
        soft = torch.sigmoid(teacher_logits / temperature)
        bce = F.binary_cross_entropy_with_logits(logits / temperature, soft) * temperature**2
    logs: Logs = {"bce": float(bce.detach())}
    loss = bce
    if logit_weight:  # teacher_logits computed above
        matched = F.smooth_l1_loss(logits.clamp_min(logit_floor), teacher_logits.clamp_min(logit_floor))
        loss = loss + logit_weight * matched
        logs["logit"] = float(matched.detach())
    if projected is not None and teacher_embedding is not None and embed_weight:
        cosine = F.cosine_similarity(projected.float(), teacher_embedding.float(), dim=-1).mean()
        loss = loss + embed_weight * (1.0 - cosine)
        logs["cosine"] = float(cosine.detach())
    logs["loss"] = float(loss.detach())
    return loss, logs


def positionwise_cosine(student_map: Tensor, teacher_map: Tensor, min_norm: float = 1e-3) -> Tensor:
    """Mean cosine between two maps ``[P, D, H, W]`` position by position (over D), a per-position hint.

    A pooled embedding says what is in a 0.96 s patch; the teacher's last map before pooling also says *when* and
    *in which band*, six times the targets per patch. Positions where the teacher's vector is (near) zero (its ReLU
    silent everywhere) have no direction and are left out; with none left the result is 1 (nothing to match).
    """
    if student_map.shape != teacher_map.shape:
        raise ValueError(f"maps differ in shape: student {tuple(student_map.shape)}, teacher {tuple(teacher_map.shape)}")
    cosine = F.cosine_similarity(student_map.float(), teacher_map.float(), dim=1)  # [P, H, W]
    present = teacher_map.float().norm(dim=1) > min_norm
    if not bool(present.any()):
        return cosine.new_ones(())
    return cosine[present].mean()
