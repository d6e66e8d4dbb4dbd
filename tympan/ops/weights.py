"""When a cache derived from weights (packed copies, BatchNorm-folded weights, K/V memos) must be rebuilt."""

from __future__ import annotations

import operator
from collections.abc import Sequence

from torch import Tensor

__all__ = ["fingerprint"]

_VERSION = operator.attrgetter("_version")


def fingerprint(tensors: Sequence[Tensor]) -> tuple[int, ...] | None:
    """Storage address and version counter of each tensor, as one tuple: a cache built from the tensors stays valid
    while their fingerprint is equal (an in-place change moves the version, ``.data =`` or ``.to`` the address).
    ``None`` when one is an inference tensor, which keeps no version counter (reading it raises): nothing may be
    cached from it. C-level loops only, since callers check it on every call (SAT's streaming step: 144 tensors)."""
    try:
        versions = tuple(map(_VERSION, tensors))
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None
    return (*map(Tensor.data_ptr, tensors), *versions)
