"""Label sets: the ``index,mid,display_name`` CSV layout of AudioSet (and of the seeds' own datasets)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True)
class LabelSet:
    """Class ids (``mids``) and display names, in model output order."""

    mids: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def index(self, mid_or_name: str) -> int:
        """Output index of a class given its mid (``/m/09x0r``) or display name (``Speech``)."""
        for table in (self.mids, self.names):
            if mid_or_name in table:
                return table.index(mid_or_name)
        raise KeyError(f"unknown class {mid_or_name!r}")


def read_label_csv(path: str | os.PathLike) -> LabelSet:
    """Read a class-label CSV with columns ``index,mid,display_name`` (rows ordered by index on output)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"index", "mid", "display_name"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: label CSV lacks column(s) {', '.join(sorted(missing))}")
        rows = sorted(reader, key=lambda r: int(r["index"]))
    if [int(r["index"]) for r in rows] != list(range(len(rows))):
        raise ValueError(f"{path}: label indices are not 0..{len(rows) - 1}")
    return LabelSet(tuple(r["mid"] for r in rows), tuple(r["display_name"] for r in rows))


@lru_cache(maxsize=None)
def audioset() -> LabelSet:
    """The 527 AudioSet classes in the order of ``class_labels_indices.csv`` (AST, DASS, Dasheng, SAT heads)."""
    with resources.as_file(resources.files("tympan") / "assets" / "audioset_labels.csv") as path:
        return read_label_csv(path)


def get_label_set(name: str | None, num_classes: int) -> LabelSet:
    """Labels for a head: a registered set's name (``"audioset"``), a CSV path, or generic ``class_<i>`` names."""
    if name == "audioset":
        labels = audioset()
    elif name is not None and os.path.isfile(name):
        labels = read_label_csv(name)
    else:
        return LabelSet(tuple(str(i) for i in range(num_classes)), tuple(f"class_{i}" for i in range(num_classes)))
    if len(labels) != num_classes:
        raise ValueError(f"label set {name!r} has {len(labels)} classes but the model outputs {num_classes}")
    return labels
