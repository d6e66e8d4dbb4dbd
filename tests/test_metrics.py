"""Tagging metrics: hand-computed cases and scikit-learn where it defines the same quantity."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from tympan.eval.metrics import (
    accuracy,
    average_precision,
    d_prime,
    multilabel_metrics,
    roc_auc,
    singlelabel_metrics,
    top_k_accuracy,
)


def test_average_precision_by_hand():
    # ranking: pos, neg, pos, neg -> precision at the positives 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.1]])
    targets = torch.tensor([[1], [0], [1], [0]])
    assert average_precision(scores, targets).item() == pytest.approx((1 + 2 / 3) / 2)


def test_tied_scores_form_one_threshold():
    # all tied: one threshold with precision 2/4 and recall 1
    scores = torch.full((4, 1), 0.5)
    targets = torch.tensor([[1], [0], [1], [0]])
    assert average_precision(scores, targets).item() == pytest.approx(0.5)
    assert roc_auc(scores, targets).item() == pytest.approx(0.5)


def test_auc_and_d_prime_by_hand():
    scores = torch.tensor([[0.1], [0.4], [0.35], [0.8]])
    targets = torch.tensor([[0], [0], [1], [1]])
    assert roc_auc(scores, targets).item() == pytest.approx(0.75)
    assert d_prime(0.5) == pytest.approx(0.0)
    assert d_prime(0.75) == pytest.approx(math.sqrt(2) * 0.6744897501960817)


def test_class_without_positives_is_left_out():
    scores = torch.tensor([[0.9, 0.2], [0.1, 0.3]])
    targets = torch.tensor([[1, 0], [0, 0]])
    ap = average_precision(scores, targets)
    assert ap[0] == 1.0 and math.isnan(ap[1])
    assert multilabel_metrics(scores, targets)["mAP"] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 40),
    c=st.integers(1, 6),
    levels=st.integers(2, 12),  # few distinct values -> many ties
    seed=st.integers(0, 10_000),
)
def test_matches_scikit_learn(n, c, levels, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size=(n, c)) / levels
    targets = rng.integers(0, 2, size=(n, c))
    targets[0], targets[1] = 1, 0  # every class has a positive and a negative
    ours_ap = average_precision(scores, targets).numpy()
    ours_auc = roc_auc(scores, targets).numpy()
    for k in range(c):
        assert ours_ap[k] == pytest.approx(average_precision_score(targets[:, k], scores[:, k]), abs=1e-12)
        assert ours_auc[k] == pytest.approx(roc_auc_score(targets[:, k], scores[:, k]), abs=1e-12)


def test_single_label_accuracies():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert accuracy(scores, labels) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert singlelabel_metrics(scores, labels, top_k=(3,)) == {"accuracy": pytest.approx(1 / 3), "top3_accuracy": 1.0}


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"must both be \[N, C\]"):
        average_precision(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        accuracy(torch.zeros(3, 2), torch.zeros(2))
