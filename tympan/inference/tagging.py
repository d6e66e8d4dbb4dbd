"""Waveform in, class probabilities out, for any registered tagger; and whole-file tagging on top of the streamer.

Models differ in what they take (the waveform, or a frontend's features) and what they return (logits, or
probabilities with the sigmoid inside, or embeddings): the registry records both (``ModelEntry.input_kind`` and
``ModelEntry.output``), and :class:`Tagger` bridges them so callers always see 16 kHz waveform -> probabilities.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tympan.labels import LabelSet, get_label_set
from tympan.models.registry import ModelEntry, get_model_entry

SAMPLE_RATE = 16000
HOP_SECONDS = 0.01


def model_entry(model: nn.Module) -> ModelEntry | None:
    """The registry entry a model was built from (``None`` for a model built outside the registry)."""
    model_id = getattr(model, "tympan_id", None)
    return get_model_entry(model_id) if model_id is not None else None


def input_frontend(model: nn.Module) -> nn.Module | None:
    """The frontend that turns a waveform batch into ``model``'s input, or ``None`` if it takes the waveform.

    Fixed-length models (AST/SSAST: a learned positional embedding per patch) get their features padded or cropped to
    the model's ``input_tdim``; length-free models (DASS) get the clip's own length.
    """
    entry = model_entry(model)
    if entry is None or entry.input_kind == "waveform":
        return None
    from tympan.features import get_frontend

    kwargs = {}
    if entry.input_kind == "ast-fbank":
        kwargs["target_length"] = getattr(model, "input_tdim", None)
    return get_frontend(entry.input_kind, **kwargs)


def window_seconds(model: nn.Module) -> float:
    """The audio span a model was trained to see at once (its natural chunk for long inputs)."""
    for attr in ("input_tdim", "target_length"):
        frames = getattr(model, attr, None)
        if isinstance(frames, int) and frames > 0:
            return round(frames * HOP_SECONDS, 2)
    return 10.0


class Tagger(nn.Module):
    """A tagging model behind one contract: ``tagger(waveform [B, N] at 16 kHz) -> probabilities [B, C]``."""

    def __init__(self, model: nn.Module, labels: LabelSet | None = None):
        super().__init__()
        entry = model_entry(model)
        if entry is not None and entry.output == "embeddings":
            raise ValueError(f"{entry.name} is an encoder without a classification head: it has no tags to give")
        self.model = model
        self.frontend = input_frontend(model)
        self.apply_sigmoid = entry is None or entry.output == "logits"
        self.window_seconds = window_seconds(model)
        self._labels = labels
        self._label_name = entry.labels if entry is not None else None

    @property
    def labels(self) -> LabelSet:
        if self._labels is None:
            config = getattr(self.model, "tympan_config", {})
            num_classes = config.get("num_classes", getattr(self.model, "num_classes", None))
            if num_classes is None:
                raise ValueError("the model does not say how many classes it has; pass labels=")
            self._labels = get_label_set(self._label_name, num_classes)
        return self._labels

    def forward(self, waveform: Tensor) -> Tensor:
        x = self.frontend(waveform) if self.frontend is not None else waveform
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return torch.sigmoid(out) if self.apply_sigmoid else out


@dataclass
class FileTags:
    """Per-chunk probabilities of one file and their clip-level mean."""

    path: str
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    chunk_probs: list[Tensor] = field(default_factory=list)

    @property
    def probs(self) -> Tensor:
        """Clip-level probabilities: the mean over chunks (the seeds' ``eval_avg='mean'`` for long inputs)."""
        return torch.stack(self.chunk_probs).mean(0)

    @property
    def timeline(self) -> Tensor:
        """``[chunks, classes]`` probabilities over time."""
        return torch.stack(self.chunk_probs)


def tag_file(
    model: nn.Module,
    path: str | os.PathLike,
    chunk_seconds: float | None = None,
    block_seconds: float = 60.0,
    progress: bool = False,
) -> FileTags:
    """Tag a file of any length chunk by chunk at bounded memory (SAT models carry their memory across chunks).

    ``chunk_seconds`` defaults to the model's own window (10.24 s for AST, 2 s for SAT-2s, ...); a file shorter than
    one chunk is tagged as one partial chunk.
    """
    from tqdm.auto import tqdm

    from tympan import audio
    from tympan.inference.streaming import Streamer

    total = audio.info(path).duration
    streamer = Streamer(model, chunk_seconds=chunk_seconds if chunk_seconds is not None else _default_chunk(model))
    tags = FileTags(str(path))
    with tqdm(total=round(total, 2), unit="s", desc=os.path.basename(str(path)), disable=not progress) as bar:
        for result in streamer.run_file(path, block_seconds=block_seconds):
            tags.starts.append(result.start)
            tags.ends.append(result.end)
            tags.chunk_probs.append(result.output[0])
            bar.update(round(result.end - result.start, 2))
    if not tags.chunk_probs:
        raise ValueError(f"{path}: too short to tag ({total:.3f} s)")
    return tags


def _default_chunk(model: nn.Module) -> float | None:
    from tympan.models.sat import SAT

    return None if isinstance(model, SAT) else window_seconds(model)
