"""Waveform in, class probabilities out, for any registered tagger; and whole-file tagging on top of the streamer.

Everything goes through the model protocol (:class:`tympan.models.AudioModel`): ``model.frontend`` turns the
waveform into the model's input, ``model(features)`` gives logits and ``model.probabilities`` applies the head's
activation, so callers always see 16 kHz waveform -> probabilities whatever the family.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tympan.labels import LabelSet
from tympan.models.protocol import audio_model

SAMPLE_RATE = 16000
DEFAULT_WINDOW_SECONDS = 10.0  # the chunk for models that read any length in one pass (DASS, SSAM)


def window_seconds(model: nn.Module) -> float:
    """The audio span a model was trained to see at once (its natural chunk for long inputs)."""
    seconds = audio_model(model).window_seconds
    return DEFAULT_WINDOW_SECONDS if seconds is None else seconds


class Tagger(nn.Module):
    """A tagging model behind one contract: ``tagger(waveform [B, N] at 16 kHz) -> probabilities [B, C]``."""

    def __init__(self, model: nn.Module, labels: LabelSet | None = None):
        super().__init__()
        model = audio_model(model)
        if not model.has_head:
            name = getattr(model, "tympan_id", type(model).__name__)
            raise ValueError(f"{name} is an encoder without a classification head: it has no tags to give")
        self.model = model
        self.window_seconds = window_seconds(model)
        self._labels = labels

    @property
    def labels(self) -> LabelSet:
        return self._labels if self._labels is not None else self.model.labels

    def forward(self, waveform: Tensor) -> Tensor:
        return self.model.predict(waveform)


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
    """Tag a file of any length chunk by chunk at bounded memory (streaming models carry their state across chunks).

    ``chunk_seconds`` defaults to the model's own window (10.24 s for AST, 2 s for SAT-2s, ...); a file shorter than
    one chunk is tagged as one partial chunk.
    """
    from tympan import audio
    from tympan.inference.streaming import Streamer

    reader = audio.stream(path, block_seconds=block_seconds, sample_rate=SAMPLE_RATE, mono=True)  # one open
    with reader, (_progress_bar(reader.info.duration, path) if progress else contextlib.nullcontext()) as bar:
        total = reader.info.duration
        streamer = Streamer(model, chunk_seconds=chunk_seconds if chunk_seconds is not None else _default_chunk(model))
        tags = FileTags(str(path))
        for result in streamer.run_blocks(reader):
            tags.starts.append(result.start)
            tags.ends.append(result.end)
            tags.chunk_probs.append(result.output[0])
            if bar is not None:
                bar.update(round(result.end - result.start, 2))
    if not tags.chunk_probs:
        raise ValueError(f"{path}: too short to tag ({total:.3f} s)")
    return tags


def _progress_bar(seconds: float, path: str | os.PathLike) -> Any:
    """A file's bar in seconds (built only when shown: tqdm costs more than tagging a short file's setup)."""
    from tqdm.auto import tqdm

    return tqdm(total=round(seconds, 2), unit="s", desc=os.path.basename(str(path)))


def tags_or_error(tag: Callable[[], FileTags]) -> FileTags | Exception:
    """``tag()``, or the error of a file that cannot be tagged (bad audio, too short: an
    :class:`~tympan.audio.AudioError` or ``ValueError``), returned so that a batch job goes on past it. A chunk
    shorter than the model's step (:class:`~tympan.inference.streaming.ChunkTooShortError`) fails every file alike
    and propagates."""
    from tympan.audio import AudioError
    from tympan.inference.streaming import ChunkTooShortError

    try:
        return tag()
    except ChunkTooShortError:
        raise
    except (AudioError, ValueError) as err:
        return err


def tag_files(
    model: nn.Module,
    paths: Iterable[str | os.PathLike],
    chunk_seconds: float | None = None,
    workers: int = 1,
    progress: bool = False,
) -> Iterator[tuple[str | os.PathLike, FileTags | Exception]]:
    """Tag many files: ``(path, tags)`` in input order, or ``(path, error)`` for a file that failed (bad audio,
    too short: an :class:`~tympan.audio.AudioError` or ``ValueError``), so one bad file does not stop the rest.

    ``workers > 1`` tags that many files at once in threads (torch and libsndfile release the GIL). This is how a
    small model such as tymnet-s uses several cores: its ops are too small to split over threads, whole files are
    not. Results are the same as one at a time. ``progress`` shows one bar per file with one worker, one bar over
    the files with several. Other exceptions (e.g. a ``--chunk`` shorter than the model's step) propagate.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    paths = list(paths)

    def one(path: str | os.PathLike, bar: bool) -> FileTags | Exception:
        return tags_or_error(lambda: tag_file(model, path, chunk_seconds=chunk_seconds, progress=bar))

    if workers == 1 or len(paths) < 2:
        for path in paths:
            yield path, one(path, progress)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(min(workers, len(paths)), thread_name_prefix="tympan-tag") as pool, \
            tqdm(total=len(paths), unit="file", disable=not progress) as bar:  # fmt: skip
        pending: deque = deque()
        for path in paths:  # a bounded window of files in flight: results are yielded (and freed) in order
            pending.append((path, pool.submit(one, path, False)))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
                bar.update()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
            bar.update()


def _default_chunk(model: nn.Module) -> float | None:
    """Streaming models pick their own chunk (the Streamer's default); window models their window."""
    return None if audio_model(model).streaming else window_seconds(model)
