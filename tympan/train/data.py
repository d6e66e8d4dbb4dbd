"""The trainer's data side: datafile/shard datasets from the config, record selection, and the epoch order that
makes N ranks see exactly the global batches one process would.

Epoch order (datafile training): the clips are shuffled by ``(seed, epoch)`` and cut into global batches of
``batch_size``; :class:`GlobalBatchOrder` rearranges that order so that the data package's
:class:`~tympan.data.DistributedSampler` (contiguous, balanced slices) hands rank ``r`` the ``r``-th piece of
every global batch. One process and N processes therefore train on the same global batches, and every clip is
seen once per epoch (with ``drop_last``, the last incomplete global batch is left out, as SSAST's loaders do).
:class:`SkipSampler` starts an epoch at a given batch, for mid-epoch resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from tympan.data import (
    AudioDataset,
    BalancedSampler,
    DistributedSampler,
    Manifest,
    ShardDataset,
    balanced_weights,
    read_datafile,
    seeded_generator,
)
from tympan.data.manifest import esc10_datafile, fsdd_datafile
from tympan.labels import LabelSet, read_label_csv
from tympan.train.config import ConfigError, check_selection

__all__ = ["CachedAudioDataset", "GlobalBatchOrder", "SkipSampler", "resolve_datafile", "select_records"]

_RECORD_FIELDS = ("fold", "split", "labels", "wav", "duration")


def _field(record: Any, key: str) -> Any:
    return getattr(record, key) if key in _RECORD_FIELDS else record.extra.get(key)


def _has_field(record: Any, key: str) -> bool:
    return key in _RECORD_FIELDS or key in record.extra


def _matches(value: Any, condition: Any, key: str) -> bool:
    if isinstance(condition, dict):  # {min: a, max: b}, inclusive; nothing else is a range
        unknown = [k for k in condition if k not in ("min", "max")]
        if unknown or not condition:
            raise ConfigError(f"range selection {key} takes min and max, got {sorted(map(str, condition))}")
        if value is None:
            return False
        try:
            return condition.get("min", value) <= value <= condition.get("max", value)
        except TypeError:
            raise ConfigError(f"range selection {key}: cannot compare the datafile's {value!r} with "
                              f"{condition}") from None  # fmt: skip
    if isinstance(condition, (list, tuple)):
        return value in condition
    return value == condition


def select_records(manifest: Manifest, selection: dict[str, Any] | list[dict[str, Any]] | None,
                   where: str = "selection") -> Manifest:  # fmt: skip
    """Records whose fields match every condition: a value, a list of values, or ``{min, max}`` (inclusive).

    Keys are record fields (``fold``, ``split``...) or extra datafile fields (FSDD's ``take``, ``speaker``).
    A list of selections keeps the records matching any of them. A malformed selection, a field no record
    has, or one that matches nothing is a :class:`ConfigError` naming `where` (``data.train``).
    """
    if not selection:
        return manifest
    check_selection(selection, where)
    alternatives = selection if isinstance(selection, list) else [selection]
    for choice in alternatives:
        for key in choice:
            if not any(_has_field(r, key) for r in manifest):
                raise ConfigError(f"{where}.{key}: no record of {manifest.source or 'the datafile'} has field {key!r}")
    kept = [r for r in manifest
            if any(all(_matches(_field(r, k), c, f"{where}.{k}") for k, c in choice.items())
                   for choice in alternatives)]  # fmt: skip
    if not kept:
        raise ConfigError(f"{where}: no record of {manifest.source or 'the datafile'} matches {selection}")
    return Manifest(kept, manifest.source)


def resolve_datafile(data: dict[str, Any], out_dir: Path) -> tuple[Path, Path | None]:
    """``(datafile, label CSV)``: the configured paths, or the built-in converters' output for ``fsdd``/``esc10``.

    A list of datafiles (self-supervised pretraining on several datasets) is merged into ``data/merged.json``
    in the run folder, without labels.
    """
    datafile, labels = data["datafile"], data["labels"]
    if isinstance(datafile, list):
        from tympan.data import write_datafile

        records = [r for one in datafile for r in read_datafile(resolve_datafile({**data, "datafile": one}, out_dir)[0])]
        return write_datafile(records, out_dir / "data" / "merged.json"), (Path(labels) if labels else None)
    if datafile in ("fsdd", "esc10"):
        if not data.get("root"):
            raise ValueError(f"data.datafile={datafile!r} needs data.root (the shared data folder)")
        convert = fsdd_datafile if datafile == "fsdd" else esc10_datafile
        paths = convert(data["root"], out_dir / "data")
        return paths.datafile, Path(labels) if labels else paths.labels
    source = Path(datafile)
    if source.is_dir() or source.suffix.lower() != ".json":  # a dataset CSV, class folders, a file list
        from tympan.data import import_dataset

        paths, _ = import_dataset(source, out_dir / "data", root=data.get("root") or None)
        imported, beside = (paths.datafile, paths.labels) if hasattr(paths, "labels") else (paths, None)
        return imported, Path(labels) if labels else beside
    beside = source.with_name(f"{source.stem}_labels.csv")  # what `tympan data` writes next to the datafile
    return source, Path(labels) if labels else (beside if beside.is_file() else None)


def read_labels(path: Path | None) -> LabelSet | None:
    return read_label_csv(path) if path is not None else None


class CachedAudioDataset(AudioDataset):
    """:class:`AudioDataset` that keeps decoded clips in memory (small datasets; decode once, not every epoch)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cache: dict[int, np.ndarray | None] = {}

    def _decode(self, index: int) -> np.ndarray | None:
        if index not in self._cache:
            self._cache[index] = super()._decode(index)
        return self._cache[index]


class GlobalBatchOrder(Sampler[int]):
    """An epoch order arranged so that contiguous per-rank slices hold each rank's piece of every global batch.

    The plain order is ``randperm(N)`` seeded by ``(seed, epoch)`` (``arange`` without shuffle), truncated to
    whole global batches when `drop_last`. Element ``j`` of rank ``r``'s slice is item
    ``(j // b) * B + r * b + j % b`` of the plain order (``B`` global, ``b = B / ranks`` local batch).
    """

    def __init__(self, num_items: int, global_batch: int, num_replicas: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, balanced: BalancedSampler | None = None) -> None:  # fmt: skip
        if global_batch % num_replicas:
            raise ValueError(f"batch size {global_batch} does not split evenly over {num_replicas} ranks")
        self.balanced = balanced  # draws replace the shuffle (AST/DASS --bal, SAT's sampler)
        if balanced is not None:
            num_items = len(balanced)
        if drop_last and num_items < global_batch:
            raise ValueError(f"{num_items} clips make no full batch of {global_batch}")
        self.num_items, self.global_batch, self.num_replicas = num_items, global_batch, num_replicas
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.balanced is not None:
            self.balanced.set_epoch(epoch)

    def plain_order(self) -> torch.Tensor:
        if self.balanced is not None:
            order = self.balanced.indices()
        elif self.shuffle:
            order = torch.randperm(self.num_items, generator=seeded_generator(self.seed, self.epoch))
        else:
            order = torch.arange(self.num_items)
        usable = len(order) - len(order) % self.global_batch
        if not self.drop_last and usable < len(order):  # pad the last global batch from the epoch's start
            order = torch.cat([order, order[: self.global_batch - len(order) % self.global_batch]])
            usable = len(order)
        return order[:usable]

    def indices(self) -> torch.Tensor:
        order = self.plain_order()
        local = self.global_batch // self.num_replicas
        # [batches, ranks, local] -> [ranks, batches, local]: rank r's slice is contiguous
        return order.view(-1, self.num_replicas, local).transpose(0, 1).reshape(-1)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        full, rest = divmod(self.num_items, self.global_batch)
        return (full + (0 if self.drop_last or not rest else 1)) * self.global_batch


class SkipSampler(Sampler[int]):
    """The first `skip` indices of `sampler` left out (resuming an epoch after the batches already trained)."""

    def __init__(self, sampler: Sampler[int], skip: int = 0) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        iterator = iter(self.sampler)
        for _ in range(self.skip):
            next(iterator, None)
        return iterator

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def rank_sampler(num_items: int, global_batch: int, ctx: Any, seed: int, drop_last: bool,
                 balanced: BalancedSampler | None = None) -> DistributedSampler:  # fmt: skip
    """This rank's training order: :class:`GlobalBatchOrder` split by the data package's DistributedSampler."""
    order = GlobalBatchOrder(num_items, global_batch, ctx.world_size, shuffle=True, seed=seed, drop_last=drop_last,
                             balanced=balanced)  # fmt: skip
    return DistributedSampler(order, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False, remainder="uneven")


def build_datasets(config: dict[str, Any], out_dir: Path, ctx: Any) -> dict[str, Any]:
    """Training and validation datasets with their label set (see :mod:`tympan.train.trainer`)."""
    data, seed = config["data"], config["train"]["seed"]
    common = dict(sample_rate=data["sample_rate"], clip_seconds=data["clip_seconds"])
    labels_path: Path | None = Path(data["labels"]) if data["labels"] else None
    manifest = None
    if data["datafile"] is not None:
        datafile, labels_path = resolve_datafile(data, out_dir)
        manifest = read_datafile(datafile)
    labels = read_labels(labels_path)
    label_arg = labels_path if labels is not None else None
    if data["shards"] is not None:
        train = ShardDataset(data["shards"], label_arg, train=True, shuffle=True, shuffle_buffer=0, seed=seed,
                             num_replicas=ctx.world_size, rank=ctx.rank, remainder="drop", **common)  # fmt: skip
    else:
        dataset_cls = CachedAudioDataset if data["cache"] else AudioDataset
        train = dataset_cls(select_records(manifest, data["train"], "data.train"), label_arg, train=True, seed=seed, **common)
    valid = None
    if data["valid"] is not None and manifest is not None:
        dataset_cls = CachedAudioDataset if data["cache"] else AudioDataset
        valid = dataset_cls(select_records(manifest, data["valid"], "data.valid"), label_arg, train=False, seed=seed, **common)
    balanced = None
    if data["balanced"] is not None and isinstance(train, AudioDataset):
        options = {"scale": 1000.0, "smoothing": 0.01, "num_samples": None} | dict(data["balanced"])
        weights = balanced_weights(train.manifest, options["scale"], options["smoothing"])
        balanced = BalancedSampler(weights, options["num_samples"], seed=seed)
    return {"train": train, "valid": valid, "labels": labels, "datafile": None if manifest is None else datafile,
            "balanced": balanced}


class FeatureCache(torch.utils.data.Dataset):
    """A dataset's model inputs computed once (``data.precompute_features``): items carry ``features`` instead
    of ``waveform``. For small datasets whose augmentation acts on features only (SpecAugment, noise + roll):
    crops are those of epoch 0 and never redrawn."""

    def __init__(self, dataset: Any, frontend: Any, batch_size: int = 64) -> None:
        from tympan.data import collate_audio

        self.dataset = dataset
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_audio)
        features, targets, paths = [], [], []
        with torch.no_grad():
            for batch in loader:
                features.append(frontend(batch["waveform"]))
                targets.append(batch["target"])
                paths.extend(batch["path"])
        self.features, self.targets, self.paths = torch.cat(features), torch.cat(targets), paths

    def set_epoch(self, epoch: int) -> None:
        """Nothing to redraw: the features are fixed."""

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"features": self.features[index], "length": self.features.shape[1], "target": self.targets[index],
                "index": index, "path": self.paths[index], "skipped": 0}  # fmt: skip
