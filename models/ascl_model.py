"""``ASCLModel``: MoCo v2 with adaptive soft targets, as a ``keras.Model``.

Training follows the reference (Feng & Patras, 2022; He et al., 2020):

* the query encoder (backbone + projector) sees the strong view and is
  trained by gradients of ``models.objective``;
* the key encoder is a copy with the same initial weights, run in training
  mode (batch statistics) on the weak view, whose trainable weights follow the
  query encoder as an exponential moving average after every optimiser step,
  ``key = m * key + (1 - m) * query``, and never receive gradients;
* the key batch is shuffled before the key encoder and unshuffled after, so
  that with split BN a key is never normalised with its own query's group
  (across replicas under a strategy, as MoCo shuffles across GPUs);
* a FIFO memory queue ``[M, D]`` of unit-norm keys (a ring with a pointer)
  supplies the negatives and the neighbours of the soft targets.  Logits and
  targets use the queue as it was *before* the step; then the step's keys
  enter it.

Under a ``tf.distribute`` strategy every replica holds a slice of the global
batch.  Keys from all replicas are gathered in replica order and every
replica writes the same global keys into its copy of the queue, so the copies
stay identical; the loss is the sum over the replica's examples divided by
the *global* batch size, so the summed gradients equal those of one device on
the global batch.
"""

import keras
import tensorflow as tf

from models.momentum_encoder import MomentumEncoderModel, l2_normalize, replica_offset
from models.objective import (
    ascl_targets,
    contrastive_logits,
    soft_cross_entropy,
    validate_objective_args,
)


def _unit_rows_initializer(seed):
    """Random unit vectors: the queue's state before any key has been seen."""
    normal = keras.initializers.RandomNormal(seed=seed)

    def initializer(shape, dtype=None):
        return tf.math.l2_normalize(normal(shape, dtype=dtype), axis=1)

    return initializer


@keras.saving.register_keras_serializable(package="ascl")
class ASCLModel(MomentumEncoderModel):
    """Adaptive Soft Contrastive Learning over a backbone and a projection head.

    Args:
      backbone: functional ``keras.Model`` from images to ``[B, F]`` features;
        it becomes the query-side backbone (``model.backbone``).
      projector: ``keras.Model`` from ``[B, F]`` to ``[B, D]`` embeddings.
      memory_size: M, the number of keys in the memory queue (any M >= 1).
      momentum: m of the key encoder's moving average, in ``[0, 1]``.
      t1: temperature of the query logits.
      t2: temperature of the key-to-queue distribution that gives the soft
        targets.
      num_neighbors: K, neighbours a key may credit (<= M).
      mode: ``"ascl"``, ``"ahcl"``, ``"hard"`` or ``"moco"``; see
        ``models.objective.ascl_targets``.
      shuffle_keys: shuffle the key batch around the key encoder (MoCo's shuffled BN),
        across replicas under a strategy (``_keys_and_gathered``).
      seed: seeds the initial queue and the key shuffles.
      weight_decay: coefficient of an L2 penalty ``wd/2 * sum ||w||^2`` on every
        trainable query weight, added to the loss so that, as with
        ``torch.optim.SGD(weight_decay=...)`` in the reference, the decay
        passes through the optimiser's momentum.
      label_purity: report ``soft_label_purity``, the share of each target
        row's queue mass that falls on keys of the query's class (a diagnosis
        of whether the soft targets' neighbours are semantic).  It needs
        labels in the data; labels never enter the loss.

    ``fit`` takes elements ``(strong_view, weak_view)``, optionally followed
    by labels, or dicts with keys ``"strong_view"`` and ``"weak_view"`` (and
    ``"label"``).  Labels only feed the label queue kept beside the key queue
    (as the reference keeps one) for ``soft_label_purity``; with or without
    them the step is the same.  ``model(images)`` and ``predict`` return
    backbone features.

    Example:
      >>> from models import build_backbone, projection_head
      >>> backbone = build_backbone("small_cnn", input_shape=(32, 32, 3))
      >>> model = ASCLModel(backbone, projection_head(backbone.feature_dim),
      ...                   memory_size=4096)
      >>> model.compile(optimizer=keras.optimizers.SGD(0.06, momentum=0.9))
      >>> # model.fit(dataset_of_view_pairs, epochs=...)
    """

    def __init__(self, backbone, projector, *, memory_size=4096, momentum=0.99, t1=0.1,
                 t2=0.05, num_neighbors=5, mode="ascl", shuffle_keys=True, seed=None,
                 weight_decay=0.0, label_purity=False, **kwargs):
        validate_objective_args(t1=t1, t2=t2, num_neighbors=num_neighbors, mode=mode,
                                memory_size=memory_size)
        super().__init__(backbone, projector, momentum=momentum, seed=seed,
                         weight_decay=weight_decay, label_purity=label_purity, **kwargs)
        self.memory_size = memory_size
        self.t1 = float(t1)
        self.t2 = float(t2)
        self.num_neighbors = num_neighbors
        self.mode = mode
        self.shuffle_keys = bool(shuffle_keys)

        self.queue = self.add_weight(
            shape=(memory_size, self.embedding_dim), initializer=_unit_rows_initializer(seed),
            dtype="float32", trainable=False, autocast=False, name="queue")
        self.queue_pointer = self.add_weight(
            shape=(), initializer="zeros", dtype="int64", trainable=False, name="queue_pointer")
        # The class of each queued key, -1 when unknown: for the purity diagnosis only.
        self.label_queue = self.add_weight(
            shape=(memory_size,), initializer=keras.initializers.Constant(-1), dtype="int64",
            trainable=False, name="label_queue")
        self.accuracy_tracker = keras.metrics.Mean(name="contrastive_accuracy")
        self.built = True

    def _form_metrics(self):
        return [self.accuracy_tracker]

    # ------------------------------------------------------------------ training
    def _keys_and_gathered(self, weak):
        """``(keys, gathered)``: unit keys of this replica's weak views, through the key
        encoder in training mode, and all replicas' keys in replica order when this already
        gathered them (else None), so that enqueueing need not gather them again.

        With ``shuffle_keys`` the batch is permuted before the key encoder and the keys put
        back in order after it, so that batch norm never normalises a key with its own
        query's group (MoCo's shuffled BN).  Under a strategy with several replicas the
        permutation runs over the *global* batch, as MoCo's does across GPUs: every replica
        gathers all weak views, draws the same permutation (one stateless seed), encodes its
        slice of the permuted batch, and takes its own keys back from the gathered result.
        One device draws the same permutation of the same global batch, so ``norm="split"``
        with one split per replica computes the same keys on one device.
        """
        if not self.shuffle_keys:
            return tf.stop_gradient(l2_normalize(self.key_encoder(weak, training=True))), None
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        local = keras.ops.shape(weak)[0]
        # tf.identity: under MultiWorkerMirroredStrategy, all_gather of an input tensor
        # as the iterator hands it over fails ("destinations can not be empty").
        batch = context.all_gather(tf.identity(weak), axis=0) if replicas > 1 else weak
        size = keras.ops.shape(batch)[0]
        order = tf.argsort(tf.random.stateless_uniform((size,), seed=self._step_seed()))
        if replicas == 1:
            keys = self.key_encoder(tf.gather(batch, order), training=True)
            return tf.stop_gradient(l2_normalize(tf.gather(keys, tf.argsort(order)))), None
        start = replica_offset(batch, local, context)
        mine = order[start:start + local]  # this replica's slice of the permuted batch
        keys = context.all_gather(self.key_encoder(tf.gather(batch, mine), training=True),
                                  axis=0)
        keys = tf.stop_gradient(l2_normalize(tf.gather(keys, tf.argsort(order))))  # global order
        return keys[start:start + local], keys

    def _objective(self, strong, keys, queue, training):
        """``(per-example loss, (logits, targets, confidence, queries))``."""
        queries = l2_normalize(self.query_encoder(strong, training=training))
        logits = contrastive_logits(queries, keys, queue, t1=self.t1)
        targets, confidence = ascl_targets(keys, queue, t2=self.t2,
                                           num_neighbors=self.num_neighbors, mode=self.mode)
        return soft_cross_entropy(targets, logits), (logits, targets, confidence, queries)

    def _update_metrics(self, per_example_loss, logits, targets, confidence, queries):
        self._track_spread(tf.stop_gradient(queries))
        self.loss_tracker.update_state(per_example_loss)
        self.confidence_tracker.update_state(confidence)
        self.max_soft_label_tracker.update_state(tf.reduce_max(targets[:, 1:], axis=1))
        self.accuracy_tracker.update_state(
            tf.cast(tf.equal(tf.argmax(logits, axis=1), 0), tf.float32))
        return self._metric_logs()

    def train_step(self, data):
        strong, weak, labels = self._unpack(data)
        keys, gathered = self._keys_and_gathered(weak)
        queue = tf.identity(self.queue.value)  # the queue before this step's keys
        label_queue = tf.identity(self.label_queue.value)
        per_example_loss, (logits, targets, confidence, queries) = self._minimize(
            lambda: self._objective(strong, keys, queue, training=True), [self.query_encoder])
        if labels is not None and self.label_purity:
            self.purity_tracker.update_state(
                *self._purity(targets[:, 1:], labels, label_queue))
        self._enqueue(keys, labels, gathered)
        return self._update_metrics(per_example_loss, logits, targets, confidence, queries)

    def test_step(self, data):
        """The training objective on held-out pairs; updates neither queue nor keys."""
        strong, weak, _ = self._unpack(data)
        keys = tf.stop_gradient(l2_normalize(self.key_encoder(weak, training=False)))
        per_example_loss, (logits, targets, confidence, queries) = self._objective(
            strong, keys, tf.identity(self.queue.value), training=False)
        return self._update_metrics(per_example_loss, logits, targets, confidence, queries)

    def _enqueue(self, keys, labels=None, gathered=None):
        """Writes this step's keys (all replicas', in replica order; ``gathered`` when the key
        shuffle already gathered them) into the ring, and their labels (-1 when the data has
        none) into the label queue at the same places."""
        if labels is None:
            labels = tf.fill(tf.shape(keys)[:1], tf.constant(-1, tf.int64))
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            keys = gathered if gathered is not None else context.all_gather(keys, axis=0)
            labels = context.all_gather(labels, axis=0)
        size = self.memory_size
        count = keras.ops.shape(keys)[0]
        pointer = self.queue_pointer.value
        # With more keys than slots only the newest M survive a FIFO; writing
        # just those keeps scatter indices unique.
        skip = max(count - size, 0) if isinstance(count, int) else tf.maximum(count - size, 0)
        kept = keys[skip:]
        positions = (pointer + tf.cast(skip + tf.range(tf.shape(kept)[0]), tf.int64)) % size
        self.queue.assign(tf.tensor_scatter_nd_update(self.queue.value, positions[:, None], kept))
        self.label_queue.assign(tf.tensor_scatter_nd_update(
            self.label_queue.value, positions[:, None], labels[skip:]))
        self.queue_pointer.assign((pointer + tf.cast(count, tf.int64)) % size)

    # ------------------------------------------------------------- serialisation
    def get_config(self):
        return {**super().get_config(), "memory_size": self.memory_size, "t1": self.t1,
                "t2": self.t2, "num_neighbors": self.num_neighbors, "mode": self.mode,
                "shuffle_keys": self.shuffle_keys}
