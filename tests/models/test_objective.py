"""The ASCL targets and loss against values computed independently in NumPy."""

import math

import numpy as np
import pytest
import tensorflow as tf

from models.objective import ascl_loss, ascl_targets, contrastive_logits, validate_objective_args

MODES = ("ascl", "ahcl", "hard", "moco")


def _unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _reference_targets(keys, queue, t2, k, mode):
    """The formula of the paper, step by step, in float64 NumPy."""
    keys = keys.astype(np.float64)
    queue = queue.astype(np.float64)
    m = queue.shape[0]
    logits = keys @ queue.T / t2
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    confidence = 1.0 - entropy / math.log(m)
    rows = np.zeros((keys.shape[0], 1 + m))
    rows[:, 0] = 1.0
    for i in range(keys.shape[0]):
        top = np.argsort(-p[i], kind="stable")[:k]
        if mode == "ascl":
            rows[i, 1:] = np.minimum(1.0, k * confidence[i] * p[i])
        elif mode == "ahcl":
            rows[i, 1 + top] = confidence[i]
        elif mode == "hard":
            rows[i, 1 + top] = 1.0
    return rows / rows.sum(axis=1, keepdims=True), confidence


def _reference_loss(queries, keys, queue, t1, t2, k, mode):
    targets, _ = _reference_targets(keys, queue, t2, k, mode)
    q = queries.astype(np.float64)
    logits = np.concatenate([np.sum(q * keys, axis=1, keepdims=True), q @ queue.T], axis=1) / t1
    logits -= logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.sum(targets * log_softmax, axis=1)


def _clustered_problem(seed, n=6, m=40, d=8):
    """Keys near some queue entries, so confidences are far from 0 and 1."""
    rng = np.random.default_rng(seed)
    queue = _unit_rows(rng, m, d)
    keys = queue[:n] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    queries = keys + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries.astype(np.float32), keys.astype(np.float32), queue


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_neighbors", [1, 5])
def test_targets_match_numpy_reference(mode, num_neighbors):
    _, keys, queue = _clustered_problem(seed=num_neighbors)
    targets, confidence = ascl_targets(keys, queue, t2=0.05, num_neighbors=num_neighbors, mode=mode)
    expected_targets, expected_confidence = _reference_targets(
        keys, queue, 0.05, num_neighbors, mode)
    assert targets.shape == (6, 41) and confidence.shape == (6,)
    assert targets.dtype == tf.float32 and confidence.dtype == tf.float32
    np.testing.assert_allclose(targets.numpy(), expected_targets, atol=1e-5)
    np.testing.assert_allclose(confidence.numpy(), expected_confidence, atol=1e-5)
    np.testing.assert_allclose(targets.numpy().sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_neighbors", [1, 5])
def test_loss_matches_numpy_reference(mode, num_neighbors):
    queries, keys, queue = _clustered_problem(seed=10 + num_neighbors)
    loss = ascl_loss(queries, keys, queue, t1=0.1, t2=0.05, num_neighbors=num_neighbors, mode=mode)
    expected = _reference_loss(queries, keys, queue, 0.1, 0.05, num_neighbors, mode)
    assert loss.shape == (6,)
    np.testing.assert_allclose(loss.numpy(), expected, atol=1e-5, rtol=1e-6)


def test_two_entry_queue_by_hand():
    """keys=[1,0], queue=[[1,0],[0,1]], t2=1, K=1, worked out on paper."""
    keys = np.array([[1.0, 0.0]], np.float32)
    queue = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    p1 = math.e / (math.e + 1.0)  # softmax([1, 0])
    p2 = 1.0 / (math.e + 1.0)
    confidence = 1.0 - (-(p1 * math.log(p1) + p2 * math.log(p2))) / math.log(2.0)
    row = np.array([1.0, confidence * p1, confidence * p2])

    targets, conf = ascl_targets(keys, queue, t2=1.0, num_neighbors=1, mode="ascl")
    np.testing.assert_allclose(conf.numpy(), [confidence], atol=1e-6)
    np.testing.assert_allclose(targets.numpy()[0], row / row.sum(), atol=1e-6)

    targets, _ = ascl_targets(keys, queue, t2=1.0, num_neighbors=1, mode="ahcl")
    np.testing.assert_allclose(targets.numpy()[0], np.array([1, confidence, 0]) / (1 + confidence),
                               atol=1e-6)
    targets, _ = ascl_targets(keys, queue, t2=1.0, num_neighbors=1, mode="hard")
    np.testing.assert_allclose(targets.numpy()[0], [0.5, 0.5, 0.0], atol=1e-6)
    targets, _ = ascl_targets(keys, queue, t2=1.0, num_neighbors=1, mode="moco")
    np.testing.assert_allclose(targets.numpy()[0], [1.0, 0.0, 0.0], atol=1e-6)


def test_soft_label_is_capped_at_one():
    """A key identical to a queue entry at a tiny t2: K*c*p exceeds 1 and is clipped."""
    queue = np.eye(4, dtype=np.float32)
    keys = queue[:1]
    targets, confidence = ascl_targets(keys, queue, t2=0.01, num_neighbors=5 - 1, mode="ascl")
    assert confidence.numpy()[0] > 0.99
    np.testing.assert_allclose(targets.numpy()[0], [0.5, 0.5, 0, 0, 0], atol=1e-6)


def test_uniform_similarity_gives_zero_confidence_and_moco_targets():
    queue = np.tile(np.array([[1.0, 0.0]], np.float32), (8, 1))
    keys = np.array([[0.0, 1.0]], np.float32)
    for mode in ("ascl", "ahcl"):
        targets, confidence = ascl_targets(keys, queue, t2=0.05, num_neighbors=3, mode=mode)
        np.testing.assert_allclose(confidence.numpy(), [0.0], atol=1e-6)
        np.testing.assert_allclose(targets.numpy()[0], [1.0] + [0.0] * 8, atol=1e-6)


def test_extreme_temperatures_give_finite_values():
    rng = np.random.default_rng(0)
    keys, queue = _unit_rows(rng, 4, 16), _unit_rows(rng, 64, 16)
    for mode in MODES:
        targets, confidence = ascl_targets(keys, queue, t2=1e-4, num_neighbors=5, mode=mode)
        assert np.all(np.isfinite(targets.numpy())) and np.all(np.isfinite(confidence.numpy()))
        loss = ascl_loss(keys, keys, queue, t1=1e-3, t2=1e-4, num_neighbors=5, mode=mode)
        assert np.all(np.isfinite(loss.numpy()))


def test_single_entry_queue_is_fully_confident():
    keys = np.array([[1.0, 0.0]], np.float32)
    queue = np.array([[0.0, 1.0]], np.float32)
    targets, confidence = ascl_targets(keys, queue, t2=0.05, num_neighbors=1, mode="ascl")
    np.testing.assert_allclose(confidence.numpy(), [1.0])
    np.testing.assert_allclose(targets.numpy()[0], [0.5, 0.5], atol=1e-6)


def test_gradient_reaches_queries_only():
    queries, keys, queue = (tf.constant(a) for a in _clustered_problem(seed=3))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([queries, keys, queue])
        loss = tf.reduce_sum(ascl_loss(queries, keys, queue, t1=0.1, t2=0.05, num_neighbors=5,
                                       mode="ascl"))
    assert tape.gradient(loss, queries) is not None
    assert tape.gradient(loss, keys) is None
    assert tape.gradient(loss, queue) is None


def test_low_precision_inputs_are_computed_in_float32():
    queries, keys, queue = _clustered_problem(seed=4)
    full = ascl_loss(queries, keys, queue, t1=0.1, t2=0.05, num_neighbors=5, mode="ascl")
    half = ascl_loss(*(tf.cast(a, tf.bfloat16) for a in (queries, keys, queue)),
                     t1=0.1, t2=0.05, num_neighbors=5, mode="ascl")
    assert half.dtype == tf.float32
    # the same inputs rounded to bfloat16, then computed in float32: equal to float32 precision,
    # so only the inputs were low precision, not the arithmetic
    rounded = ascl_loss(*(tf.cast(tf.cast(a, tf.bfloat16), tf.float32)
                          for a in (queries, keys, queue)),
                        t1=0.1, t2=0.05, num_neighbors=5, mode="ascl")
    np.testing.assert_allclose(half.numpy(), rounded.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(half.numpy(), full.numpy(), rtol=0.05)


def test_logits_layout():
    queries, keys, queue = _clustered_problem(seed=5)
    logits = contrastive_logits(queries, keys, queue, t1=0.5).numpy()
    np.testing.assert_allclose(logits[:, 0], np.sum(queries * keys, axis=1) / 0.5, atol=1e-5)
    np.testing.assert_allclose(logits[:, 1:], queries @ queue.T / 0.5, atol=1e-5)


@pytest.mark.parametrize("kwargs, name", [
    (dict(t1=0.0), "t1"), (dict(t2=-1.0), "t2"), (dict(mode="simclr"), "mode"),
    (dict(num_neighbors=0), "num_neighbors"), (dict(memory_size=0), "memory_size"),
    (dict(num_neighbors=9, memory_size=8), "num_neighbors"),
])
def test_invalid_arguments_name_the_argument_and_value(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`.*{name}="):
        validate_objective_args(**kwargs)


def test_targets_reject_more_neighbours_than_queue_entries():
    _, keys, queue = _clustered_problem(seed=6, n=2, m=4)
    with pytest.raises(ValueError, match="num_neighbors=5"):
        ascl_targets(keys, queue, t2=0.05, num_neighbors=5, mode="hard")
