"""Manifests: the seeds' JSON datafiles as plain data, label CSVs, and converters for the shared datasets.

A datafile is the AST/SSAST/DASS layout, ``{"data": [{"wav": path, "labels": "mid1,mid2"}, ...]}``, with
optional ``fold``, ``split`` and ``duration`` fields for evaluation protocols; any other field (``video_id``...)
is kept in :attr:`Record.extra` and written back. Relative ``wav`` paths are resolved against the datafile's
folder, so a dataset folder with its datafile can be moved as a whole.

>>> from tympan.data import esc10_datafile, read_datafile
>>> files = esc10_datafile("/data", "out/")                 # out/esc10.json + out/esc10_labels.csv
>>> train = read_datafile(files.datafile).select(fold=[1, 2, 3])
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, overload

import torch

from tympan.audio import info
from tympan.errors import TympanError
from tympan.labels import LabelSet, read_label_csv

__all__ = [
    "Dataset",
    "DatafileError",
    "DatafilePaths",
    "Manifest",
    "MultiHot",
    "Record",
    "as_manifest",
    "esc10_datafile",
    "fsdd_datafile",
    "fsdd_split",
    "import_dataset",
    "load_dataset",
    "read_datafile",
    "write_datafile",
    "write_label_csv",
]

_KNOWN_FIELDS = ("wav", "labels", "fold", "split", "duration")


class DatafileError(TympanError, ValueError):
    """A datafile or label CSV that cannot be used; the message is one line naming the file and the reason."""


@dataclass(frozen=True)
class Record:
    """One clip of a datafile: an absolute audio path, its label ids and the optional protocol fields."""

    wav: str
    labels: tuple[str, ...] = ()
    fold: int | None = None
    split: str | None = None
    duration: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self, wav: str | None = None) -> dict[str, Any]:
        """The datafile entry (``labels`` comma-joined, unset optional fields left out)."""
        entry: dict[str, Any] = {"wav": wav if wav is not None else self.wav, "labels": ",".join(self.labels)}
        for name in ("fold", "split", "duration"):
            if getattr(self, name) is not None:
                entry[name] = getattr(self, name)
        entry.update(self.extra)
        return entry

    @classmethod
    def from_json(cls, entry: Any, folder: str | os.PathLike = ".") -> Record:
        """Parse a datafile entry; a relative ``wav`` is resolved against `folder`."""
        if not isinstance(entry, dict) or not isinstance(entry.get("wav"), str):
            raise TypeError("each entry must be an object with a string 'wav' field")
        wav = Path(entry["wav"]).expanduser()
        fold, duration = entry.get("fold"), entry.get("duration")
        return cls(
            wav=str(wav if wav.is_absolute() else (Path(folder) / wav).resolve()),
            labels=_parse_labels(entry.get("labels")),
            fold=None if fold is None else int(fold),
            split=entry.get("split"),
            duration=None if duration is None else float(duration),
            extra={k: v for k, v in entry.items() if k not in _KNOWN_FIELDS},
        )


def _parse_labels(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(label.strip() for label in value.split(",") if label.strip())
    if isinstance(value, (list, tuple)):
        return tuple(str(label) for label in value)
    raise TypeError(f"labels must be a comma-separated string or a list, got {type(value).__name__}")


Condition = Any  # a value, a collection of values, or a predicate


def _matches(value: Any, condition: Condition) -> bool:
    if callable(condition):
        return bool(condition(value))
    if isinstance(condition, Collection) and not isinstance(condition, str):
        return value in condition
    return value == condition


class Manifest(Sequence[Record]):
    """An immutable list of :class:`Record` with filtering and label statistics."""

    def __init__(self, records: Iterable[Record], source: str | os.PathLike | None = None) -> None:
        self.records: tuple[Record, ...] = tuple(records)
        self.source = None if source is None else Path(source)

    @overload
    def __getitem__(self, index: int) -> Record: ...
    @overload
    def __getitem__(self, index: slice) -> Manifest: ...
    def __getitem__(self, index: int | slice) -> Record | Manifest:
        if isinstance(index, slice):
            return Manifest(self.records[index], self.source)
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __repr__(self) -> str:
        where = f", source={str(self.source)!r}" if self.source else ""
        return f"Manifest({len(self)} records{where})"

    def select(self, predicate: Callable[[Record], bool] | None = None, **conditions: Condition) -> Manifest:
        """Records matching every condition: ``select(fold=[1, 2, 3])``, ``select(split="train")``,
        ``select(fold=lambda f: f != 4)``, or any predicate on the record."""
        unknown = set(conditions) - {"fold", "split", "labels", "wav", "duration"}
        if unknown:
            raise ValueError(f"cannot select on unknown field(s) {', '.join(sorted(unknown))}")
        kept = [
            r
            for r in self.records
            if (predicate is None or predicate(r)) and all(_matches(getattr(r, k), c) for k, c in conditions.items())
        ]
        return Manifest(kept, self.source)

    def label_counts(self) -> dict[str, int]:
        """How many clips carry each label id."""
        counts: dict[str, int] = {}
        for record in self.records:
            for label in set(record.labels):
                counts[label] = counts.get(label, 0) + 1
        return counts


def read_datafile(path: str | os.PathLike) -> Manifest:
    """Read a JSON datafile; relative ``wav`` paths are resolved against the datafile's folder."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatafileError(f"{path}: datafile not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatafileError(f"{path}: not a readable JSON datafile ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise DatafileError(f"{path}: expected a JSON object with a 'data' list")
    folder = path.resolve().parent
    records = []
    for position, entry in enumerate(document["data"]):
        try:
            records.append(Record.from_json(entry, folder))
        except (TypeError, ValueError) as err:
            raise DatafileError(f"{path}: entry {position}: {err}") from None
    return Manifest(records, path)


def write_datafile(records: Iterable[Record], path: str | os.PathLike, relative: bool = False) -> Path:
    """Write records as a JSON datafile. With ``relative=True`` paths are stored relative to its folder.

    Written atomically: a reader (e.g. another rank of a torchrun job writing the same file) sees the old or the new
    file, never an empty or half-written one."""
    from tympan.files import atomic_write

    path = Path(path)
    folder = path.resolve().parent
    entries = [r.to_json(os.path.relpath(r.wav, folder) if relative else None) for r in records]
    text = json.dumps({"data": entries}, indent=1) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_label_csv(labels: LabelSet, path: str | os.PathLike) -> Path:
    """Write a class-label CSV with columns ``index,mid,display_name`` (readable by ``read_label_csv``), atomically
    (see :func:`write_datafile`)."""
    from tympan.files import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "mid", "display_name"])
            writer.writerows((i, mid, name) for i, (mid, name) in enumerate(zip(labels.mids, labels.names)))

    return atomic_write(path, write)


class MultiHot:
    """Label ids -> multi-hot float vector in a label set's output order (mids or display names accepted)."""

    def __init__(self, labels: LabelSet | str | os.PathLike) -> None:
        self.labels = labels if isinstance(labels, LabelSet) else read_label_csv(labels)
        self._index = {name: i for i, name in enumerate(self.labels.names)}
        self._index.update({mid: i for i, mid in enumerate(self.labels.mids)})  # mids win over names

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def indices(self, label_ids: Iterable[str]) -> list[int]:
        """Output indices of label ids; an unknown id is a ValueError naming it."""
        try:
            return [self._index[label] for label in label_ids]
        except KeyError as err:
            raise ValueError(f"label {err.args[0]!r} is not in the label set ({self.num_classes} classes)") from None

    def __call__(self, label_ids: Iterable[str]) -> torch.Tensor:
        target = torch.zeros(self.num_classes, dtype=torch.float32)
        target[self.indices(label_ids)] = 1.0
        return target


# ------------------------------------------------------------------------------------------ converters
class DatafilePaths(NamedTuple):
    """What a converter wrote: the JSON datafile and its label CSV."""

    datafile: Path
    labels: Path


def _dataset_folder(root: str | os.PathLike, name: str, csv_name: str) -> Path:
    """`root` is the dataset folder itself or its parent (``shared/data``)."""
    root = Path(root)
    for folder in (root, root / name):
        if (folder / csv_name).is_file():
            return folder
    raise DatafileError(f"{root}: no {csv_name} here or in {root / name}")


def _read_csv(path: Path, required: set[str]) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = required - set(reader.fieldnames or ())
        if missing:
            raise DatafileError(f"{path}: lacks column(s) {', '.join(sorted(missing))}")
        return list(reader)


# ESC-10 classes use AST's ESC-50 label ids (`/m/07rwj` + two-digit ESC-50 target), so an ESC-10 datafile also
# works with AST's 50-class esc_class_labels_indices.csv.
def _esc50_mid(target: int) -> str:
    return f"/m/07rwj{target:02d}"


def esc10_datafile(root: str | os.PathLike, out_dir: str | os.PathLike, relative: bool = False) -> DatafilePaths:
    """ESC-10 (``esc10.csv`` + ``audio/``) -> ``esc10.json`` and ``esc10_labels.csv`` in `out_dir`.

    Labels are the 10 classes in ``target_esc10`` order (mid ``/m/07rwjNN`` with NN the ESC-50 target, AST's
    convention); each record carries its ``fold`` and its ``duration`` read from the file header. Rows whose
    audio is absent (the held-out fold 5) are left out.
    """
    folder = _dataset_folder(root, "esc10", "esc10.csv")
    rows = _read_csv(folder / "esc10.csv", {"filename", "fold", "target", "category", "target_esc10"})
    classes = sorted({(int(r["target_esc10"]), int(r["target"]), r["category"]) for r in rows})
    if [c[0] for c in classes] != list(range(len(classes))):
        raise DatafileError(f"{folder / 'esc10.csv'}: target_esc10 does not map one-to-one to categories")
    labels = LabelSet(tuple(_esc50_mid(target) for _, target, _ in classes), tuple(name for *_, name in classes))
    records = []
    for row in rows:
        wav = folder / "audio" / row["filename"]
        if not wav.is_file():
            continue
        records.append(
            Record(
                wav=str(wav.resolve()),
                labels=(_esc50_mid(int(row["target"])),),
                fold=int(row["fold"]),
                duration=round(info(wav).duration, 6),
            )
        )
    out = Path(out_dir)
    return DatafilePaths(
        write_datafile(records, out / "esc10.json", relative), write_label_csv(labels, out / "esc10_labels.csv")
    )


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def fsdd_split(take: int, test_takes: range = range(0, 5), validation_takes: range = range(5, 10)) -> str:
    """The split of an FSDD recording from its take index: the README's test takes 0-4, then a validation
    hold-out (takes 5-9 by default), the rest train."""
    if take in test_takes:
        return "test"
    return "validation" if take in validation_takes else "train"


def fsdd_datafile(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    validation_takes: range = range(5, 10),
    relative: bool = False,
) -> DatafilePaths:
    """Free Spoken Digit Dataset (``fsdd.csv`` + ``recordings/``) -> ``fsdd.json`` and ``fsdd_labels.csv``.

    Labels are the digits (mid ``digit_<d>``, display name ``zero``..``nine``); ``split`` follows
    :func:`fsdd_split` on the take index; ``speaker`` and ``take`` are kept as extra fields. Rows whose audio
    is absent (the held-out test takes) are left out.
    """
    folder = _dataset_folder(root, "fsdd", "fsdd.csv")
    rows = _read_csv(folder / "fsdd.csv", {"filename", "digit", "speaker", "index", "sample_rate", "num_samples"})
    labels = LabelSet(tuple(f"digit_{d}" for d in range(10)), DIGIT_NAMES)
    records = []
    for row in rows:
        wav = folder / "recordings" / row["filename"]
        if not wav.is_file():
            continue
        take = int(row["index"])
        records.append(
            Record(
                wav=str(wav.resolve()),
                labels=(f"digit_{int(row['digit'])}",),
                split=fsdd_split(take, validation_takes=validation_takes),
                duration=round(int(row["num_samples"]) / int(row["sample_rate"]), 6),
                extra={"speaker": row["speaker"], "take": take},
            )
        )
    out = Path(out_dir)
    return DatafilePaths(
        write_datafile(records, out / "fsdd.json", relative), write_label_csv(labels, out / "fsdd_labels.csv")
    )


def as_manifest(source: Manifest | Iterable[Record] | str | os.PathLike) -> Manifest:
    """A manifest from a datafile path, a manifest, or records."""
    if isinstance(source, Manifest):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_datafile(source)
    return Manifest(source)



# ------------------------------------------------------------------------------------------ any dataset
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
_FILE_COLUMNS = ("wav", "filename", "file", "path", "audio", "fname", "file_name", "slice_file_name")
_LABEL_COLUMNS = ("labels", "label", "category", "class", "class_name", "classname", "tag", "tags")
_AUDIO_FOLDERS = (".", "audio", "recordings", "wav", "wavs", "clips", "data")


class Dataset(NamedTuple):
    """A dataset read from any source: its records, its label set (``None`` when unlabelled) and what was skipped."""

    manifest: Manifest
    labels: LabelSet | None
    skipped: tuple[str, ...]  # one line per row/file left out, with the reason


def load_dataset(source: str | os.PathLike, root: str | os.PathLike | None = None) -> Dataset:
    """Read a dataset from whatever a user has: a JSON datafile (its label CSV beside it, ``<stem>_labels.csv``),
    a CSV with a file column and optionally a label/fold/split column, a folder tree ``class/*.wav`` (labels from
    the first-level folder names), a folder of unlabelled audio, or a text file listing audio paths.

    The shared datasets' own CSVs (``esc10.csv``, ``fsdd.csv``) go through their converters, so their labels keep
    the conventions of the recipes. `root` is where a CSV's relative file names live (default: the CSV's folder or
    its ``audio/``, ``recordings/``... subfolder, whichever holds the first file).
    """
    path = Path(source)
    if not path.exists():
        raise DatafileError(f"{path}: no such file or folder")
    if path.is_dir():
        return _folder_dataset(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        manifest = read_datafile(path)
        beside = path.with_name(f"{path.stem}_labels.csv")
        return Dataset(manifest, read_label_csv(beside) if beside.is_file() else _labels_of(manifest), ())
    if suffix == ".csv":
        return _csv_dataset(path, root)
    if suffix in (".txt", ".lst", ".list"):
        return _list_dataset(path)
    if suffix in AUDIO_SUFFIXES:
        return Dataset(Manifest([Record(wav=str(path.resolve()))], path), None, ())
    raise DatafileError(f"{path}: not a dataset (a .json datafile, a .csv, a folder or a .txt list of audio files)")


def import_dataset(source: str | os.PathLike, out: str | os.PathLike, root: str | os.PathLike | None = None,
                   relative: bool = False) -> tuple[DatafilePaths | Path, Dataset]:
    """:func:`load_dataset` written as a datafile: ``out`` (``NAME.json``) and, when labelled, ``NAME_labels.csv``."""
    dataset = load_dataset(source, root)
    out = Path(out)
    if out.suffix.lower() != ".json":
        out = out / f"{_dataset_name(Path(source))}.json"
    datafile = write_datafile(dataset.manifest, out, relative)
    if dataset.labels is None:
        return datafile, dataset
    return DatafilePaths(datafile, write_label_csv(dataset.labels, out.with_name(f"{out.stem}_labels.csv"))), dataset


def _dataset_name(source: Path) -> str:
    return source.resolve().name if source.is_dir() else source.stem


def _labels_of(manifest: Manifest) -> LabelSet | None:
    names = sorted({label for record in manifest for label in record.labels})
    return LabelSet(tuple(names), tuple(names)) if names else None


def _is_audio(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES and not path.name.startswith(".")


def _folder_dataset(folder: Path) -> Dataset:
    """``folder/class/**/audio`` -> labelled by class folder; audio directly in `folder` (and no class folders) ->
    unlabelled."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    labelled = {d.name: sorted(p for p in d.rglob("*") if _is_audio(p)) for d in classes}
    labelled = {name: files for name, files in labelled.items() if files}
    loose = sorted(p for p in folder.iterdir() if _is_audio(p))
    if labelled:
        records = [Record(wav=str(p.resolve()), labels=(name,)) for name, files in labelled.items() for p in files]
        skipped = tuple(f"{p}: audio outside a class folder" for p in loose)
        names = tuple(labelled)
        return Dataset(Manifest(records, folder), LabelSet(names, names), skipped)
    if not loose:
        raise DatafileError(f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) here or in class folders")
    return Dataset(Manifest([Record(wav=str(p.resolve())) for p in loose], folder), None, ())


def _list_dataset(path: Path) -> Dataset:
    records, skipped = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        wav = Path(line).expanduser()
        wav = wav if wav.is_absolute() else path.resolve().parent / wav
        if wav.is_file():
            records.append(Record(wav=str(wav.resolve())))
        else:
            skipped.append(f"{path}:{number}: {line}: no such file")
    if not records:
        raise DatafileError(f"{path}: lists no existing audio file")
    return Dataset(Manifest(records, path), None, tuple(skipped))


def _pick(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _csv_dataset(path: Path, root: str | os.PathLike | None) -> Dataset:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or ())
        rows = list(reader)
    known = {"esc10.csv": (esc10_datafile, {"filename", "target_esc10", "category"}),
             "fsdd.csv": (fsdd_datafile, {"filename", "digit", "speaker", "index"})}
    if path.name in known and known[path.name][1] <= set(columns) and root is None:
        import tempfile

        convert = known[path.name][0]
        with tempfile.TemporaryDirectory() as tmp:
            written = convert(path.parent, tmp)
            return Dataset(read_datafile(written.datafile), read_label_csv(written.labels), ())
    file_column = _pick(columns, _FILE_COLUMNS)
    if file_column is None:
        raise DatafileError(f"{path}: no file column (one of {', '.join(_FILE_COLUMNS)}) among {', '.join(columns)}")
    label_column = _pick(columns, _LABEL_COLUMNS)
    fold_column, split_column = _pick(columns, ("fold",)), _pick(columns, ("split", "set", "subset"))
    base = Path(root) if root is not None else _audio_root(path, [r[file_column] for r in rows])
    records, skipped = [], []
    for number, row in enumerate(rows, 2):  # line 1 is the header
        wav = Path(row[file_column].strip()).expanduser()
        wav = wav if wav.is_absolute() else base / wav
        if not wav.is_file():
            skipped.append(f"{path}:{number}: {row[file_column]}: no such file under {base}")
            continue
        try:
            fold = int(row[fold_column]) if fold_column and row[fold_column].strip() else None
        except ValueError:
            raise DatafileError(f"{path}:{number}: fold {row[fold_column]!r} is not an integer") from None
        used = {file_column, label_column, fold_column, split_column}
        records.append(Record(
            wav=str(wav.resolve()),
            labels=_parse_labels(row[label_column]) if label_column else (),
            fold=fold,
            split=(row[split_column].strip() or None) if split_column else None,
            extra={k: v for k, v in row.items() if k not in used and k is not None},
        ))
    if not records:
        raise DatafileError(f"{path}: none of its {len(rows)} rows names an existing audio file under {base}")
    manifest = Manifest(records, path)
    return Dataset(manifest, _labels_of(manifest) if label_column else None, tuple(skipped))


def _audio_root(csv_path: Path, names: Sequence[str]) -> Path:
    """The folder (the CSV's own or a usual audio subfolder) where most of the first rows' files exist."""
    folder = csv_path.resolve().parent
    sample = [n.strip() for n in names[:20] if n.strip()]
    best, hits = folder, 0
    for name in _AUDIO_FOLDERS:
        candidate = (folder / name).resolve()
        found = sum((candidate / n).is_file() for n in sample)
        if found > hits:
            best, hits = candidate, found
    return best
