"""Learning-rate schedules of the seeds as pure functions of the optimiser step: a multiplier of the base lr.

* warm-up ``linear``: ``step / warmup`` every step (Dasheng/SAT/SSAM); ``ast``: AST/DASS's
  ``lr * step / 1000`` refreshed every 50 steps (so 0 for steps 0-49);
* ``cosine``: half-cycle from 1 to ``min_lr_ratio`` over the steps after warm-up (Dasheng 0.1, SAT 0.01/0.1,
  SSAM 0);
* ``multistep``: ``gamma ** (number of milestones passed)``, milestones in epochs (AST ``MultiStepLR`` stepped
  per epoch: milestones ``range(start, 1000, step)``);
* ``constant``.

A pure function of ``(step, steps_per_epoch)`` needs no state in checkpoints beyond the step count, and resumes
exactly.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

__all__ = ["lr_multiplier", "warmup_steps"]


def warmup_steps(schedule: dict[str, Any], steps_per_epoch: int) -> int:
    """Warm-up length in optimiser steps (``warmup_steps`` or ``warmup_epochs * steps_per_epoch``)."""
    return int(schedule.get("warmup_steps") or round(float(schedule.get("warmup_epochs") or 0) * steps_per_epoch))


def lr_multiplier(schedule: dict[str, Any], step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The factor applied to every parameter group's base lr at optimiser step `step` (0-based)."""
    warmup = warmup_steps(schedule, steps_per_epoch)
    if step < warmup:
        if schedule.get("warmup_style", "linear") == "ast":
            return (step - step % 50) / warmup
        return step / warmup
    kind = schedule["kind"]
    if kind == "constant":
        return 1.0
    if kind == "multistep":
        epoch = step // max(steps_per_epoch, 1)
        passed = bisect.bisect_right(sorted(int(m) for m in schedule.get("milestones", [])), epoch)
        return float(schedule.get("gamma", 0.5)) ** passed
    if kind == "cosine":
        floor = float(schedule.get("min_lr_ratio", 0.0))
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule kind {kind!r}")
