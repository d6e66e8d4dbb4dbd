"""Embedding probes: kNN by hand, separable data, k-fold bookkeeping, no test leakage, files and CLI entry."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tympan.eval.probe import (
    Split,
    evaluate,
    fit_linear_probe,
    fixed_split,
    fold_splits,
    format_results,
    knn_scores,
    load_embeddings,
    probe_main,
    save_embeddings,
)


def blobs(n_per_class: int = 12, num_classes: int = 4, dim: int = 16, spread: float = 0.3, seed: int = 0):
    """Well separated Gaussian clusters on distinct directions (cosine-separable too)."""
    rng = np.random.default_rng(seed)
    centres = 3 * np.eye(num_classes, dim) + 1.0
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[y] + spread * rng.standard_normal((len(y), dim))
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


def test_knn_matches_hand_computed_case():
    x_train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 1], [-1, 0.05]], dtype=np.float64)
    y_train = np.array([0, 0, 1, 1, 2])
    x_test = np.array([[1, 0.2], [0.6, 0.5]])
    scores = knn_scores(x_train, y_train, x_test, k=3)
    # test 0: nearest 3 are rows 0, 1 (class 0) then row 3 (class 1) -> class 0 wins 2 votes to 1
    assert scores.argmax(1).tolist()[0] == 0
    # test 1: cosine similarities 0.768 (row 0), 0.839 (row 1), 0.640 (row 2), 0.707 (row 3), -0.741 (row 4)
    unit = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    sims = unit @ (x_test[1] / np.linalg.norm(x_test[1]))
    top = np.argsort(-sims)[:3]
    assert sorted(top.tolist()) == [0, 1, 3]
    expected = np.zeros(3)
    for i in top:
        expected[y_train[i]] += 1 + sims[i] / 7
    expected += 3 / 7  # (similarity sum + k) / (2k + 1) for every class
    np.testing.assert_allclose(scores[1].numpy(), expected, atol=1e-12)


def test_knn_tie_goes_to_the_more_similar_class():
    x_train = np.array([[1, 0.0], [0, 1.0]])
    y_train = np.array([1, 0])
    scores = knn_scores(x_train, y_train, np.array([[1, 0.3], [0.3, 1]]), k=2)  # one vote each
    assert scores.argmax(1).tolist() == [1, 0]


def test_knn_multilabel_scores_are_neighbour_label_means():
    x_train = np.array([[1, 0.0], [0.9, 0.1], [0, 1.0]])
    y_train = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=np.float32)
    scores = knn_scores(x_train, y_train, np.array([[1, 0.05]]), k=2)
    np.testing.assert_allclose(scores.numpy(), [[1, 0.5, 0.5]])


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_separable_data_reaches_100_percent(method):
    x, y = blobs()
    folds = np.arange(len(y)) % 4 + 1
    result = evaluate(x, y, fold_splits(folds, y, validation="next"), method, k=3, grid=(1e-2, 1.0))
    assert result["mean"]["accuracy"] == 1.0 and result["std"]["accuracy"] == 0.0
    json.dumps(result)  # JSON-ready
    assert "mean" in format_results(result)


def test_multilabel_probe_on_separable_data():
    x, y = blobs(num_classes=3)
    targets = np.eye(3, dtype=np.float32)[y]
    targets[:, 2] = np.maximum(targets[:, 2], targets[:, 0])  # class 2 also present with class 0
    split = fixed_split(np.where(np.arange(len(y)) % 3 == 0, "test", "train"))
    result = evaluate(x, targets, split, "linear", grid=(1e-2, 1.0))
    assert result["task"] == "multi-label" and result["mean"]["mAP"] == pytest.approx(1.0)


def test_kfold_tests_each_sample_exactly_once():
    x, y = blobs(n_per_class=10, num_classes=3)
    folds = np.array([1, 2, 3, 4, 5] * 6)
    splits = fold_splits(folds, y)
    tested = np.concatenate([s.test for s in splits])
    assert sorted(tested.tolist()) == list(range(len(y)))
    for split in splits:
        assert not set(split.train) & set(split.test)
        assert len(split.valid) == 4  # every other training fold validates in turn
        for valid in split.valid:
            assert set(valid) <= set(split.train) and len(set(folds[valid])) == 1
    result, scores = evaluate(x, y, splits, "knn", k=3, return_scores=True)
    assert not np.isnan(scores).any()
    assert [s["n_test"] for s in result["splits"]] == [6] * 5


def test_fold_splits_with_two_folds_and_next_validation():
    x, y = blobs(n_per_class=10, num_classes=2)
    two = fold_splits(np.arange(20) % 2, y)
    assert all(len(s.valid) == 1 and set(s.valid[0]) < set(s.train) for s in two)
    nxt = fold_splits(np.array(["1", "2", "10"] * 6 + ["1", "2"]), validation="next")
    assert [s.name for s in nxt] == ["fold1", "fold2", "fold10"]  # numeric order, not "10" < "2"
    assert all(len(s.valid) == 1 for s in nxt)


def test_weight_decay_is_chosen_without_the_test_rows():
    """Corrupting a split's test rows (labels and features) changes neither the choice nor the fitted probe."""
    x, y = blobs(n_per_class=10, num_classes=3, spread=1.5, seed=1)  # overlapping: the choice matters
    folds = np.arange(len(y)) % 3
    grid = (1e-2, 1.0, 30.0)
    splits = fold_splits(folds, y)
    base, base_scores = evaluate(x, y, splits[:1], "linear", grid=grid, return_scores=True)
    test = splits[0].test
    x_bad, y_bad = x.copy(), y.copy()
    x_bad[test] = 1e3 * np.random.default_rng(5).standard_normal(x[test].shape)
    y_bad[test] = (y[test] + 1) % 3
    bad, _ = evaluate(x_bad, y_bad, splits[:1], "linear", grid=grid, return_scores=True)
    assert bad["splits"][0]["valid"] == base["splits"][0]["valid"]
    assert bad["splits"][0]["weight_decay"] == base["splits"][0]["weight_decay"]
    # the fitted probe itself is unchanged: refit on the training rows gives the same test predictions
    probe = fit_linear_probe(x[splits[0].train], y[splits[0].train], grid=(base["splits"][0]["weight_decay"],))
    np.testing.assert_allclose(probe.predict(x[test]).numpy(), base_scores[test], atol=1e-8)


def test_grid_choice_is_the_best_on_validation():
    x, y = blobs(n_per_class=20, num_classes=2, spread=1.0, seed=3)
    valid = [np.arange(0, 40, 4)]
    probe = fit_linear_probe(x, y, valid, grid=(1e-3, 1e-1))
    assert set(probe.valid_metrics) == {"0.001", "0.1"}
    best = max(probe.valid_metrics.values())
    assert probe.valid_metrics[f"{probe.weight_decay:g}"] == best


def test_bad_inputs_raise_clear_errors():
    x, y = blobs(n_per_class=4, num_classes=2)
    with pytest.raises(ValueError, match="overlap"):
        evaluate(x, y, [Split("s", np.arange(5), np.arange(4, 8))])
    with pytest.raises(ValueError, match="method"):
        evaluate(x, y, fold_splits(np.arange(8) % 2), "svm")
    with pytest.raises(ValueError, match="unknown split"):
        fixed_split(["train", "tst"])
    with pytest.raises(ValueError, match="NaN"):
        knn_scores(np.full((2, 2), np.nan), [0, 1], np.ones((1, 2)))


def test_probe_main_reads_embeddings_file_and_datafile(tmp_path):
    x, y = blobs(n_per_class=8, num_classes=3)
    keys = [f"audio/clip_{i}.wav" for i in range(len(y))]
    path = save_embeddings(tmp_path / "emb.safetensors", x, keys, {"model": "toy"}, scores=np.eye(3)[y])
    stored = load_embeddings(path)
    assert stored.keys == keys and stored.info == {"model": "toy"} and stored.tensors["scores"].shape == (24, 3)
    np.testing.assert_array_equal(stored.embeddings, x)
    datafile = tmp_path / "data.csv"
    order = np.random.default_rng(0).permutation(len(y))  # rows in another order, matched by file name
    with open(datafile, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "target", "fold"])
        for i in order:
            writer.writerow([f"clip_{i}.wav", ["dog", "cat", "bird"][y[i]], i % 3 + 1])
    out = tmp_path / "result.json"
    result = probe_main(path, datafile, "knn", 3, output=out, quiet=True)
    assert result["mean"]["accuracy"] == 1.0 and result["classes"] == ["bird", "cat", "dog"]
    assert json.loads(out.read_text())["protocol"] == "k-fold"
    # issue 14 item 6: a datafile with more rows than embeddings probes the embedded subset
    half = list(range(0, len(y), 2))
    save_embeddings(tmp_path / "half.safetensors", x[half], [keys[i] for i in half])
    subset = probe_main(tmp_path / "half.safetensors", datafile, "knn", 1, quiet=True)
    assert subset["rows"] == len(half) and subset["mean"]["accuracy"] > 0.5
    with pytest.raises(ValueError, match="none of the 24 datafile rows has an embedding"):
        save_embeddings(tmp_path / "other.safetensors", x[:5], [f"other_{i}.wav" for i in range(5)])
        probe_main(tmp_path / "other.safetensors", datafile, quiet=True)
