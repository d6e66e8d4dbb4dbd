"""Tagging metrics shared by the trainer and the evaluators, vectorised over classes in torch.

Definitions follow the seeds (AST/DASS/SAT ``calculate_stats``, which call scikit-learn per class):

* average precision per class = sum over score thresholds of (recall step) x precision, with tied scores forming one
  threshold (scikit-learn's ``average_precision_score``); mAP = mean over classes;
* AUC per class = the probability that a positive outranks a negative, ties counting one half
  (``roc_auc_score``); mAUC = mean over classes; d-prime = sqrt(2) * Phi^-1(mAUC);
* accuracy = argmax agreement; top-k accuracy = the true class among the k highest scores.

Classes with no positive (or, for AUC, no negative) example have no defined value: they are NaN per class and left
out of the means (the seeds evaluate on sets where every class occurs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor


def _as_tensor(x: Any) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().to(torch.float64)


def _check_pair(scores: Tensor, targets: Tensor) -> None:
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must both be [N, C]")


def average_precision(scores: Any, targets: Any) -> Tensor:
    """Per-class average precision ``[C]`` of ``scores`` ``[N, C]`` against binary ``targets`` ``[N, C]``."""
    scores, targets = _as_tensor(scores), _as_tensor(targets)
    _check_pair(scores, targets)
    order = torch.argsort(scores, dim=0, descending=True, stable=True)
    s = torch.gather(scores, 0, order)
    y = torch.gather(targets, 0, order)
    tp = torch.cumsum(y, dim=0)
    n = s.shape[0]
    rank = torch.arange(1, n + 1, dtype=s.dtype, device=s.device)[:, None]
    # the last row of every group of tied scores is a threshold
    is_end = torch.ones_like(s, dtype=torch.bool)
    is_end[:-1] = s[:-1] != s[1:]
    tp_at_end = torch.where(is_end, tp, torch.zeros_like(tp))
    prev_end_tp = torch.cummax(tp_at_end, dim=0).values.roll(1, dims=0)
    prev_end_tp[0] = 0
    positives = tp[-1]
    gained = torch.where(is_end, tp - prev_end_tp, torch.zeros_like(tp))
    ap = (gained * tp / rank).sum(0) / positives
    return torch.where(positives > 0, ap, torch.full_like(ap, math.nan))


def _tied_ranks(x: Tensor) -> Tensor:
    """Ranks (1-based) along dim 0 with ties given their average rank, like ``scipy.stats.rankdata``."""
    n = x.shape[0]
    order = torch.argsort(x, dim=0, stable=True)
    s = torch.gather(x, 0, order)
    pos = torch.arange(n, dtype=x.dtype, device=x.device)[:, None].expand_as(s)
    new_group = torch.ones_like(s, dtype=torch.bool)
    new_group[1:] = s[1:] != s[:-1]
    group = torch.cumsum(new_group.to(torch.int64), dim=0) - 1
    first = torch.zeros_like(s).scatter_reduce(0, group, pos, reduce="amin", include_self=False)
    last = torch.zeros_like(s).scatter_reduce(0, group, pos, reduce="amax", include_self=False)
    avg = (torch.gather(first, 0, group) + torch.gather(last, 0, group)) / 2 + 1
    return torch.empty_like(avg).scatter_(0, order, avg)


def roc_auc(scores: Any, targets: Any) -> Tensor:
    """Per-class ROC AUC ``[C]`` (Mann-Whitney statistic with ties counted one half)."""
    scores, targets = _as_tensor(scores), _as_tensor(targets)
    _check_pair(scores, targets)
    ranks = _tied_ranks(scores)
    pos = targets.sum(0)
    neg = targets.shape[0] - pos
    auc = ((ranks * targets).sum(0) - pos * (pos + 1) / 2) / (pos * neg)
    return torch.where((pos > 0) & (neg > 0), auc, torch.full_like(auc, math.nan))


def d_prime(auc: float | Tensor) -> float:
    """Sensitivity index d' = sqrt(2) * Phi^-1(AUC), as PANNs/AST report next to mAUC."""
    return float(math.sqrt(2.0) * torch.special.ndtri(torch.as_tensor(float(auc), dtype=torch.float64)))


def _nanmean(x: Tensor) -> float:
    return float(torch.nanmean(x)) if torch.any(~torch.isnan(x)) else math.nan


def top_k_accuracy(scores: Any, labels: Any, k: int = 1) -> float:
    """Fraction of rows whose integer label is among the ``k`` highest scores."""
    scores = _as_tensor(scores)
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels).long()
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"scores {tuple(scores.shape)} must be [N, C] and labels {tuple(labels.shape)} [N]")
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return float((top == labels[:, None].to(top.device)).any(1).double().mean())


def accuracy(scores: Any, labels: Any) -> float:
    """Top-1 accuracy of ``scores`` ``[N, C]`` against integer ``labels`` ``[N]``."""
    return top_k_accuracy(scores, labels, k=1)


def multilabel_metrics(scores: Any, targets: Any) -> dict[str, float]:
    """mAP, mAUC and d-prime of multi-label ``scores`` against binary ``targets``, as a dict."""
    m_auc = _nanmean(roc_auc(scores, targets))
    return {
        "mAP": _nanmean(average_precision(scores, targets)),
        "mAUC": m_auc,
        "d_prime": d_prime(m_auc) if not math.isnan(m_auc) else math.nan,
    }


def singlelabel_metrics(scores: Any, labels: Any, top_k: tuple[int, ...] = (5,)) -> dict[str, float]:
    """Accuracy and top-k accuracies of single-label ``scores`` against integer ``labels``."""
    out = {"accuracy": accuracy(scores, labels)}
    for k in top_k:
        out[f"top{k}_accuracy"] = top_k_accuracy(scores, labels, k)
    return out
