"""Map-style audio dataset over a datafile, the per-clip pipeline shared with the shard reader, and collation.

Every item is a dict: ``waveform`` (float32 ``[N]``, or ``[channels, N]`` with ``mono=False``) or, when a
`transform` is given, ``features`` (its output); ``length`` (valid samples before zero-padding, or the
features' time size), ``target`` (multi-hot float ``[C]``; ``[0]`` without a label set), ``index``, ``path``
and ``skipped`` (1 when this item stands in for a clip that failed to decode, else 0).

A clip that fails to decode (:class:`tympan.audio.AudioError`) never ends an epoch: it is logged once per
process, remembered, and (``on_error="replace"``) replaced by the next decodable index, deterministically, or
(``on_error="skip"``) returned as ``None`` for :func:`collate_audio` to drop. The batch's ``skipped`` entry
sums the failures, so they stay visible across DataLoader worker processes; in-process,
:attr:`AudioDataset.failed` lists them.

Randomness (training crops, per-item augmentation) comes from a generator seeded by ``(seed, epoch, index)``,
so results do not depend on the number of workers or on the order of access. Call :meth:`set_epoch` before each
epoch (with ``persistent_workers=True`` the workers keep the epoch their copy was made with).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from tympan.audio import DEFAULT_SAMPLE_RATE, AudioError, Quality, load
from tympan.data.manifest import Manifest, MultiHot, Record, as_manifest
from tympan.data.sampling import seeded_generator
from tympan.labels import LabelSet

__all__ = ["AudioDataset", "ClipPipeline", "Collate", "collate_audio", "crop_offset", "crop_or_pad"]

logger = logging.getLogger("tympan.data")

Item = dict[str, Any]
EvalCrop = Literal["start", "center"]
OnError = Literal["replace", "skip", "raise"]
Augment = Callable[..., Tensor]


def crop_or_pad(waveform: Tensor, length: int, offset: int = 0) -> Tensor:
    """``waveform[..., offset:offset + length]``, zero-padded at the end to exactly `length` samples."""
    clip = waveform[..., offset : offset + length]
    missing = length - clip.shape[-1]
    return torch.nn.functional.pad(clip, (0, missing)) if missing > 0 else clip


def crop_offset(num_samples: int, length: int, mode: Literal["random", "start", "center"],
                generator: torch.Generator | None = None) -> int:  # fmt: skip
    """Where a `length`-sample window starts in a clip of `num_samples` (0 when the clip is not longer)."""
    spare = num_samples - length
    if spare <= 0 or mode == "start":
        return 0
    if mode == "center":
        return spare // 2
    return int(torch.randint(0, spare + 1, (1,), generator=generator))


def _as_multi_hot(labels: LabelSet | MultiHot | str | os.PathLike | None) -> MultiHot | None:
    if labels is None or isinstance(labels, MultiHot):
        return labels
    return MultiHot(labels)


class ClipPipeline:
    """What both datasets do to a decoded clip: crop or pad, augment, transform, encode labels.

    `clip_seconds` crops (randomly when `train`, else at the `eval_crop` position) and zero-pads at the end;
    `augment(waveform[None], generator=g)` runs on the clip as a batch of one with the item's generator;
    `transform(waveform)` turns it into features (e.g. a frontend).
    """

    def __init__(
        self,
        labels: LabelSet | MultiHot | str | os.PathLike | None = None,
        sample_rate: int | None = DEFAULT_SAMPLE_RATE,
        clip_seconds: float | None = None,
        train: bool = False,
        eval_crop: EvalCrop = "start",
        transform: Callable[[Tensor], Tensor] | None = None,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        if clip_seconds is not None and not clip_seconds > 0:
            raise ValueError(f"clip_seconds must be positive, got {clip_seconds!r}")
        if clip_seconds is not None and sample_rate is None:
            raise ValueError("clip_seconds needs a sample_rate (None keeps each file's own rate)")
        if eval_crop not in ("start", "center"):
            raise ValueError(f"eval_crop must be 'start' or 'center', got {eval_crop!r}")
        self.encoder = _as_multi_hot(labels)
        self.sample_rate = sample_rate
        self.clip_samples = None if clip_seconds is None else round(clip_seconds * sample_rate)
        self.train, self.eval_crop = train, eval_crop
        self.transform, self.augment = transform, augment
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops and augmentations are drawn."""
        self.epoch = int(epoch)

    def target(self, label_ids: Sequence[str]) -> Tensor:
        return self.encoder(label_ids) if self.encoder is not None else torch.zeros(0)

    def make_item(self, samples: np.ndarray, label_ids: Sequence[str], index: int, path: str) -> Item:
        """Decoded float32 samples -> an item dict (see the module docstring)."""
        waveform = torch.from_numpy(np.ascontiguousarray(samples))
        generator = seeded_generator(self.seed, self.epoch, index) if (self.train or self.augment) else None
        length = waveform.shape[-1]
        if self.clip_samples is not None:
            mode = "random" if self.train else self.eval_crop
            offset = crop_offset(length, self.clip_samples, mode, generator)
            waveform = crop_or_pad(waveform, self.clip_samples, offset)
            length = min(length - offset, self.clip_samples)
        if self.augment is not None:
            waveform = self.augment(waveform[None], generator=generator)[0]
        item: Item = {"target": self.target(label_ids), "index": index, "path": path, "skipped": 0}
        if self.transform is None:
            item.update(waveform=waveform, length=length)
        else:
            features = self.transform(waveform)
            item.update(features=features, length=features.shape[0])
        return item


class AudioDataset(ClipPipeline, torch.utils.data.Dataset):
    """Clips of a datafile, decoded and resampled to `sample_rate` on access (see the module docstring).

    `datafile` is a JSON datafile path, a :class:`Manifest` or a list of records; `labels` a label set, a
    label CSV path or None (targets of size 0, for self-supervised training).
    """

    def __init__(
        self,
        datafile: Manifest | Iterable[Record] | str | os.PathLike,
        labels: LabelSet | MultiHot | str | os.PathLike | None = None,
        sample_rate: int | None = DEFAULT_SAMPLE_RATE,
        clip_seconds: float | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        augment: Augment | None = None,
        train: bool = False,
        eval_crop: EvalCrop = "start",
        seed: int = 0,
        mono: bool = True,
        quality: Quality = "HQ",
        on_error: OnError = "replace",
    ) -> None:
        super().__init__(labels, sample_rate, clip_seconds, train, eval_crop, transform, augment, seed)
        if on_error not in ("replace", "skip", "raise"):
            raise ValueError(f"on_error must be 'replace', 'skip' or 'raise', got {on_error!r}")
        self.manifest = as_manifest(datafile)
        if not len(self.manifest):
            raise ValueError("the datafile lists no clips")
        if self.encoder is not None:
            for record in self.manifest:  # fail now, with the label's name, rather than mid-epoch
                self.encoder.indices(record.labels)
        self.mono, self.quality, self.on_error = mono, quality, on_error
        self.failed: dict[int, str] = {}  # index -> reason, for clips that failed in this process

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def num_skipped(self) -> int:
        """Clips that failed to decode in this process (in workers: see the batches' ``skipped``)."""
        return len(self.failed)

    def _decode(self, index: int) -> np.ndarray | None:
        if index in self.failed:
            return None
        try:
            return load(self.manifest[index].wav, self.sample_rate, self.mono, self.quality)
        except AudioError as err:
            if self.on_error == "raise":
                raise
            self.failed[index] = err.reason
            logger.warning("skipping clip %d: %s", index, err)
            return None

    def __getitem__(self, index: int) -> Item | None:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        index %= len(self)
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            samples = self._decode(candidate)
            if samples is not None:
                record = self.manifest[candidate]
                item = self.make_item(samples, record.labels, candidate, record.wav)
                item["skipped"] = int(step > 0)
                return item
            if self.on_error == "skip":
                return None
        raise RuntimeError(f"none of the {len(self)} clips of the datafile could be decoded")


class Collate:
    """Batch item dicts: pad ``waveform`` (last axis) or ``features`` (axis `feature_time_dim`) to the longest.

    Returns ``waveform``/``features`` ``[B, ...]``, ``lengths`` (long ``[B]``), ``target`` ``[B, C]``,
    ``index`` (long ``[B]``), ``path`` (list), ``key`` (list, shard items only) and ``skipped`` (int: failed
    clips behind this batch, counting items dropped as ``None``).
    """

    def __init__(self, feature_time_dim: int = 0, pad_value: float = 0.0) -> None:
        self.feature_time_dim, self.pad_value = feature_time_dim, pad_value

    def _pad(self, tensors: list[Tensor], dim: int) -> Tensor:
        dim = dim % tensors[0].ndim
        longest = max(t.shape[dim] for t in tensors)
        out = tensors[0].new_full((len(tensors), *tensors[0].shape[:dim], longest, *tensors[0].shape[dim + 1 :]),
                                  self.pad_value)  # fmt: skip
        for row, tensor in zip(out, tensors):
            row.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
        return out

    def __call__(self, items: Sequence[Item | None]) -> dict[str, Any]:
        kept = [item for item in items if item is not None]
        skipped = len(items) - len(kept) + sum(item["skipped"] for item in kept)
        if not kept:  # every clip of the batch failed: an empty batch the loop can skip
            empty = torch.zeros(0, dtype=torch.long)
            return {"lengths": empty, "index": empty, "path": [], "skipped": skipped}
        name, dim = ("waveform", -1) if "waveform" in kept[0] else ("features", self.feature_time_dim)
        batch: dict[str, Any] = {
            name: self._pad([item[name] for item in kept], dim),
            "lengths": torch.tensor([item["length"] for item in kept], dtype=torch.long),
            "target": torch.stack([item["target"] for item in kept]),
            "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
            "path": [item["path"] for item in kept],
            "skipped": skipped,
        }
        if "key" in kept[0]:
            batch["key"] = [item["key"] for item in kept]
        return batch


collate_audio = Collate()
"""Default collation: waveforms padded on the last axis, features ``[T, F]`` padded on the time axis."""
