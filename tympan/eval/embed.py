"""Embeddings of a whole datafile through the HEAR wrapper, into ONE file that :mod:`tympan.eval.probe` reads.

Each clip of a JSON datafile (:func:`tympan.data.read_datafile`) is decoded at 16 kHz mono, optionally cropped or
zero-padded to ``clip_seconds``, and embedded with :class:`tympan.hear.HearModel`: its scene embedding
(``pooling="scene"``) or its timestamp embeddings pooled over time (``"mean"``, ``"max"``, ``"meanmax"`` = both,
concatenated). Consecutive clips of equal length run as one batch.

The result is a ``tympan.embeddings.v1`` safetensors file (:func:`tympan.eval.probe.save_embeddings`): ``embeddings
[N, D]`` in datafile order, ``keys`` = the clips' paths, and ``info`` holding the model id, checkpoint, pooling,
``labels`` / ``folds`` / ``splits`` per row and the ``skipped`` files with their reasons.

Long runs are resumable: every ``save_every`` clips the rows done so far go to ``<output>.partial.safetensors``; a
new run with the same model and settings reuses them (files that failed before are reported again, not retried).
A file that cannot be decoded is reported and skipped, never fatal.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from tympan.hear import SAMPLE_RATE, HearModel

POOLINGS = ("scene", "mean", "max", "meanmax")
PARTIAL_SUFFIX = ".partial.safetensors"

__all__ = ["EmbedResult", "POOLINGS", "embed_datafile", "embed_main", "pool_embeddings", "report"]


@dataclass
class EmbedResult:
    """Where the embeddings went, how many rows, and which files were skipped (path, reason)."""

    path: Path
    rows: int
    dim: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reused: int = 0


def pool_embeddings(model: HearModel, audio: Tensor, pooling: str) -> Tensor:
    """``[n, samples]`` -> ``[n, D]`` (``2 D`` for ``meanmax``): the scene embedding or pooled timestamp embeddings."""
    if pooling == "scene":
        return model.scene_embeddings(audio)
    frames, _ = model.timestamp_embeddings(audio)
    if pooling == "mean":
        return frames.mean(1)
    if pooling == "max":
        return frames.amax(1)
    if pooling == "meanmax":
        return torch.cat([frames.mean(1), frames.amax(1)], dim=1)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def _signature(model: HearModel, pooling: str, clip_seconds: float | None, checkpoint: str | None) -> dict[str, Any]:
    return {"model": model.model_id, "checkpoint": checkpoint, "pooling": pooling, "clip_seconds": clip_seconds,
            "sample_rate": SAMPLE_RATE}  # fmt: skip


def _load_partial(path: Path, signature: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Rows and failures of a previous run with the same signature (empty if none or different)."""
    from tympan.eval.probe import load_embeddings

    if not path.is_file():
        return {}, {}
    try:
        stored = load_embeddings(path)
    except ValueError:
        return {}, {}
    if {k: stored.info.get(k) for k in signature} != signature:
        return {}, {}
    rows = dict(zip(stored.keys, stored.embeddings))
    return rows, {p: r for p, r in stored.info.get("skipped", [])}


def _save_atomic(path: Path, embeddings: np.ndarray, keys: Sequence[str], info: dict[str, Any]) -> None:
    from tympan.eval.probe import save_embeddings

    from tympan.files import atomic_write

    # a temporary of its own (pid + random suffix): two runs writing one output never share one
    atomic_write(path, lambda tmp: save_embeddings(tmp, embeddings, list(keys), info))


def _load_clip(path: str, clip_samples: int | None) -> np.ndarray:
    from tympan import audio

    if clip_samples is None:
        samples = audio.load(path, sample_rate=SAMPLE_RATE, mono=True)
    else:  # decode only the clip's first clip_samples: a 1 h file costs one block, not the whole file
        pieces, have = [], 0
        for block in audio.stream(path, block_seconds=max(1.0, clip_samples / SAMPLE_RATE), sample_rate=SAMPLE_RATE):
            pieces.append(block[: clip_samples - have])
            have += len(pieces[-1])
            if have >= clip_samples:
                break
        samples = np.concatenate(pieces)
        samples = np.pad(samples, (0, max(0, clip_samples - samples.shape[0])))
    if samples.shape[0] < 400:
        raise ValueError(f"{path}: {samples.shape[0]} samples, shorter than one 25 ms frame")
    return samples


def _equal_length_batches(
    paths: Sequence[str], clip_samples: int | None, batch_size: int, failed: dict[str, str]
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Decoded clips grouped into runs of equal length (at most ``batch_size``); failures go into ``failed``."""
    batch: list[str] = []
    clips: list[np.ndarray] = []
    for path in paths:
        try:
            clip = _load_clip(path, clip_samples)
        except (ValueError, OSError) as err:  # AudioError is a ValueError: one line naming file and reason
            failed[path] = str(err).removeprefix(f"{path}: ")
            continue
        if clips and (clip.shape[0] != clips[0].shape[0] or len(clips) == batch_size):
            yield batch, np.stack(clips)
            batch, clips = [], []
        batch.append(path)
        clips.append(clip)
    if clips:
        yield batch, np.stack(clips)


def _embed_batch(
    model: HearModel, paths: list[str], clips: np.ndarray, pooling: str, failed: dict[str, str]
) -> list[tuple[str, np.ndarray]]:
    """Embeddings of one batch; a clip the model rejects (e.g. shorter than one patch) is recorded in ``failed``.

    Equal-length batches fail or succeed together, so a rejected batch is the one case that is retried clip by clip
    (to name the clip and keep the others)."""
    try:
        return list(zip(paths, pool_embeddings(model, torch.from_numpy(clips), pooling).cpu().numpy()))
    except ValueError as err:
        if len(paths) == 1:
            failed[paths[0]] = str(err)
            return []
    return [row for i, path in enumerate(paths) for row in _embed_batch(model, [path], clips[i : i + 1], pooling, failed)]


def embed_datafile(
    model: HearModel,
    datafile: str | os.PathLike,
    output: str | os.PathLike,
    *,
    pooling: str = "scene",
    clip_seconds: float | None = None,
    batch_size: int = 8,
    save_every: int = 64,
    checkpoint: str | None = None,
    progress: bool = True,
) -> EmbedResult:
    """Embed every clip of ``datafile`` into ``output`` (see the module docstring); returns an :class:`EmbedResult`."""
    from tqdm.auto import tqdm

    from tympan.data import load_dataset

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if batch_size < 1 or save_every < 1:
        raise ValueError("batch_size and save_every must be >= 1")
    records = load_dataset(datafile).manifest  # a datafile, a dataset CSV, class folders, a file list
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + PARTIAL_SUFFIX)
    signature = _signature(model, pooling, clip_seconds, checkpoint)
    done, failed = _load_partial(partial, signature)
    reused = len(done)
    todo = [r.wav for r in records if r.wav not in done and r.wav not in failed]
    clip_samples = None if clip_seconds is None else int(round(clip_seconds * SAMPLE_RATE))

    def checkpoint_rows() -> None:
        keys = list(done)
        rows = np.stack([done[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)
        _save_atomic(partial, rows, keys, {**signature, "skipped": sorted(failed.items())})

    unsaved = 0
    with tqdm(total=len(records), initial=len(records) - len(todo), unit="clip", disable=not progress,
              desc=os.path.basename(str(datafile))) as bar:  # fmt: skip
        for paths, clips in _equal_length_batches(todo, clip_samples, batch_size, failed):
            done.update(_embed_batch(model, paths, clips, pooling, failed))
            unsaved += len(paths)
            bar.update(len(paths))
            if unsaved >= save_every:
                checkpoint_rows()
                unsaved = 0
        bar.update(len(records) - bar.n)
    kept = [r for r in records if r.wav in done]
    if not kept:
        raise ValueError(f"{datafile}: no clip could be embedded ({len(failed)} failed)")
    embeddings = np.stack([done[r.wav] for r in kept]).astype(np.float32)
    info = {
        **signature,
        "datafile": str(datafile),
        "labels": [list(r.labels) for r in kept],
        "folds": [r.fold for r in kept],
        "splits": [r.split for r in kept],
        "skipped": sorted(failed.items()),
    }
    _save_atomic(output, embeddings, [r.wav for r in kept], info)
    partial.unlink(missing_ok=True)
    return EmbedResult(output, len(kept), embeddings.shape[1], sorted(failed.items()), reused)


def report(result: EmbedResult, what: str) -> None:
    """The one-line summary of an embedding run (``what``: pooling and model) and one line per skipped file."""
    print(f"{result.path}: {result.rows} clips x {result.dim} ({what})"
          + (f", {result.reused} reused from a previous run" if result.reused else ""))
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason}")


def embed_main(
    model_id: str | None,
    datafile: str | os.PathLike,
    output: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    pooling: str = "scene",
    clip_seconds: float | None = None,
    batch_size: int = 8,
    save_every: int = 64,
    device: str = "cpu",
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    pretrained: bool = True,
    precision: str = "fp32",
) -> EmbedResult:
    """``tympan embed``: load ``model_id`` (official weights, ``checkpoint``, or random with ``pretrained=False``) in
    ``precision``, embed ``datafile`` (any source :func:`tympan.data.load_dataset` reads) into ``output``, print a
    one-line summary and the skipped files.

    Without `model_id`, the model a `checkpoint` sidecar names (a trained run's), else the default model; without
    `clip_seconds`, the clip length the checkpoint was trained on (else each clip whole)."""
    from tympan.hear import load_model

    if model_id is None:
        model_id = _sidecar_model_id(checkpoint)
    model = load_model(checkpoint or "", model_id=model_id, pretrained=pretrained, precision=precision,
                       **(overrides or {})).to(device)
    if clip_seconds is None:
        clip_seconds = (getattr(model.model, "tympan_extra", None) or {}).get("clip_seconds")
    result = embed_datafile(model, datafile, output, pooling=pooling, clip_seconds=clip_seconds,
                            batch_size=batch_size, save_every=save_every, checkpoint=checkpoint, progress=progress)  # fmt: skip
    report(result, f"{pooling}, {model_id}")
    return result


def _sidecar_model_id(checkpoint: str | None) -> str:
    """The model id a tympan checkpoint's sidecar names; the default model without a checkpoint."""
    from tympan.checkpoints import CheckpointError, sidecar_path
    from tympan.models import DEFAULT_MODEL

    if not checkpoint:
        return DEFAULT_MODEL
    sidecar = sidecar_path(checkpoint)
    try:
        return str(json.loads(Path(sidecar).read_text())["model_id"])
    except (OSError, ValueError, KeyError):
        raise CheckpointError(f"{checkpoint}: no sidecar {Path(sidecar).name} naming the model; give --model ID") from None
