"""When a cache derived from weights (packed copies, BatchNorm-folded weights, K/V memos) must be rebuilt."""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from torch import Tensor

__all__ = ["DerivedCache", "fingerprint"]

_T = TypeVar("_T")

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


class DerivedCache(Generic[_T]):
    """One value derived from an owner's tensors (a packed or reordered copy of a module's weight), per owner (held
    weakly), rebuilt when the tensors' fingerprint or shapes change."""

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[object, tuple[tuple, _T]] = weakref.WeakKeyDictionary()

    def get(self, owner: object, tensors: Sequence[Tensor], build: Callable[[], _T]) -> _T | None:
        """The cached value for ``owner``, built now if the tensors changed; ``None`` (nothing built) when one is an
        inference tensor, whose changes cannot be seen."""
        key = fingerprint(tensors)
        if key is None:
            return None
        key = (key, tuple(tuple(t.shape) for t in tensors))
        entry = self._entries.get(owner)
        if entry is None or entry[0] != key:
            entry = self._entries[owner] = (key, build())
        return entry[1]
