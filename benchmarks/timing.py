"""The benchmarks' one timer: contenders run alternately, so load drift on a shared machine hits all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def alternated_ms(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    reduce: Callable[[Sequence[float]], float] = statistics.median,
    sync: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Wall time in ms of each of `fns`: ``warmup`` untimed calls each, then ``repeats`` rounds calling each once,
    reduced per function by `reduce` (the median, or ``min`` for best-of). ``sync`` (e.g. a CUDA synchronise) runs
    before every clock read so that queued device work is counted. Grad mode is the caller's."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if sync is not None:
                sync()
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: reduce(t) for name, t in times.items()}
