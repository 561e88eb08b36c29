"""The ASCL objective: soft contrastive targets and the loss built on them.

Adaptive Soft Contrastive Learning (Feng & Patras, ICPR 2022) keeps MoCo's
logits but replaces its one-hot target with a soft target that also credits
the memory-queue entries the (weakly augmented) key considers its neighbours.

Everything here is a pure TensorFlow function of its inputs, computed in
float32 whatever the caller's compute dtype, so mixed-precision training does
not change the targets.  All inputs are rows of unit L2 norm:

    queries, keys: [N, D]      queue: [M, D]

Targets (``ascl_targets``)::

    p_ij       = softmax_j(k_i . queue_j / t2)                      [N, M]
    H_i        = -sum_j p_ij log p_ij          (nats, via log_softmax)
    c_i        = 1 - H_i / log(M)              (confidence; 1 when M == 1)
    ascl:  row_i = [1, min(1, K * c_i * p_i)]
    ahcl:  row_i = [1, c_i * onehot(topK(p_i))]
    hard:  row_i = [1, onehot(topK(p_i))]
    moco:  row_i = [1, 0, ..., 0]
    target_i   = row_i / sum(row_i)                                  [N, 1 + M]

with K = ``num_neighbors``.  Column 0 is the positive key, columns 1.. the
queue entries in queue order.

Loss (``ascl_loss``)::

    logits_i = [q_i . k_i, q_i . queue_1, ..., q_i . queue_M] / t1
    loss_i   = -sum_j target_ij log softmax_j(logits_i)

The BYOL form (``byol_ascl_targets``, ``byol_ascl_loss``; the reference's
``_forward_byol``) has no queue: a key's neighbours are the other keys of the
batch, and the loss is BYOL's regression of the online prediction ``h_i`` onto
the target keys, weighted by the soft labels.  For a batch of N keys::

    p_ij       = softmax_{j != i}(k_i . k_j / t2)                   [N, N - 1]
    c_i        = 1 - H(p_i) / log(N - 1)       (1 when N == 2)
    ascl:  label_ij = 1 if j == i else min(1, K * c_i * p_ij)
    byol:  label_ij = 1 if j == i else 0
    label_i    = label_i / sum(label_i)                              [N, N]
    loss_i     = 2 - 2 * sum_j label_ij * (h_i . k_j)
"""

import math

import tensorflow as tf

MODES = ("ascl", "ahcl", "hard", "moco")
BYOL_MODES = ("ascl", "byol")


def validate_objective_args(*, t1=None, t2=None, num_neighbors=None, mode=None,
                            memory_size=None):
    """Raises ``ValueError`` naming the first invalid argument and its value.

    Arguments left as ``None`` are not checked, so callers validate what they
    know (the loss knows ``t1``; a model also knows ``memory_size``).
    """
    if memory_size is not None and (not isinstance(memory_size, int) or memory_size < 1):
        raise ValueError(
            f"`memory_size` must be an integer >= 1, received memory_size={memory_size!r}")
    for name, value in (("t1", t1), ("t2", t2)):
        if value is not None and not value > 0:
            raise ValueError(f"`{name}` (temperature) must be > 0, received {name}={value!r}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, received mode={mode!r}")
    if num_neighbors is not None:
        if not isinstance(num_neighbors, int) or num_neighbors < 1:
            raise ValueError(
                "`num_neighbors` must be an integer >= 1, "
                f"received num_neighbors={num_neighbors!r}")
        if memory_size is not None and num_neighbors > memory_size:
            raise ValueError(
                f"`num_neighbors` must be <= memory_size ({memory_size}), "
                f"received num_neighbors={num_neighbors!r}")


def _queue_size(queue):
    size = queue.shape[0]
    if size is None:
        raise ValueError("`queue` must have a static first dimension (the memory size M)")
    return int(size)


def ascl_targets(keys, queue, *, t2, num_neighbors, mode):
    """Soft targets over ``[positive, queue...]`` and the keys' confidence.

    Args:
      keys: ``[N, D]`` unit-norm key embeddings (the weak view).
      queue: ``[M, D]`` unit-norm memory-queue entries, as they were before
        this step's keys were added.
      t2: temperature of the key-to-queue similarity distribution.
      num_neighbors: K, the number of neighbours a confident key may credit
        (for ``ahcl``/``hard`` the size of the top-K set).
      mode: one of ``"ascl"``, ``"ahcl"``, ``"hard"``, ``"moco"``.

    Returns:
      ``(targets, confidence)``: float32 ``[N, 1 + M]`` rows summing to 1, and
      float32 ``[N]`` confidences in ``[0, 1]``.  Neither carries a gradient.

    Example:
      >>> keys = tf.math.l2_normalize(tf.random.normal([4, 8]), axis=1)
      >>> queue = tf.math.l2_normalize(tf.random.normal([16, 8]), axis=1)
      >>> targets, confidence = ascl_targets(keys, queue, t2=0.05,
      ...                                    num_neighbors=5, mode="ascl")
      >>> targets.shape, confidence.shape
      (TensorShape([4, 17]), TensorShape([4]))
    """
    memory_size = _queue_size(queue)
    validate_objective_args(t2=t2, num_neighbors=num_neighbors, mode=mode,
                            memory_size=memory_size)
    keys = tf.stop_gradient(tf.cast(keys, tf.float32))
    queue = tf.stop_gradient(tf.cast(queue, tf.float32))

    log_p = tf.nn.log_softmax(tf.matmul(keys, queue, transpose_b=True) / t2, axis=-1)
    p = tf.exp(log_p)
    if memory_size == 1:
        # A single entry is a certain distribution; H/log(1) would be 0/0.
        confidence = tf.ones_like(p[:, 0])
    else:
        entropy = -tf.reduce_sum(p * log_p, axis=-1)
        # Rounding can push H a hair above log(M); confidence stays in [0, 1].
        confidence = tf.clip_by_value(1.0 - entropy / math.log(memory_size), 0.0, 1.0)

    if mode == "moco":
        neighbours = tf.zeros_like(p)
    elif mode == "ascl":
        neighbours = tf.minimum(1.0, num_neighbors * confidence[:, None] * p)
    else:
        _, top = tf.math.top_k(p, k=num_neighbors)
        neighbours = tf.reduce_max(tf.one_hot(top, memory_size, dtype=tf.float32), axis=1)
        if mode == "ahcl":
            neighbours = confidence[:, None] * neighbours

    rows = tf.concat([tf.ones_like(p[:, :1]), neighbours], axis=1)
    targets = rows / tf.reduce_sum(rows, axis=1, keepdims=True)
    return tf.stop_gradient(targets), tf.stop_gradient(confidence)


def contrastive_logits(queries, keys, queue, *, t1):
    """``[q.k, q.queue_1, ..., q.queue_M] / t1`` in float32, shape ``[N, 1 + M]``.

    Only ``queries`` carry a gradient: keys come from the momentum encoder and
    the queue is memory, neither of which is trained by backpropagation.
    """
    validate_objective_args(t1=t1)
    queries = tf.cast(queries, tf.float32)
    keys = tf.stop_gradient(tf.cast(keys, tf.float32))
    queue = tf.stop_gradient(tf.cast(queue, tf.float32))
    positive = tf.reduce_sum(queries * keys, axis=1, keepdims=True)
    negatives = tf.matmul(queries, queue, transpose_b=True)
    return tf.concat([positive, negatives], axis=1) / t1


def soft_cross_entropy(targets, logits):
    """Per-row ``-sum_j targets_j * log_softmax(logits)_j``, shape ``[N]``."""
    return -tf.reduce_sum(tf.stop_gradient(targets) * tf.nn.log_softmax(logits, axis=-1), axis=-1)


def ascl_loss(queries, keys, queue, *, t1, t2, num_neighbors, mode):
    """Per-example ASCL cross-entropy ``[N]`` (float32).

    Args:
      queries: ``[N, D]`` unit-norm query embeddings (strong view); the only
        input the loss is differentiated through.
      keys: ``[N, D]`` unit-norm key embeddings (weak view, key encoder).
      queue: ``[M, D]`` unit-norm memory queue before this step's keys.
      t1: temperature of the query logits.
      t2, num_neighbors, mode: as in ``ascl_targets``.

    Returns:
      float32 ``[N]``: the cross-entropy between ``ascl_targets`` and
      ``softmax(contrastive_logits / t1)``.  Average it over the *global*
      batch before taking gradients under a distribution strategy.
    """
    targets, _ = ascl_targets(keys, queue, t2=t2, num_neighbors=num_neighbors, mode=mode)
    logits = contrastive_logits(queries, keys, queue, t1=t1)
    return soft_cross_entropy(targets, logits)


def _unit_rows(x):
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=1)


def _batch_size(tensor, name):
    """The static number of rows of ``tensor``, checked to be >= 2, or None when dynamic."""
    size = tensor.shape[0]
    if size is not None and size < 2:
        raise ValueError(f"`{name}` must hold at least 2 rows (a key's neighbours are the other "
                         f"keys of the batch), received N={size}")
    return size


def validate_byol_args(t2, num_neighbors, mode):
    """``ValueError`` naming the first invalid argument of the BYOL form."""
    if mode not in BYOL_MODES:
        raise ValueError(f"`mode` must be one of {BYOL_MODES}, received mode={mode!r}")
    validate_objective_args(t2=t2, num_neighbors=num_neighbors)


def byol_ascl_targets(keys, *, t2=0.05, num_neighbors=5, mode="ascl"):
    """In-batch soft labels of the BYOL form and the keys' confidence.

    Args:
      keys: ``[N, D]`` key embeddings of the whole (global) batch, N >= 2;
        normalised here.
      t2: temperature of the key-to-key similarity distribution.
      num_neighbors: K, the neighbours a confident key may credit.
      mode: ``"ascl"`` (soft labels) or ``"byol"`` (identity labels).

    Returns:
      ``(labels, confidence)``: float32 ``[N, N]`` rows summing to 1 with the
      positive on the diagonal, and float32 ``[N]`` confidences in ``[0, 1]``
      (computed in both modes, for monitoring).  Neither carries a gradient.

    Example:
      >>> keys = tf.random.normal([6, 8])
      >>> labels, confidence = byol_ascl_targets(keys, t2=0.05, num_neighbors=5)
      >>> labels.shape, confidence.shape
      (TensorShape([6, 6]), TensorShape([6]))
    """
    validate_byol_args(t2, num_neighbors, mode)
    _batch_size(keys, "keys")
    keys = tf.stop_gradient(_unit_rows(keys))
    size = tf.shape(keys)[0]
    diagonal = tf.eye(size, dtype=tf.bool)
    similarity = tf.matmul(keys, keys, transpose_b=True) / t2
    # j == i is left out of the distribution: -inf there makes p_ii = 0 exactly.
    log_p = tf.nn.log_softmax(tf.where(diagonal, -math.inf, similarity), axis=-1)
    p = tf.where(diagonal, 0.0, tf.exp(log_p))
    entropy = -tf.reduce_sum(tf.where(diagonal, 0.0, p * log_p), axis=-1)
    others = tf.cast(size - 1, tf.float32)
    # N == 2: one neighbour is a certain distribution, H/log(1) would be 0/0.
    confidence = tf.where(others > 1.0,
                          1.0 - entropy / tf.math.log(tf.maximum(others, 2.0)), 1.0)
    confidence = tf.clip_by_value(confidence, 0.0, 1.0)
    identity = tf.cast(diagonal, tf.float32)
    if mode == "byol":
        labels = identity
    else:  # p_ii = 0, so the diagonal of the neighbour term is 0 and the positive stays 1
        labels = identity + tf.minimum(1.0, num_neighbors * confidence[:, None] * p)
    labels = labels / tf.reduce_sum(labels, axis=1, keepdims=True)
    return tf.stop_gradient(labels), tf.stop_gradient(confidence)


def byol_regression_loss(predictions, keys, labels):
    """``2 - 2 * sum_j labels_ij * (h_i . k_j)`` per row, float32 ``[n]``.

    ``predictions`` (``[n, D]``) are the rows this device computes; ``keys``
    (``[N, D]``) and ``labels`` (``[n, N]``) span the whole batch, so under a
    strategy each replica passes its own rows of the global labels.  Both
    inputs are normalised here; only ``predictions`` carry a gradient.
    """
    predictions = _unit_rows(predictions)
    keys = tf.stop_gradient(_unit_rows(keys))
    similarity = tf.matmul(predictions, keys, transpose_b=True)
    return 2.0 - 2.0 * tf.reduce_sum(tf.stop_gradient(labels) * similarity, axis=-1)


def byol_ascl_loss(predictions, keys, *, t2=0.05, num_neighbors=5, mode="ascl"):
    """Per-example loss of ASCL on BYOL, float32 ``[N]``.

    Args:
      predictions: ``[N, D]`` online predictions ``predictor(projector(backbone(strong)))``;
        the only input differentiated through.  Normalised here.
      keys: ``[N, D]`` target-network embeddings of the weak views (same order);
        normalised here.
      t2, num_neighbors, mode: as in ``byol_ascl_targets``.

    Returns:
      float32 ``[N]``: ``2 - 2 * sum_j label_ij * (h_i . k_j)``; with
      ``mode="byol"`` BYOL's ``2 - 2 * (h_i . k_i)``.  Average it over the
      *global* batch before taking gradients under a distribution strategy.
    """
    validate_byol_args(t2, num_neighbors, mode)
    size = _batch_size(predictions, "predictions")
    if keys.shape[0] is not None and size is not None and keys.shape[0] != size:
        raise ValueError(f"`predictions` and `keys` must have the same number of rows, "
                         f"received {size} and {keys.shape[0]}")
    labels, _ = byol_ascl_targets(keys, t2=t2, num_neighbors=num_neighbors, mode=mode)
    return byol_regression_loss(predictions, keys, labels)
