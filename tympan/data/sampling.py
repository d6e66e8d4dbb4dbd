"""Samplers: label-balanced sampling (AST/DASS, SAT) and an exactly-once split over distributed ranks.

>>> weights = balanced_weights(manifest)                           # AST: sum of 1000 / (count + 0.01)
>>> sampler = DistributedSampler(BalancedSampler(weights, seed=0), shuffle=False)   # one slice per rank
>>> for epoch in range(epochs):
...     sampler.set_epoch(epoch)                                   # forwarded to the wrapped sampler

The split rule (:func:`part_range`) is shared with :class:`tympan.data.ShardDataset`: the epoch's order of N
items is cut into contiguous, balanced pieces, one per part (rank, or rank x worker). What happens to the
``N % parts`` leftover items is explicit (`remainder`):

- ``"uneven"``: the first ``N % parts`` parts take one item more; every item is seen exactly once per epoch.
- ``"drop"``: every part takes ``N // parts``; the last ``N % parts`` items of the epoch order are left out.
- ``"pad"``: every part takes ``ceil(N / parts)``; the order is extended cyclically from its start (as
  ``torch.utils.data.DistributedSampler``), so a few items are seen twice.

DDP training needs the same number of batches on every rank: use ``"pad"`` or ``"drop"`` there (or
``torch.distributed.algorithms.Join``); ``"uneven"`` is for evaluation, where in rank order the pieces
concatenate back to the epoch order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence, Sized
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from tympan.data.manifest import Manifest

__all__ = [
    "BalancedSampler",
    "DistributedSampler",
    "Remainder",
    "balanced_weights",
    "distributed_info",
    "part_range",
    "seeded_generator",
]

Remainder = Literal["uneven", "drop", "pad"]
REMAINDERS = ("uneven", "drop", "pad")


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (e.g. seed, epoch, index); distinct keys, independent streams."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def distributed_info(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """``(num_replicas, rank)``: the given values, else torch.distributed's when initialised, else ``(1, 0)``."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=}, {rank=}")
    return num_replicas, rank


def part_range(num_items: int, num_parts: int, part: int, remainder: Remainder = "uneven") -> range:
    """Positions in the epoch order that `part` of `num_parts` takes (see the module docstring).

    With ``"pad"`` positions may reach past ``num_items``: read them modulo ``num_items``.
    """
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {', '.join(REMAINDERS)}, got {remainder!r}")
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} out of range for {num_parts} parts")
    base, extra = divmod(num_items, num_parts)
    if remainder == "uneven":
        start = part * base + min(part, extra)
        return range(start, start + base + (part < extra))
    size = base if remainder == "drop" else math.ceil(num_items / num_parts)
    return range(part * size, (part + 1) * size)


# ------------------------------------------------------------------------------------------ balancing
def balanced_weights(labels: Manifest | Sequence[Sequence[str]], scale: float = 1000.0,
                     smoothing: float = 0.01) -> Tensor:  # fmt: skip
    """Per-clip sampling weights: the sum over the clip's labels of ``scale / (count + smoothing)``.

    `count` is the number of clips carrying the label. AST/DASS ``gen_weight_file.py``: scale 1000, smoothing
    0.01; SAT's BalancedSampler: smoothing 100. A clip without labels gets weight 0. Returns float64 ``[N]``.
    """
    label_lists = [record.labels for record in labels] if isinstance(labels, Manifest) else labels
    vocabulary: dict[str, int] = {}
    rows, columns = [], []
    for row, clip_labels in enumerate(label_lists):
        for label in set(clip_labels):
            rows.append(row)
            columns.append(vocabulary.setdefault(label, len(vocabulary)))
    rows_t, columns_t = torch.tensor(rows, dtype=torch.long), torch.tensor(columns, dtype=torch.long)
    counts = torch.bincount(columns_t, minlength=len(vocabulary)).double()
    label_weight = scale / (counts + smoothing)
    return torch.zeros(len(label_lists), dtype=torch.float64).index_add_(0, rows_t, label_weight[columns_t])


class BalancedSampler(Sampler[int]):
    """Draw `num_samples` indices (default: as many as weights) with replacement, proportional to `weights`.

    Like ``WeightedRandomSampler(weights, num_samples, replacement=True)`` (AST's ``--bal bal``, SAT's
    200,000 draws per epoch), but seeded by ``(seed, epoch)``: every rank draws the same sequence, so it can be
    wrapped by :class:`DistributedSampler`. No limit on the number of clips (inverse-CDF draws).
    """

    def __init__(self, weights: Tensor | Sequence[float], num_samples: int | None = None, seed: int = 0) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.weights.ndim != 1 or not len(self.weights):
            raise ValueError("weights must be a non-empty 1-D sequence")
        if bool((self.weights < 0).any()) or not bool(torch.isfinite(self.weights).all()):
            raise ValueError("weights must be finite and non-negative")
        if not float(self.weights.sum()) > 0:
            raise ValueError("weights must not all be zero")
        self.num_samples = len(self.weights) if num_samples is None else int(num_samples)
        self.seed, self.epoch = seed, 0
        cumulative = torch.cumsum(self.weights, 0)
        self._cdf = cumulative / cumulative[-1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> Tensor:
        """This epoch's draws as a long tensor."""
        u = torch.rand(self.num_samples, generator=seeded_generator(self.seed, self.epoch), dtype=torch.float64)
        return torch.searchsorted(self._cdf, u, right=True).clamp_max(len(self.weights) - 1)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


# ------------------------------------------------------------------------------------------ distribution
class DistributedSampler(Sampler[int]):
    """This rank's contiguous slice of an epoch order, so that the ranks together see it exactly once.

    `source` is a dataset (or its length), which gives the order ``0..N-1``, or a sampler whose order every
    rank reproduces (seeded, e.g. :class:`BalancedSampler`; ``set_epoch`` is forwarded). `shuffle` permutes
    the order with a generator seeded by ``(seed, epoch)``, identical on all ranks. `remainder` is the
    policy for ``N % num_replicas`` (module docstring). Ranks default to torch.distributed's.
    """

    def __init__(
        self,
        source: Sized | Sampler[int] | int,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        remainder: Remainder = "uneven",
    ) -> None:
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {', '.join(REMAINDERS)}, got {remainder!r}")
        self.num_replicas, self.rank = distributed_info(num_replicas, rank)
        self.source, self.shuffle, self.seed, self.remainder = source, shuffle, seed, remainder
        self.epoch = 0

    def _num_items(self) -> int:
        return self.source if isinstance(self.source, int) else len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles; forwarded to a wrapped sampler)."""
        self.epoch = int(epoch)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def epoch_order(self) -> Tensor:
        """The whole epoch's order before splitting, identical on every rank."""
        if isinstance(self.source, Sampler):
            order = self.source.indices() if hasattr(self.source, "indices") else torch.tensor(list(self.source))
        else:
            order = torch.arange(self._num_items())
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=seeded_generator(self.seed, self.epoch))]
        return order

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        if not len(order):
            return iter(())
        positions = part_range(len(order), self.num_replicas, self.rank, self.remainder)
        return iter(order[torch.arange(positions.start, positions.stop) % len(order)].tolist())

    def __len__(self) -> int:
        return len(part_range(self._num_items(), self.num_replicas, self.rank, self.remainder))
