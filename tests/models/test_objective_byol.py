"""The BYOL form's in-batch soft labels and loss against an independent NumPy reference."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.objective import byol_ascl_loss, byol_ascl_targets, byol_regression_loss


def _rows(rng, n, d, scale=1.0):
    """Rows of arbitrary norm: the functions normalise their inputs themselves."""
    return (scale * rng.normal(size=(n, d))).astype(np.float32)


def _reference(predictions, keys, t2, k, mode):
    """The formula of the issue, written out with loops over j != i, in float64 NumPy."""
    h = predictions.astype(np.float64)
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    keys = keys.astype(np.float64)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    n = len(keys)
    labels = np.zeros((n, n))
    confidence = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        logits = np.array([keys[i] @ keys[j] / t2 for j in others])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        entropy = -sum(v * math.log(v) for v in p if v > 0)
        confidence[i] = 1.0 - entropy / math.log(n - 1) if n > 2 else 1.0
        labels[i, i] = 1.0
        if mode == "ascl":
            for j, value in zip(others, p):
                labels[i, j] = min(1.0, k * confidence[i] * value)
        labels[i] /= labels[i].sum()
    loss = np.array([2.0 - 2.0 * sum(labels[i, j] * (h[i] @ keys[j]) for j in range(n))
                     for i in range(n)])
    return labels, confidence, loss


@pytest.mark.parametrize("mode", ["ascl", "byol"])
@pytest.mark.parametrize("num_neighbors", [1, 5])
@pytest.mark.parametrize("n", [3, 64])
def test_targets_and_loss_match_numpy_reference(mode, num_neighbors, n):
    rng = np.random.default_rng(n * 10 + num_neighbors)
    predictions, keys = _rows(rng, n, 16, scale=3.0), _rows(rng, n, 16, scale=0.5)
    # A few near-duplicate keys, so that some rows are confident and labels are capped at 1.
    keys[1] = keys[0] + 0.01 * rng.normal(size=16)
    labels, confidence, loss = _reference(predictions, keys, 0.05, num_neighbors, mode)

    got_labels, got_confidence = byol_ascl_targets(keys, t2=0.05, num_neighbors=num_neighbors,
                                                   mode=mode)
    got_loss = byol_ascl_loss(predictions, keys, t2=0.05, num_neighbors=num_neighbors, mode=mode)
    np.testing.assert_allclose(got_labels.numpy(), labels, atol=1e-5)
    np.testing.assert_allclose(got_confidence.numpy(), confidence, atol=1e-5)
    np.testing.assert_allclose(got_loss.numpy(), loss, atol=1e-5)
    assert got_labels.dtype == got_confidence.dtype == got_loss.dtype == tf.float32
    np.testing.assert_allclose(got_labels.numpy().sum(axis=1), 1.0, atol=1e-6)
    if mode == "ascl":
        assert got_labels.numpy()[0, 1] > 0.05  # the near-duplicate got real credit
    else:
        np.testing.assert_array_equal(got_labels.numpy(), np.eye(n))


def test_three_keys_by_hand():
    """k1 = k2 = (1, 0), k3 = (0, 1), t2 = 1/ln 3, K = 5.

    Row 1 over (k2, k3): logits (ln 3, 0), p = (3/4, 1/4), H = ln 4 - (3/4) ln 3,
    c = 1 - H / ln 2 = (3/4) log2(3) - 1 = 0.188722; labels (1, 5 c 3/4, 5 c 1/4) / sum.
    Row 3 over (k1, k2): equal logits, p = (1/2, 1/2), H = ln 2, c = 0: labels (0, 0, 1).
    With h1 = (1, 0): loss1 = 2 - 2 (1 + 5 c 3/4) / (1 + 5 c).
    With h3 = (1, 1)/sqrt 2: loss3 = 2 - 2 (h3 . k3) = 2 - sqrt 2.
    """
    keys = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    predictions = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    c = 0.75 * math.log2(3) - 1.0
    labels, confidence = byol_ascl_targets(keys, t2=1 / math.log(3), num_neighbors=5)
    total = 1 + 5 * c
    np.testing.assert_allclose(confidence.numpy(), [c, c, 0.0], atol=1e-6)
    np.testing.assert_allclose(labels.numpy(), [[1 / total, 3.75 * c / total, 1.25 * c / total],
                                                [3.75 * c / total, 1 / total, 1.25 * c / total],
                                                [0, 0, 1]], atol=1e-6)
    loss = byol_ascl_loss(predictions, keys, t2=1 / math.log(3), num_neighbors=5).numpy()
    np.testing.assert_allclose(loss[0], 2 - 2 * (1 + 3.75 * c) / total, atol=1e-6)
    # h2 = (0, 1) is orthogonal to k1 and k2 and credits k3 with 1.25 c / total
    np.testing.assert_allclose(loss[1], 2 - 2 * 1.25 * c / total, atol=1e-6)
    np.testing.assert_allclose(loss[2], 2 - math.sqrt(2), atol=1e-6)
    plain = byol_ascl_loss(predictions, keys, mode="byol").numpy()
    np.testing.assert_allclose(plain, [0.0, 2.0, 2 - math.sqrt(2)], atol=1e-6)


def test_two_keys_are_fully_confident():
    keys = np.array([[1, 0], [0.6, 0.8]], np.float32)
    labels, confidence = byol_ascl_targets(keys, t2=0.05, num_neighbors=1)
    np.testing.assert_allclose(confidence.numpy(), [1.0, 1.0])
    np.testing.assert_allclose(labels.numpy(), [[0.5, 0.5], [0.5, 0.5]], atol=1e-6)


def test_gradient_reaches_predictions_only():
    rng = np.random.default_rng(0)
    predictions, keys = tf.Variable(_rows(rng, 6, 8)), tf.Variable(_rows(rng, 6, 8))
    with tf.GradientTape(persistent=True) as tape:
        loss = tf.reduce_sum(byol_ascl_loss(predictions, keys))
    assert tape.gradient(loss, keys) is None
    assert np.abs(tape.gradient(loss, predictions).numpy()).sum() > 0


def test_rows_of_the_global_labels_give_the_same_loss():
    """What a replica computes: its rows of the labels against every key."""
    rng = np.random.default_rng(1)
    predictions, keys = _rows(rng, 8, 8), _rows(rng, 8, 8)
    labels, _ = byol_ascl_targets(keys)
    whole = byol_ascl_loss(predictions, keys).numpy()
    halves = [byol_regression_loss(predictions[s], keys, tf.gather(labels, np.arange(8)[s]))
              for s in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(np.concatenate(halves), whole, atol=1e-6)


def test_low_precision_inputs_are_computed_in_float32():
    rng = np.random.default_rng(2)
    predictions, keys = _rows(rng, 16, 8), _rows(rng, 16, 8)
    exact = byol_ascl_loss(predictions, keys).numpy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    low = byol_ascl_loss(tf.cast(predictions, tf.bfloat16), tf.cast(keys, tf.bfloat16))
    labels, confidence = byol_ascl_targets(tf.cast(keys, tf.bfloat16))
    assert low.dtype == labels.dtype == confidence.dtype == tf.float32
    np.testing.assert_allclose(low.numpy(), exact, atol=0.05)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="moco"), "mode='moco'"), (dict(mode="ahcl"), "mode='ahcl'"),
    (dict(num_neighbors=0), "num_neighbors=0"), (dict(num_neighbors=2.5), "num_neighbors=2.5"),
    (dict(t2=0.0), "t2=0.0"), (dict(t2=-1.0), "t2=-1.0"),
])
def test_invalid_arguments_name_the_argument(kwargs, message):
    keys = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        byol_ascl_targets(keys, **kwargs)
    with pytest.raises(ValueError, match=message):
        byol_ascl_loss(keys, keys, **kwargs)


def test_a_batch_of_one_is_refused():
    one = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match="`keys` must hold at least 2 rows.*N=1"):
        byol_ascl_targets(one)
    with pytest.raises(ValueError, match="`predictions` must hold at least 2 rows.*N=1"):
        byol_ascl_loss(one, one)
    with pytest.raises(ValueError, match="same number of rows, received 3 and 2"):
        byol_ascl_loss(np.ones((3, 4), np.float32), np.ones((2, 4), np.float32))
