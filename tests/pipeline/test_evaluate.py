"""kNN classifier against a brute-force NumPy version; raw-pixel baseline; linear probe."""

import numpy as np
import pytest

from pipeline import evaluate


def _brute_force_knn(bank, bank_labels, queries, k, t, classes):
    scores = np.zeros((len(queries), classes))
    for i, q in enumerate(queries):
        sims = bank @ q
        top = np.argsort(-sims, kind="stable")[:k]
        for j in top:
            scores[i, bank_labels[j]] += np.exp(sims[j] / t)
    return scores


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_weighted_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    bank, queries = _unit(rng.normal(size=(300, 8))), _unit(rng.normal(size=(50, 8)))
    labels = rng.integers(0, 5, 300)
    scores = evaluate.knn_scores(bank, labels, queries, k=20, temperature=0.1, num_classes=5,
                                 chunk=16)
    np.testing.assert_allclose(scores, _brute_force_knn(bank, labels, queries, 20, 0.1, 5),
                               rtol=1e-4)


def test_topk_accuracy():
    scores = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    assert evaluate.topk_accuracy(scores, np.array([1, 2, 0]), ks=(1, 2)) == {
        "top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}


def test_knn_ignores_unlabelled_bank_entries():
    bank = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([-1, 0, 1])
    result = evaluate.knn_accuracy((bank, labels), (bank[1:], labels[1:]), k=1, temperature=0.1,
                                   num_classes=2)
    assert result["top1"] == 1.0


def test_raw_pixel_baseline_on_digits_is_strong(digits16):
    result = evaluate.raw_pixel_knn(digits16, train_split="train", eval_split="test", k=20,
                                    temperature=0.1, batch_size=256)
    assert 0.9 < result["top1"] <= 1.0 and result["top5"] >= result["top1"]


def test_linear_probe_learns_on_pixels_of_digits(digits16):
    import keras

    flatten = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten()])
    result = evaluate.linear_probe(flatten, digits16, train_split="train", eval_split="test",
                                   epochs=10, lr=0.1, milestones=[8], batch_size=128,
                                   augment=False)
    assert result["top1"] > 0.85
    augmented = evaluate.linear_probe(flatten, digits16, train_split="train", eval_split="test",
                                      epochs=3, lr=0.1, milestones=[2], batch_size=128,
                                      augment=True)
    assert augmented["top1"] > 0.2  # chance is 0.1; crops make pixels a hard linear problem
