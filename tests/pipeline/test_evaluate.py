"""kNN classifier against a brute-force NumPy version; raw-pixel baseline; linear probe."""

import numpy as np
import pytest
import tensorflow as tf

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


def test_knn_every_epoch_reuses_one_traced_graph():
    """The monitor scores a new bank every epoch, with a shorter last chunk: after the first
    calls the traced graph is reused, so TensorFlow neither retraces nor warns about it."""
    rng = np.random.default_rng(0)

    def one_epoch(bank_size):
        bank, queries = _unit(rng.normal(size=(bank_size, 8))), _unit(rng.normal(size=(50, 8)))
        evaluate.knn_scores(bank, rng.integers(0, 5, bank_size), queries, k=20,
                            temperature=0.1, num_classes=5, chunk=16)

    one_epoch(300)
    one_epoch(310)
    traced = evaluate._class_scores.experimental_get_tracing_count()
    for bank_size in (300, 320, 290):
        one_epoch(bank_size)
    assert evaluate._class_scores.experimental_get_tracing_count() == traced


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
                                   epochs=10, lr=0.1, milestones=[0.8], batch_size=128,
                                   augment=False)
    assert result["top1"] > 0.85 and "computed once" in result["inputs"]
    assert result["milestone_epochs"] == [8] and result["lr"] == pytest.approx(0.05)
    augmented = evaluate.linear_probe(flatten, digits16, train_split="train", eval_split="test",
                                      epochs=3, lr=0.1, milestones=[0.6], batch_size=128,
                                      augment=True)
    assert augmented["top1"] > 0.2  # chance is 0.1; crops make pixels a hard linear problem
    assert "RandomResizedCrop" in augmented["inputs"]


def test_probe_milestones_are_fractions_of_the_epochs():
    assert evaluate.probe_milestone_epochs(100, [0.6, 0.8]) == [60, 80]
    assert evaluate.probe_milestone_epochs(30, [0.6, 0.8]) == [18, 24]


@pytest.mark.parametrize("augment", [False, True])
def test_probe_takes_features_as_they_are(digits16, monkeypatch, augment):
    """The classifier sees the backbone's output itself, not a unit-normalised copy."""
    import keras

    built = {}
    compile_ = keras.Model.compile
    monkeypatch.setattr(keras.Model, "compile", lambda model, **kw: (
        built.setdefault("model", model), compile_(model, **kw))[1])
    scaled = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(),
                               keras.layers.Rescaling(7.0)])
    evaluate.linear_probe(scaled, digits16, train_split="train", eval_split="test", epochs=0,
                          lr=1.0, milestones=[0.6], batch_size=128, augment=augment)
    images, _ = next(iter(evaluate.data.eval_dataset(digits16, "test", batch_size=8)))
    features, _ = evaluate.embed(scaled, [(images, tf.zeros([8]))], normalize=False)
    assert np.linalg.norm(features, axis=1).min() > 2.0  # far from unit length
    classifier = built["model"].get_layer("linear_probe")
    expected = classifier(features).numpy()
    model_input = images if augment else features
    np.testing.assert_allclose(built["model"](model_input).numpy(), expected, rtol=1e-5,
                               atol=1e-5)


def test_probe_classifier_and_optimizer_follow_the_reference(digits16, monkeypatch):
    import keras

    built = {}
    compile_ = keras.Model.compile

    def recording_compile(model, optimizer=None, **kwargs):
        built["model"], built["optimizer"] = model, optimizer
        built["initial"] = model.get_layer("linear_probe").get_weights()  # before training
        return compile_(model, optimizer=optimizer, **kwargs)

    monkeypatch.setattr(keras.Model, "compile", recording_compile)
    flatten = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten()])
    evaluate.linear_probe(flatten, digits16, train_split="train", eval_split="test", epochs=10,
                          lr=10.0, milestones=[0.6, 0.8], batch_size=128, augment=False)
    optimizer = built["optimizer"]
    assert optimizer.nesterov and optimizer.momentum == pytest.approx(0.9)
    assert not optimizer.weight_decay
    kernel, bias = built["initial"]
    assert abs(kernel.std() - 0.01) < 0.001 and abs(kernel.mean()) < 0.001  # N(0, 0.01)
    assert not bias.any()
    schedule = optimizer._learning_rate
    steps = -(-1437 // 128)  # batches per epoch
    assert float(schedule(0)) == pytest.approx(5.0)  # lr 10 at batch 256 is 5 at 128
    # the first step of epoch 7 (60% of 10 epochs done) already uses the dropped rate
    assert float(schedule(6 * steps - 1)) == pytest.approx(5.0)
    assert float(schedule(6 * steps)) == pytest.approx(0.5)
    assert float(schedule(8 * steps - 1)) == pytest.approx(0.5)
    assert float(schedule(8 * steps)) == pytest.approx(0.05)
