"""Probes on frozen embeddings: cosine kNN and a logistic-regression (linear) probe, under k-fold or fixed splits.

Both take precomputed clip embeddings ``X [N, D]`` and labels: integer classes ``[N]`` (single-label, scored by
accuracy) or multi-hot ``[N, C]`` (multi-label, scored by mAP / mAUC / d-prime from :mod:`tympan.eval.metrics`).

* **kNN**: cosine similarity to the training rows, the ``k`` nearest vote. Single-label: majority vote, ties broken
  by the summed similarity of each tied class's neighbours. Multi-label: the mean of the neighbours' label vectors
  is the score.
* **linear**: features standardised with the fitting rows' mean and std, then logistic regression (softmax +
  cross-entropy, or sigmoid + binary cross-entropy summed over classes) with an L2 penalty
  ``weight_decay / 2 * ||W||^2``, fitted full-batch with L-BFGS in float64 from zeros (deterministic; at most 100
  iterations, like scikit-learn's default). The weight decay is chosen from a small grid on validation data
  carved from the training rows only (best mean validation metric, ties to the lower validation loss), then the
  probe is refitted on all training rows.

Protocols (:class:`Split` lists): :func:`fold_splits` is leave-one-fold-out from a ``fold`` column; by default
each training fold is held out in turn for the weight-decay choice (``validation="next"``: only the next fold).
:func:`fixed_split` reads a ``split`` column (train/valid/test; with no valid rows, a stratified 20 % of train).
Test rows are never used in fitting, standardising or choosing the weight decay.
:func:`evaluate` returns a JSON-ready dict with per-split figures, mean and std (population, ddof 0) over splits;
:func:`format_results` renders it as a text table.

**Embeddings file** (written by ``tympan embed``, read by :func:`load_embeddings`): safetensors with

* tensor ``embeddings``: float32 ``[N, D]``, one row per clip (more tensors, e.g. ``scores [N, C]``, may follow);
* metadata (string -> string): ``format = "tympan.embeddings.v1"``, ``keys`` = a JSON list of ``N`` strings (the
  clips' file paths or ids, in row order), ``info`` = a JSON object (model id, sample rate, pooling, ...).

:func:`probe_main` joins such a file with a CSV datafile on a key column (exact key, else file name, else file
stem) and runs a probe; it is the entry point of ``tympan probe``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from tympan.eval.metrics import accuracy, multilabel_metrics

__all__ = [
    "DEFAULT_GRID",
    "EMBEDDINGS_FORMAT",
    "EmbeddingFile",
    "LinearProbe",
    "Split",
    "evaluate",
    "fit_linear_probe",
    "fixed_split",
    "fold_splits",
    "format_results",
    "knn_scores",
    "load_embeddings",
    "probe_main",
    "save_embeddings",
]

Method = Literal["knn", "linear"]
METHODS = ("knn", "linear")
EMBEDDINGS_FORMAT = "tympan.embeddings.v1"
DEFAULT_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
VALID_FRACTION = 0.2
_SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid",
                "test": "test", "eval": "test"}  # fmt: skip


# --------------------------------------------------------------------------------------- labels
def _prepare(x: Any, y: Any) -> tuple[Tensor, Tensor, bool]:
    """Embeddings -> float64 ``[N, D]``; labels -> int64 ``[N]`` (single-label) or float64 ``[N, C]`` (multi-hot)."""
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    ya = np.asarray(y)
    if xt.ndim != 2 or xt.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {tuple(xt.shape)}")
    if not torch.isfinite(xt).all():
        raise ValueError("embeddings hold NaN or inf values")
    if ya.shape[:1] != (xt.shape[0],) or ya.ndim not in (1, 2):
        raise ValueError(f"labels must be [N] ints or [N, C] multi-hot with N = {xt.shape[0]}, got {ya.shape}")
    if ya.ndim == 1:
        if not np.issubdtype(ya.dtype, np.integer) or ya.min() < 0:
            raise ValueError("single-label labels must be non-negative integers (map class names to 0..C-1)")
        return xt, torch.as_tensor(ya, dtype=torch.int64), False
    if not np.isin(ya, (0, 1)).all():
        raise ValueError("multi-label targets must be 0/1 (multi-hot)")
    return xt, torch.as_tensor(ya, dtype=torch.float64), True


def _class_order(values: Iterable[Any]) -> list[Any]:
    """Sorted distinct values, numerically when they all read as numbers ("2" before "10")."""
    values = sorted(set(values))
    try:
        return sorted(values, key=float)
    except (TypeError, ValueError):
        return values


def _num_classes(y: Tensor, multilabel: bool) -> int:
    return int(y.shape[1]) if multilabel else int(y.max()) + 1


def _metrics(scores: Tensor, y: Tensor, multilabel: bool) -> dict[str, float]:
    if multilabel:
        return multilabel_metrics(scores, y)
    return {"accuracy": accuracy(scores, y)}


def _main_metric(multilabel: bool) -> str:
    return "mAP" if multilabel else "accuracy"


# ------------------------------------------------------------------------------------------ kNN
def knn_scores(x_train: Any, y_train: Any, x_test: Any, k: int = 5, num_classes: int | None = None) -> Tensor:
    """Class scores ``[N_test, C]`` from the `k` nearest training rows by cosine similarity.

    Single-label (``y_train`` ints ``[N]``): ``votes + (summed similarity + k) / (2k + 1)``, so the argmax is the
    majority class and ties go to the class whose neighbours are more similar. Multi-label (``[N, C]``): the mean
    of the neighbours' label vectors.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    xtr, ytr, multilabel = _prepare(x_train, y_train)
    xte = torch.as_tensor(np.asarray(x_test), dtype=torch.float64)
    if xte.ndim != 2 or xte.shape[1] != xtr.shape[1]:
        raise ValueError(f"test embeddings {tuple(xte.shape)} must be [N, {xtr.shape[1]}] like the training ones")
    k = min(k, xtr.shape[0])
    sims = torch.nn.functional.normalize(xte, dim=1) @ torch.nn.functional.normalize(xtr, dim=1).T
    top_sims, top_idx = sims.topk(k, dim=1)
    if multilabel:
        return ytr[top_idx].mean(dim=1)
    num_classes = num_classes or _num_classes(ytr, False)
    neighbour_labels = ytr[top_idx]
    votes = torch.zeros(xte.shape[0], num_classes, dtype=torch.float64).scatter_add_(
        1, neighbour_labels, torch.ones_like(top_sims)
    )
    similarity = torch.zeros_like(votes).scatter_add_(1, neighbour_labels, top_sims)
    return votes + (similarity + k) / (2 * k + 1)


# --------------------------------------------------------------------------------- linear probe
def _loss(logits: Tensor, y: Tensor, multilabel: bool) -> Tensor:
    if multilabel:  # summed over classes, averaged over rows: same scale as cross-entropy
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / len(y)
    return torch.nn.functional.cross_entropy(logits, y)


def _fit_logistic(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    weight_decay: float,
    multilabel: bool,
    max_iter: int,
) -> tuple[Tensor, Tensor]:
    """L2-penalised logistic regression on standardised ``x`` by full-batch L-BFGS from zeros."""
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-5,
        tolerance_change=1e-8, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = _loss(x @ weight + bias, y, multilabel) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


@dataclass
class LinearProbe:
    """A fitted linear probe: standardisation, weights, the chosen weight decay and the grid's validation figures."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor
    multilabel: bool
    weight_decay: float
    valid_metrics: dict[str, float] = field(default_factory=dict)  # weight decay -> mean validation metric

    def logits(self, x: Any) -> Tensor:
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: Any) -> Tensor:
        """Probabilities ``[N, C]``: softmax (single-label) or sigmoid (multi-label)."""
        logits = self.logits(x)
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)


def _standardiser(x: Tensor) -> tuple[Tensor, Tensor]:
    mean, std = x.mean(0), x.std(0, unbiased=False)
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def _fit_grid(
    x: Tensor, y: Tensor, num_classes: int, grid: Sequence[float], multilabel: bool, max_iter: int
) -> list[LinearProbe]:
    """Probes for every weight decay of `grid`, each fitted from zeros on ``x`` standardised by its own statistics.

    (Warm starts along the grid were tried: at weak penalties L-BFGS stops at ``max_iter`` before converging, so
    the starting point changes the result; from zeros every fit is reproducible on its own.)
    """
    mean, std = _standardiser(x)
    xs = (x - mean) / std
    return [
        LinearProbe(mean, std, *_fit_logistic(xs, y, num_classes, float(g), multilabel, max_iter), multilabel, float(g))
        for g in grid
    ]


def fit_linear_probe(
    x_train: Any,
    y_train: Any,
    valid_sets: Sequence[Any] = (),
    grid: Sequence[float] = DEFAULT_GRID,
    num_classes: int | None = None,
    max_iter: int = 100,
) -> LinearProbe:
    """Fit a linear probe on the training rows only, its weight decay chosen on held-out subsets of them.

    Each of `valid_sets` (row indices into ``x_train``) is held out in turn: the grid is fitted on the other rows
    and scored on it. The weight decay with the best mean validation metric (accuracy or mAP; ties to the lower
    mean validation loss) is refitted on all of ``x_train``. With no validation set, or a one-value grid, the
    first grid value is used.
    """
    if not len(grid) or any(not math.isfinite(g) or g < 0 for g in grid):
        raise ValueError(f"grid must hold non-negative weight decays, got {list(grid)}")
    xtr, ytr, multilabel = _prepare(x_train, y_train)
    num_classes = num_classes or _num_classes(ytr, multilabel)
    if not len(valid_sets) or len(grid) == 1:
        return _fit_grid(xtr, ytr, num_classes, grid[:1], multilabel, max_iter)[0]
    key = _main_metric(multilabel)
    metrics, losses = np.zeros(len(grid)), np.zeros(len(grid))
    for held in valid_sets:
        held_out = torch.zeros(len(xtr), dtype=torch.bool)
        held_out[torch.as_tensor(np.asarray(held), dtype=torch.int64)] = True
        if held_out.all() or not held_out.any():
            raise ValueError("each validation set must hold some, but not all, training rows")
        path = _fit_grid(xtr[~held_out], ytr[~held_out], num_classes, grid, multilabel, max_iter)
        for i, probe in enumerate(path):
            logits = probe.logits(xtr[held_out])
            metrics[i] += _metrics(logits, ytr[held_out], multilabel)[key] / len(valid_sets)
            losses[i] += float(_loss(logits, ytr[held_out], multilabel)) / len(valid_sets)
    best = min(range(len(grid)), key=lambda i: (-np.nan_to_num(metrics[i], nan=-np.inf), losses[i]))
    probe = _fit_grid(xtr, ytr, num_classes, [grid[best]], multilabel, max_iter)[0]
    probe.valid_metrics = {f"{g:g}": float(m) for g, m in zip(grid, metrics)}
    return probe


# ------------------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class Split:
    """One evaluation split: ``train`` rows fit the probe, ``test`` rows are scored. Each of ``valid`` (subsets
    of ``train``) is held out in turn to choose hyperparameters before the refit on all of ``train``."""

    name: str
    train: np.ndarray
    test: np.ndarray
    valid: tuple[np.ndarray, ...] = ()


def _stratified_holdout(indices: np.ndarray, labels: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
    """A random `fraction` of `indices`, per class when single-label labels are given (each class keeps a row)."""
    rng = np.random.default_rng(seed)
    if labels is None or labels.ndim != 1:
        return np.sort(rng.permutation(indices)[: max(1, round(fraction * len(indices)))])
    chosen = []
    for cls in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == cls])
        chosen.append(members[: min(len(members) - 1, round(fraction * len(members)))])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def fold_splits(
    folds: Sequence[Any], labels: Any = None, validation: Literal["all", "next"] = "all", seed: int = 0
) -> list[Split]:
    """Leave-one-fold-out splits from a per-row fold id.

    Validation is carved from the training folds: ``"all"`` holds out each training fold in turn (inner
    leave-one-fold-out; one small fold alone picks the weight decay by a clip or two of noise), ``"next"`` only
    the next one (cyclically). With two folds, a stratified 20 % of the training fold validates.
    """
    if validation not in ("all", "next"):
        raise ValueError(f"validation must be 'all' or 'next', got {validation!r}")
    folds = np.asarray(folds)
    ids = _class_order(np.unique(folds).tolist())
    if len(ids) < 2:
        raise ValueError(f"k-fold evaluation needs at least 2 folds, got {len(ids)}")
    labels = None if labels is None else np.asarray(labels)
    splits = []
    for position, fold in enumerate(ids):
        test, train = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
        others = ids[position + 1 :] + ids[:position]
        if len(ids) == 2:
            valid = (_stratified_holdout(train, labels, VALID_FRACTION, seed),)
        else:
            valid = tuple(np.flatnonzero(folds == other) for other in (others if validation == "all" else others[:1]))
        splits.append(Split(f"fold{fold}", train, test, valid))
    return splits


def fixed_split(split: Sequence[str], labels: Any = None, seed: int = 0) -> list[Split]:
    """One split from per-row names (train / valid / test; aliases val, validation, dev, eval). The probe is fitted
    on train + valid after choosing on valid; without valid rows, a stratified 20 % of train validates."""
    names = np.array([_SPLIT_NAMES.get(str(s).strip().lower(), "?") for s in split])
    if (names == "?").any():
        bad = sorted({str(s) for s, n in zip(split, names) if n == "?"})
        raise ValueError(f"unknown split name(s) {bad}: use train, valid or test")
    train, valid, test = (np.flatnonzero(names == n) for n in ("train", "valid", "test"))
    if not len(train) or not len(test):
        raise ValueError(f"a fixed split needs train and test rows, got {len(train)} and {len(test)}")
    if not len(valid):
        valid = _stratified_holdout(train, None if labels is None else np.asarray(labels), VALID_FRACTION, seed)
    return [Split("test", np.union1d(train, valid), test, (valid,))]


def _check_split(split: Split, n: int) -> None:
    train, test = np.asarray(split.train), np.asarray(split.test)
    if not len(train) or not len(test):
        raise ValueError(f"split {split.name!r}: needs training and test rows")
    if min(train.min(), test.min()) < 0 or max(train.max(), test.max()) >= n:
        raise ValueError(f"split {split.name!r}: row indices out of range for {n} rows")
    if np.intersect1d(train, test).size:
        raise ValueError(f"split {split.name!r}: train and test rows overlap")
    if any(np.setdiff1d(valid, train).size for valid in split.valid):
        raise ValueError(f"split {split.name!r}: validation rows must be a subset of the training rows")


def evaluate(
    x: Any,
    y: Any,
    splits: Sequence[Split],
    method: Method = "knn",
    k: int = 5,
    grid: Sequence[float] = DEFAULT_GRID,
    max_iter: int = 100,
    return_scores: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], np.ndarray]:
    """Run a probe over `splits`; a JSON-ready dict of per-split figures plus their mean and std.

    Only a split's training rows reach the fitting code (standardisation, weights, the weight-decay choice).
    With ``return_scores`` also the test scores ``[N, C]`` of every row (NaN for rows no split tests; a row
    tested by several splits keeps the last).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    xt, yt, multilabel = _prepare(x, y)
    num_classes = _num_classes(yt, multilabel)
    scores_out = np.full((xt.shape[0], num_classes), np.nan)
    per_split = []
    for split in splits:
        _check_split(split, xt.shape[0])
        train = np.sort(np.asarray(split.train, dtype=np.int64))
        test = torch.as_tensor(np.asarray(split.test), dtype=torch.int64)
        entry: dict[str, Any] = {"name": split.name, "n_train": int(len(train)), "n_test": int(len(test))}
        x_train, y_train = xt[torch.as_tensor(train)], yt[torch.as_tensor(train)]
        if method == "knn":
            scores = knn_scores(x_train, y_train, xt[test], k, num_classes)
        else:
            valid_sets = [np.searchsorted(train, np.asarray(v)) for v in split.valid]  # positions within train
            probe = fit_linear_probe(x_train, y_train, valid_sets, grid, num_classes, max_iter)
            scores = probe.predict(xt[test])
            entry.update(n_valid=[int(len(v)) for v in split.valid], weight_decay=probe.weight_decay,
                         valid=probe.valid_metrics)  # fmt: skip
        entry.update(_metrics(scores, yt[test], multilabel))
        scores_out[test.numpy()] = scores.numpy()
        per_split.append(entry)
    names = ["mAP", "mAUC", "d_prime"] if multilabel else ["accuracy"]
    with np.errstate(invalid="ignore"):  # d-prime is inf at mAUC 1
        mean = {m: float(np.nanmean([s[m] for s in per_split])) for m in names}
        std = {m: float(np.nanstd([s[m] for s in per_split])) for m in names}
    result = {
        "method": method,
        **({"k": k} if method == "knn" else {"grid": [float(g) for g in grid]}),
        "task": "multi-label" if multilabel else "single-label",
        "n": int(xt.shape[0]),
        "dim": int(xt.shape[1]),
        "num_classes": num_classes,
        "splits": per_split,
        "mean": mean,
        "std": std,
    }
    return (result, scores_out) if return_scores else result


def format_results(result: dict[str, Any], title: str | None = None) -> str:
    """A text table of :func:`evaluate`'s dict: one row per split, then mean and std (percent for accuracy/mAP)."""
    metrics = list(result["mean"])
    linear = result["method"] == "linear"
    header = f"{result['method']} (k={result['k']})" if not linear else "linear (logistic regression)"
    lines = [title or f"{header}: {len(result['splits'])} split(s), {result['n']} x {result['dim']}, "
             f"{result['num_classes']} classes, {result['task']}"]  # fmt: skip
    columns = ["split", "n_train", "n_test", *metrics] + (["weight_decay"] if linear else [])
    rows = []
    for s in result["splits"]:
        rows.append([s["name"], str(s["n_train"]), str(s["n_test"]), *(_fmt(m, s[m]) for m in metrics)]
                    + ([f"{s['weight_decay']:g}"] if linear else []))  # fmt: skip
    for stat in ("mean", "std"):
        rows.append([stat, "", "", *(_fmt(m, result[stat][m]) for m in metrics)] + ([""] if linear else []))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _fmt(metric: str, value: float) -> str:
    return f"{100 * value:.2f} %" if metric in ("accuracy", "mAP", "mAUC") else f"{value:.3f}"


# ------------------------------------------------------------------------------------------- files
@dataclass
class EmbeddingFile:
    """The content of an embeddings file: ``embeddings [N, D]``, the row keys, the info dict and all tensors."""

    embeddings: np.ndarray
    keys: list[str]
    info: dict[str, Any]
    tensors: dict[str, np.ndarray]


def save_embeddings(
    path: str | os.PathLike,
    embeddings: Any,
    keys: Sequence[str],
    info: dict[str, Any] | None = None,
    **tensors: Any,
) -> Path:
    """Write an embeddings file (format in the module docstring); extra `tensors` must have N rows too."""
    from tympan.files import write_safetensors

    arrays = {"embeddings": np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))}
    arrays.update({name: np.ascontiguousarray(np.asarray(t)) for name, t in tensors.items()})
    n = arrays["embeddings"].shape[0]
    if arrays["embeddings"].ndim != 2 or len(keys) != n or any(a.shape[:1] != (n,) for a in arrays.values()):
        raise ValueError(f"embeddings must be [N, D] with N keys and N-row tensors (N = {n}, {len(keys)} keys)")
    metadata = {"format": EMBEDDINGS_FORMAT, "keys": json.dumps(list(map(str, keys))), "info": json.dumps(info or {})}
    return write_safetensors(path, arrays, metadata)


def load_embeddings(path: str | os.PathLike) -> EmbeddingFile:
    """Read an embeddings file written by :func:`save_embeddings` (``tympan embed``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embeddings file not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if metadata.get("format") != EMBEDDINGS_FORMAT or "embeddings" not in tensors:
        raise ValueError(f"{path}: not a tympan embeddings file (need format {EMBEDDINGS_FORMAT!r} and 'embeddings')")
    keys = json.loads(metadata["keys"])
    embeddings = tensors["embeddings"]
    if embeddings.ndim != 2 or len(keys) != embeddings.shape[0]:
        raise ValueError(f"{path}: {len(keys)} keys for embeddings of shape {embeddings.shape}")
    return EmbeddingFile(embeddings, keys, json.loads(metadata.get("info", "{}")), tensors)


def _match_rows(keys: Sequence[str], wanted: Sequence[str], source: str) -> np.ndarray:
    """Row index into `keys` of every `wanted` key (-1: no embedding): by exact key, else by file name, else by file
    stem, at the first level that matches the most rows; an error when no row has an embedding."""
    best = np.full(len(wanted), -1, dtype=np.int64)
    for normalise in (str, lambda s: Path(s).name, lambda s: Path(s).stem):
        table = {normalise(key): i for i, key in enumerate(keys)}
        if len(table) < len(keys):  # ambiguous at this level
            continue
        found = np.asarray([table.get(normalise(w), -1) for w in wanted], dtype=np.int64)
        if (found >= 0).sum() > (best >= 0).sum():
            best = found
    if not (best >= 0).any():
        raise ValueError(f"{source}: none of the {len(wanted)} datafile rows has an embedding, e.g. {wanted[0]!r}")
    return best


def _rows_from_info(store, name: str) -> tuple[list[dict[str, str]], set[str]]:
    """Rows (key, labels, fold, split) from an embeddings file written by ``tympan embed``."""
    info = store.info
    if "labels" not in info:
        raise ValueError(f"{name}: holds no labels; give the datafile CSV")
    n = len(store.keys)
    folds, splits = info.get("folds") or [None] * n, info.get("splits") or [None] * n
    rows = [
        {"key": k, "labels": "\t".join(map(str, labels)), "fold": "" if f is None else str(f), "split": s or ""}
        for k, labels, f, s in zip(store.keys, info["labels"], folds, splits)
    ]
    return rows, {"key", "labels", "fold", "split"}


def probe_main(
    embeddings_file: str | os.PathLike,
    datafile: str | os.PathLike | None = None,
    method: Method = "knn",
    k: int = 5,
    *,
    key_column: str = "filename",
    label_column: str = "target",
    fold_column: str | None = "fold",
    split_column: str | None = None,
    label_separator: str | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    output: str | os.PathLike | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Probe an embeddings file against a CSV datafile; print a table, optionally write the result as JSON.

    Without a datafile, the labels and folds (or splits) stored in the embeddings file by ``tympan embed`` are used.
    The datafile has one row per clip: `key_column` (matched to the embeddings' keys), `label_column` (a class
    name/number; with `label_separator`, several per row -> multi-label) and `fold_column` (k-fold) or
    `split_column` (train/valid/test; takes precedence when given). Returns :func:`evaluate`'s dict plus the
    file names and class names.
    """
    store = load_embeddings(embeddings_file)
    if datafile is None:  # the labels/folds/splits `tympan embed` stored beside the embeddings
        rows, columns = _rows_from_info(store, str(embeddings_file))
        key_column, label_column = "key", "labels"
        if split_column is None and not any(r["fold"] for r in rows) and any(r["split"] for r in rows):
            split_column = "split"  # the dataset has a train/valid/test split and no folds
        fold_column, split_column = ("fold", None) if split_column is None else (None, "split")
        if label_separator is None and any("\t" in r["labels"] for r in rows):
            label_separator = "\t"
    else:
        with open(datafile, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = set(reader.fieldnames or ())
    protocol_column = split_column or fold_column
    needed = {key_column, label_column} | ({protocol_column} if protocol_column else set())
    if not protocol_column or needed - columns:
        raise ValueError(f"{datafile}: needs columns {sorted(needed)} (a fold or split column); has {sorted(columns)}")
    if not rows:
        raise ValueError(f"{datafile}: no rows")
    index = _match_rows(store.keys, [r[key_column] for r in rows], str(embeddings_file))
    if (index < 0).any():  # probe the embedded subset of the datafile
        if not quiet:
            print(f"probing the {int((index >= 0).sum())} of {len(rows)} datafile rows that have an embedding",
                  file=sys.stderr)  # fmt: skip
        rows = [r for r, i in zip(rows, index) if i >= 0]
        index = index[index >= 0]
    x = store.embeddings[index]
    if label_separator is None:
        raw = [r[label_column].strip() for r in rows]
        classes = _class_order(raw)
        y = np.array([classes.index(v) for v in raw], dtype=np.int64)
    else:
        raw_sets = [[v.strip() for v in r[label_column].split(label_separator) if v.strip()] for r in rows]
        classes = _class_order(v for labels in raw_sets for v in labels)
        y = np.zeros((len(rows), len(classes)), dtype=np.float32)
        for i, labels in enumerate(raw_sets):
            y[i, [classes.index(v) for v in labels]] = 1
    protocol_values = [r[protocol_column].strip() for r in rows]
    label_for_split = y if y.ndim == 1 else None
    if split_column:
        splits = fixed_split(protocol_values, label_for_split)
    else:
        splits = fold_splits(protocol_values, label_for_split)
    result = evaluate(x, y, splits, method, k=k, grid=grid)
    result.update(protocol="fixed" if split_column else "k-fold", embeddings_file=str(embeddings_file),
                  datafile=str(datafile), classes=classes, embedding_info=store.info, rows=len(rows))  # fmt: skip
    if not quiet:
        print(format_results(result))
    if output is not None:
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
    return result
