"""Tar shards in the webdataset layout: pack a datafile, stream it back across ranks and workers.

Each sample is two consecutive tar members sharing a key: ``{key}.flac`` (or the original file's suffix) and
``{key}.json``, the datafile entry (``wav`` = the source path, ``labels``, ``fold``, ``split``, ...) plus
``duration`` and ``sample_rate``. Shards are named ``{prefix}-{NNNNNN}.tar``; ``index.json`` beside them lists
the shards with their sample counts, which is what lets readers split an epoch at sample level without
opening every shard first. Plain ``tarfile``: any webdataset reader can read the shards too.

>>> write_shards("train.json", "shards/", max_samples_per_shard=1000)
>>> data = ShardDataset("shards/", labels="labels.csv", clip_seconds=10, train=True, shuffle_buffer=512)
>>> loader = DataLoader(data, batch_size=32, num_workers=4, collate_fn=collate_audio)
>>> for epoch in range(epochs):
...     data.set_epoch(epoch)          # reshuffles shard order and buffer; crops follow (seed, epoch, sample)

How an epoch is split (exactly once across ranks x workers, whatever the shard count): the epoch's order is the
shards (shuffled by ``(seed, epoch)`` when `shuffle`) concatenated, ``N`` samples in all. Each rank takes a
contiguous, balanced piece of it (:func:`tympan.data.sampling.part_range` with the `remainder` policy:
``"uneven"`` exact once, ``"drop"``/``"pad"`` equal counts per rank for DDP), and each DataLoader worker a
contiguous piece of its rank's piece. A worker reads only the shards its piece overlaps, skipping the members
before its first sample by their tar headers. So 3 shards over 8 workers, or 100 shards of different sizes over
3 ranks, still give every sample to exactly one worker.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from tympan.audio import DEFAULT_SAMPLE_RATE, AudioError, Quality, from_array, info
from tympan.data.datasets import Augment, ClipPipeline, EvalCrop, Item
from tympan.data.manifest import Manifest, MultiHot, Record, as_manifest
from tympan.data.sampling import Remainder, distributed_info, part_range, seeded_generator
from tympan.labels import LabelSet

__all__ = [
    "INDEX_NAME",
    "ShardDataset",
    "ShardIndex",
    "read_shard_index",
    "write_shards",
]

logger = logging.getLogger("tympan.data")

INDEX_NAME = "index.json"
INDEX_FORMAT = "tympan-shards/1"
AUDIO_SUFFIXES = ("flac", "wav", "ogg", "mp3", "opus", "oga", "aiff", "aif", "au", "w64")
AudioFormat = Literal["flac", "original"]
# Source subtype -> (dtype read, FLAC subtype written). Integer PCM round-trips bit-exactly; anything else
# (float, 32-bit, lossy codecs) is written as 24-bit FLAC.
_FLAC_SUBTYPES = {"PCM_S8": ("int16", "PCM_S8"), "PCM_U8": ("int16", "PCM_S8"), "PCM_16": ("int16", "PCM_16"),
                  "PCM_24": ("int32", "PCM_24")}  # fmt: skip


@dataclass(frozen=True)
class ShardIndex:
    """A set of shards: their paths and sample counts (``index.json``), plus what packing skipped."""

    path: Path  # the index file
    shards: tuple[Path, ...]
    counts: tuple[int, ...]
    skipped: tuple[str, ...] = field(default=(), compare=False)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


# ------------------------------------------------------------------------------------------------ writing
def _key_for(path: str, taken: set[str]) -> str:
    """A webdataset key from a file stem: no dots (they separate the suffix), unique within the set."""
    stem = re.sub(r"[^0-9A-Za-z_\-]", "_", Path(path).stem) or "sample"
    key, n = stem, 1
    while key in taken:
        key, n = f"{stem}_{n}", n + 1
    taken.add(key)
    return key


def _audio_bytes(record: Record, audio_format: AudioFormat) -> tuple[bytes, str, float, int]:
    """(bytes, suffix, duration, sample rate) of a record's audio; AudioError if it cannot be read."""
    header = info(record.wav)
    path = Path(record.wav)
    if audio_format == "original" or header.format == "FLAC":
        return path.read_bytes(), path.suffix.lower().lstrip(".") or "audio", header.duration, header.sample_rate
    dtype, subtype = _FLAC_SUBTYPES.get(header.subtype, ("float32", "PCM_24"))
    try:
        samples, rate = sf.read(path, dtype=dtype, always_2d=True)
        buffer = io.BytesIO()
        sf.write(buffer, samples, rate, subtype=subtype, format="FLAC")
    except (sf.SoundFileError, RuntimeError, ValueError) as err:
        raise AudioError(path, f"cannot convert to FLAC ({err})") from None
    return buffer.getvalue(), "flac", header.duration, header.sample_rate


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mode, member.mtime = len(payload), 0o444, 0  # reproducible shards
    tar.addfile(member, io.BytesIO(payload))


def write_shards(
    datafile: Manifest | Iterable[Record] | str | os.PathLike,
    out_dir: str | os.PathLike,
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int | None = None,
    audio_format: AudioFormat = "flac",
    shuffle_seed: int | None = None,
    prefix: str = "shard",
    progress: bool = False,
) -> ShardIndex:
    """Pack a datafile's clips into tar shards plus ``index.json`` in `out_dir` (see the module docstring).

    ``audio_format="flac"`` stores FLAC (FLAC sources as is, integer PCM losslessly, other sources as 24-bit
    FLAC); ``"original"`` stores the source files' bytes. A shard closes at `max_samples_per_shard` samples or
    once it holds `max_shard_bytes`. `shuffle_seed` shuffles the clips before packing (mixes classes across
    shards). Clips that cannot be read are logged and skipped (listed in ``index.json`` ``skipped``).
    """
    if max_samples_per_shard < 1:
        raise ValueError(f"max_samples_per_shard must be at least 1, got {max_samples_per_shard}")
    if audio_format not in ("flac", "original"):
        raise ValueError(f"audio_format must be 'flac' or 'original', got {audio_format!r}")
    manifest = as_manifest(datafile)
    records = list(manifest)
    if shuffle_seed is not None:
        records = [records[i] for i in torch.randperm(len(records), generator=seeded_generator(shuffle_seed))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[tuple[str, int]] = []
    skipped: list[str] = []
    taken: set[str] = set()
    tar: tarfile.TarFile | None = None
    count = size = 0

    def close() -> None:
        if tar is not None:
            tar.close()
            shards.append((f"{prefix}-{len(shards):06d}.tar", count))

    if progress:
        from tqdm.auto import tqdm

        records = tqdm(records, desc="packing", unit="clip")
    for record in records:
        try:
            payload, suffix, duration, rate = _audio_bytes(record, audio_format)
        except (AudioError, OSError) as err:
            logger.warning("not packing %s: %s", record.wav, err)
            skipped.append(record.wav)
            continue
        if tar is None or count >= max_samples_per_shard or (max_shard_bytes is not None and size >= max_shard_bytes):
            close()
            tar = tarfile.open(out / f"{prefix}-{len(shards):06d}.tar", "w", format=tarfile.USTAR_FORMAT)
            count = size = 0
        key = _key_for(record.wav, taken)
        meta = {**record.to_json(), "duration": round(duration, 6), "sample_rate": rate}
        _add_member(tar, f"{key}.{suffix}", payload)
        _add_member(tar, f"{key}.json", json.dumps(meta).encode())
        count, size = count + 1, size + len(payload)
    close()
    document = {
        "format": INDEX_FORMAT,
        "num_samples": sum(n for _, n in shards),
        "audio_format": audio_format,
        "source": str(manifest.source) if manifest.source else None,
        "shards": [{"name": name, "num_samples": n} for name, n in shards],
        "skipped": skipped,
    }
    index_path = out / INDEX_NAME
    index_path.write_text(json.dumps(document, indent=1) + "\n")
    return read_shard_index(index_path)


# ------------------------------------------------------------------------------------------------ reading
def _tar_groups(path: Path) -> Iterator[tuple[str, list[tarfile.TarInfo], tarfile.TarFile]]:
    """(key, members) of consecutive members sharing a key (webdataset: basename up to its first dot)."""
    with tarfile.open(path, "r:") as tar:
        key, members = None, []
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            member_key = f"{folder}/{base.partition('.')[0]}" if folder else base.partition(".")[0]
            if member_key != key and members:
                yield key, members, tar
                members = []
            key = member_key
            members.append(member)
        if members:
            yield key, members, tar


def _count_samples(path: Path) -> int:
    return sum(1 for _ in _tar_groups(path))


def read_shard_index(source: str | os.PathLike | Sequence[str | os.PathLike]) -> ShardIndex:
    """Shards from an ``index.json``, a folder holding one, or tar paths (counted by reading their headers)."""
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        if source.is_dir() and (source / INDEX_NAME).is_file():
            source = source / INDEX_NAME
        if source.is_file() and source.suffix == ".json":
            try:
                document = json.loads(source.read_text())
                entries = document["shards"]
                shards = tuple(source.parent / e["name"] for e in entries)
                counts = tuple(int(e["num_samples"]) for e in entries)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{source}: not a shard index ({err})") from None
            return ShardIndex(source, shards, counts, tuple(document.get("skipped", ())))
        tars = sorted(source.glob("*.tar")) if source.is_dir() else [source]
    else:
        tars = [Path(p) for p in source]
    missing = [str(p) for p in tars if not p.is_file()]
    if not tars or missing:
        raise ValueError(f"no shards found at {source}" + (f" (missing: {', '.join(missing)})" if missing else ""))
    return ShardIndex(tars[0].parent / INDEX_NAME, tuple(tars), tuple(_count_samples(p) for p in tars))


@dataclass
class _RawSample:
    index: int  # position in the index's (unshuffled) order: a stable id
    key: str
    shard: Path
    audio: bytes | None
    meta: dict[str, Any]


def _segments(counts: Sequence[int], order: Sequence[int], positions: range) -> Iterator[tuple[int, int, int, int]]:
    """Map epoch positions (modulo the total) to ``(shard, first, stop, first_index)`` runs within shards."""
    total = sum(counts)
    offsets = np.cumsum([0, *counts])  # in the index's order
    epoch_starts = np.cumsum([0, *(counts[s] for s in order)])
    position = positions.start
    while position < positions.stop:
        wrapped = position % total
        slot = int(np.searchsorted(epoch_starts, wrapped, side="right")) - 1
        shard = order[slot]
        first = wrapped - int(epoch_starts[slot])
        take = min(counts[shard] - first, positions.stop - position)
        yield shard, first, first + take, int(offsets[shard]) + first
        position += take


class ShardDataset(ClipPipeline, torch.utils.data.IterableDataset):
    """Stream the samples of tar shards as item dicts (as :class:`AudioDataset`, plus ``key``).

    `shards` is an ``index.json``, its folder, or a list of tar paths. Each rank and DataLoader worker yields
    its own contiguous piece of the epoch (module docstring), so across ranks x workers every sample comes
    once per epoch (``remainder="uneven"``). `shuffle` permutes the shard order per epoch; `shuffle_buffer`
    (> 1) shuffles samples within a worker's stream through a buffer of that many (still encoded) samples.
    Both are seeded by ``(seed, epoch)``, as are training crops. ``len()`` is this rank's sample count.
    Samples that fail to decode are logged, skipped and counted in the next item's ``skipped``.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike] | ShardIndex,
        labels: LabelSet | MultiHot | str | os.PathLike | None = None,
        sample_rate: int | None = DEFAULT_SAMPLE_RATE,
        clip_seconds: float | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        augment: Augment | None = None,
        train: bool = False,
        eval_crop: EvalCrop = "start",
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        remainder: Remainder = "uneven",
        mono: bool = True,
        quality: Quality = "HQ",
    ) -> None:
        super().__init__(labels, sample_rate, clip_seconds, train, eval_crop, transform, augment, seed)
        self.index = shards if isinstance(shards, ShardIndex) else read_shard_index(shards)
        self.num_replicas, self.rank = distributed_info(num_replicas, rank)
        part_range(0, 1, 0, remainder)  # validates the policy name
        self.shuffle, self.shuffle_buffer, self.remainder = shuffle, shuffle_buffer, remainder
        self.mono, self.quality = mono, quality
        self.num_skipped = 0  # in this process

    def __len__(self) -> int:
        return len(part_range(self.index.num_samples, self.num_replicas, self.rank, self.remainder))

    def shard_order(self) -> list[int]:
        """This epoch's shard order (identical on every rank and worker)."""
        count = len(self.index.shards)
        if not self.shuffle:
            return list(range(count))
        return torch.randperm(count, generator=seeded_generator(self.seed, self.epoch)).tolist()

    def worker_positions(self) -> range:
        """Epoch positions this rank's current DataLoader worker reads."""
        rank_positions = part_range(self.index.num_samples, self.num_replicas, self.rank, self.remainder)
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            return rank_positions
        piece = part_range(len(rank_positions), worker.num_workers, worker.id, "uneven")
        return range(rank_positions.start + piece.start, rank_positions.start + piece.stop)

    def _raw_samples(self, positions: range) -> Iterator[_RawSample]:
        for shard, first, stop, first_index in _segments(self.index.counts, self.shard_order(), positions):
            path = self.index.shards[shard]
            read = 0
            try:
                for ordinal, (key, members, tar) in enumerate(_tar_groups(path)):
                    if ordinal >= stop:
                        break
                    if ordinal >= first:
                        read += 1
                        yield self._read_group(first_index + ordinal - first, key, path, members, tar)
            except (OSError, tarfile.TarError) as err:
                logger.warning("cannot read shard %s: %s", path, err)
            if read < stop - first:
                self.num_skipped += stop - first - read
                logger.warning("shard %s: %d samples fewer than its index lists", path, stop - first - read)

    @staticmethod
    def _read_group(index: int, key: str, path: Path, members: list[tarfile.TarInfo],
                    tar: tarfile.TarFile) -> _RawSample:  # fmt: skip
        by_suffix = {m.name.rpartition("/")[2].partition(".")[2].lower(): m for m in members}
        audio_member = next((by_suffix[s] for s in AUDIO_SUFFIXES if s in by_suffix), None)
        audio = tar.extractfile(audio_member).read() if audio_member is not None else None
        meta: dict[str, Any] = {}
        if "json" in by_suffix:
            try:
                meta = json.loads(tar.extractfile(by_suffix["json"]).read())
            except ValueError:
                meta = {}
        return _RawSample(index, key, path, audio, meta)

    def _buffered(self, samples: Iterator[_RawSample], positions: range) -> Iterator[_RawSample]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        generator = seeded_generator(self.seed, self.epoch, positions.start)
        buffer: list[_RawSample] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                pick = int(torch.randint(len(buffer), (1,), generator=generator))
                buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                yield buffer.pop()
        for pick in torch.randperm(len(buffer), generator=generator).tolist():
            yield buffer[pick]

    def _decode(self, sample: _RawSample) -> np.ndarray:
        where = f"{sample.shard}:{sample.key}"
        if sample.audio is None:
            raise AudioError(where, "no audio member in the sample")
        try:
            frames, rate = sf.read(io.BytesIO(sample.audio), dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError, ValueError) as err:
            raise AudioError(where, f"corrupt or undecodable audio ({err})") from None
        if not len(frames):
            raise AudioError(where, "no audio samples (0 frames)")
        try:
            return from_array(frames.T, rate, self.sample_rate, self.mono, self.quality)
        except AudioError as err:
            raise AudioError(where, err.reason) from None

    def __iter__(self) -> Iterator[Item]:
        positions = self.worker_positions()
        pending_skips = 0
        for sample in self._buffered(self._raw_samples(positions), positions):
            try:
                samples = self._decode(sample)
                record = Record.from_json(sample.meta) if "wav" in sample.meta else Record(wav=sample.key)
                item = self.make_item(samples, record.labels, sample.index, record.wav)
            except (AudioError, TypeError, ValueError) as err:
                self.num_skipped += 1
                pending_skips += 1
                logger.warning("skipping shard sample: %s", err)
                continue
            item["key"], item["skipped"] = sample.key, pending_skips
            pending_skips = 0
            yield item
