"""``ASCLModel``: MoCo v2 with adaptive soft targets, as a ``keras.Model``.

Training follows the reference (Feng & Patras, 2022; He et al., 2020):

* the query encoder (backbone + projector) sees the strong view and is
  trained by gradients of ``models.objective``;
* the key encoder is a copy with the same initial weights, run in training
  mode (batch statistics) on the weak view, whose trainable weights follow the
  query encoder as an exponential moving average after every optimiser step,
  ``key = m * key + (1 - m) * query``, and never receive gradients;
* the key batch is shuffled before the key encoder and unshuffled after, so
  that with split BN a key is never normalised with its own query's group;
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
import numpy as np
import tensorflow as tf

from models.objective import ascl_targets, contrastive_logits, soft_cross_entropy
from models.objective import validate_objective_args

VIEW_KEYS = ("strong_view", "weak_view")


def _unit_rows_initializer(seed):
    """Random unit vectors: the queue's state before any key has been seen."""
    normal = keras.initializers.RandomNormal(seed=seed)

    def initializer(shape, dtype=None):
        return tf.math.l2_normalize(normal(shape, dtype=dtype), axis=1)

    return initializer


def _encoder(backbone, projector, name):
    inputs = keras.Input(shape=backbone.input_shape[1:], name="images")
    return keras.Model(inputs, projector(backbone(inputs)), name=name)


def _l2_normalize(x):
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=1)


@keras.saving.register_keras_serializable(package="ascl")
class ASCLModel(keras.Model):
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
      shuffle_keys: shuffle the key batch within each replica around the key
        encoder (MoCo's shuffled BN).
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
        super().__init__(**kwargs)
        validate_objective_args(t1=t1, t2=t2, num_neighbors=num_neighbors, mode=mode,
                                memory_size=memory_size)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"`momentum` must be in [0, 1], received momentum={momentum!r}")
        self.memory_size = memory_size
        self.momentum = float(momentum)
        self.t1 = float(t1)
        self.t2 = float(t2)
        self.num_neighbors = num_neighbors
        self.mode = mode
        self.shuffle_keys = bool(shuffle_keys)
        self.seed = seed
        if not weight_decay >= 0.0:
            raise ValueError(f"`weight_decay` must be >= 0, received weight_decay={weight_decay!r}")
        self.weight_decay = float(weight_decay)
        self.label_purity = bool(label_purity)

        self.backbone = backbone
        self.projector = projector
        self.query_encoder = _encoder(backbone, projector, "query_encoder")
        self.key_encoder = _encoder(keras.models.clone_model(backbone),
                                    keras.models.clone_model(projector), "key_encoder")
        self.key_encoder.set_weights(self.query_encoder.get_weights())
        # The key encoder's layers stay trainable so that BN uses batch
        # statistics as in the reference; its variables are excluded from
        # gradients and optimiser state.
        for weight in self.key_encoder.weights:
            weight.trainable = False
        self.embedding_dim = int(self.query_encoder.output_shape[-1])

        self.queue = self.add_weight(
            shape=(memory_size, self.embedding_dim), initializer=_unit_rows_initializer(seed),
            dtype="float32", trainable=False, autocast=False, name="queue")
        self.queue_pointer = self.add_weight(
            shape=(), initializer="zeros", dtype="int64", trainable=False, name="queue_pointer")
        # The class of each queued key, -1 when unknown: for the purity diagnosis only.
        self.label_queue = self.add_weight(
            shape=(memory_size,), initializer=keras.initializers.Constant(-1), dtype="int64",
            trainable=False, name="label_queue")
        # Key shuffles are stateless, seeded by (seed, optimiser step): a run restored from
        # its weights and optimiser (BackupAndRestore) continues the same shuffles, which a
        # SeedGenerator's state, not part of the saved weights, would not.
        self._shuffle_base = int(seed) if seed is not None else int(
            np.random.default_rng().integers(2 ** 31))

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.confidence_tracker = keras.metrics.Mean(name="confidence")
        self.max_soft_label_tracker = keras.metrics.Mean(name="max_soft_label")
        self.accuracy_tracker = keras.metrics.Mean(name="contrastive_accuracy")
        self.purity_tracker = keras.metrics.Mean(name="soft_label_purity")
        self.built = True

    # ----------------------------------------------------------------- inference
    def call(self, inputs, training=False):
        """Backbone features of ``inputs`` (the embeddings used downstream)."""
        return self.backbone(inputs, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker, self.confidence_tracker, self.max_soft_label_tracker,
                self.accuracy_tracker, *([self.purity_tracker] if self.label_purity else [])]

    def load_own_variables(self, store):
        """Also reads weights saved before the label queue existed (it then starts empty)."""
        own = self._trainable_variables + self._non_trainable_variables
        if len(store.keys()) == len(own) - 1 and own[-1] is self.label_queue:
            for index, variable in enumerate(own[:-1]):
                variable.assign(store[f"{index}"])
            return
        super().load_own_variables(store)

    # ------------------------------------------------------------------ training
    def _unpack(self, data):
        """``(strong, weak, labels or None)`` of a training element, whatever its documented
        structure (the structure is known when tracing, so this costs nothing per step)."""
        if isinstance(data, dict):
            missing = [key for key in VIEW_KEYS if key not in data]
            if missing:
                raise ValueError(
                    f"ASCLModel expects dict elements with keys {VIEW_KEYS}; missing {missing}, "
                    f"received keys {sorted(data)}")
            return data["strong_view"], data["weak_view"], data.get("label")
        if isinstance(data, (tuple, list)) and len(data) in (2, 3):
            if isinstance(data[0], dict):
                return self._unpack(data[0])  # (views, y, sample_weight) from *_on_batch
            if isinstance(data[0], (tuple, list)) and len(data[0]) == 2:
                return data[0][0], data[0][1], data[1]  # ((strong, weak), labels)
            if not isinstance(data[0], (tuple, list, dict)):
                return data[0], data[1], data[2] if len(data) == 3 else None
        raise ValueError(
            "ASCLModel expects elements (strong_view, weak_view[, labels]) or a dict with keys "
            f"{VIEW_KEYS}; received {type(data).__name__} of structure "
            f"{tf.nest.map_structure(lambda t: getattr(t, 'shape', t), data)}")

    def _purity(self, targets, labels, label_queue):
        """Per-row share of the target's queue mass on keys of the row's class, and whether
        the row has labelled queue mass at all."""
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
        known = tf.cast(label_queue >= 0, tf.float32)[None, :]
        same = tf.cast(tf.equal(label_queue[None, :], labels[:, None]), tf.float32) * known
        queue_mass = targets[:, 1:]
        mass = tf.reduce_sum(queue_mass * known, axis=1)
        purity = tf.math.divide_no_nan(tf.reduce_sum(queue_mass * same, axis=1), mass)
        has_mass = tf.cast((mass > 0) & (labels >= 0), tf.float32)
        return purity, has_mass

    def _encode_keys(self, weak):
        if self.shuffle_keys:
            size = weak.shape[0] if weak.shape[0] is not None else tf.shape(weak)[0]
            step = tf.cast(self.optimizer.iterations, tf.int64)
            order = tf.argsort(tf.random.stateless_uniform(
                (size,), seed=tf.stack([tf.constant(self._shuffle_base, tf.int64), step])))
            keys = self.key_encoder(tf.gather(weak, order), training=True)
            keys = tf.gather(keys, tf.argsort(order))
        else:
            keys = self.key_encoder(weak, training=True)
        return tf.stop_gradient(_l2_normalize(keys))

    def _objective(self, strong, keys, queue, training):
        queries = _l2_normalize(self.query_encoder(strong, training=training))
        logits = contrastive_logits(queries, keys, queue, t1=self.t1)
        targets, confidence = ascl_targets(keys, queue, t2=self.t2,
                                           num_neighbors=self.num_neighbors, mode=self.mode)
        return soft_cross_entropy(targets, logits), logits, targets, confidence

    def _update_metrics(self, per_example_loss, logits, targets, confidence):
        self.loss_tracker.update_state(per_example_loss)
        self.confidence_tracker.update_state(confidence)
        self.max_soft_label_tracker.update_state(tf.reduce_max(targets[:, 1:], axis=1))
        self.accuracy_tracker.update_state(
            tf.cast(tf.equal(tf.argmax(logits, axis=1), 0), tf.float32))
        return {metric.name: metric.result() for metric in self.metrics}

    def train_step(self, data):
        strong, weak, labels = self._unpack(data)
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        keys = self._encode_keys(weak)
        queue = tf.identity(self.queue.value)  # the queue before this step's keys
        label_queue = tf.identity(self.label_queue.value)
        variables = self.query_encoder.trainable_variables
        with tf.GradientTape() as tape:
            per_example_loss, logits, targets, confidence = self._objective(
                strong, keys, queue, training=True)
            global_batch = tf.cast(tf.shape(per_example_loss)[0] * num_replicas, tf.float32)
            loss = tf.reduce_sum(per_example_loss) / global_batch
            if self.query_encoder.losses:
                loss += tf.add_n(self.query_encoder.losses) / num_replicas
            if self.weight_decay:
                # Every replica adds its share; the all-reduced sum is wd * w.
                penalty = tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32)))
                                    for v in variables])
                loss += 0.5 * self.weight_decay * penalty / num_replicas
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(gradients, variables)
        self._momentum_update()
        if labels is not None and self.label_purity:
            self.purity_tracker.update_state(*self._purity(targets, labels, label_queue))
        self._enqueue(keys, labels)
        return self._update_metrics(per_example_loss, logits, targets, confidence)

    def test_step(self, data):
        """The training objective on held-out pairs; updates neither queue nor keys."""
        strong, weak, _ = self._unpack(data)
        keys = tf.stop_gradient(_l2_normalize(self.key_encoder(weak, training=False)))
        per_example_loss, logits, targets, confidence = self._objective(
            strong, keys, tf.identity(self.queue.value), training=False)
        return self._update_metrics(per_example_loss, logits, targets, confidence)

    def _momentum_update(self):
        """``key = m * key + (1 - m) * query`` for every trainable query weight.

        Query weights are identical on all replicas after the all-reduced
        optimiser step, so each replica's local update keeps its key copy
        identical too.
        """
        m = self.momentum
        for key_weight, query_weight in self._momentum_pairs():
            key_weight.assign(m * key_weight.value + (1.0 - m) * query_weight.value)

    def _momentum_pairs(self):
        pairs = []
        for query_weight, key_weight in zip(self.query_encoder.weights, self.key_encoder.weights):
            if query_weight.trainable:
                pairs.append((key_weight, query_weight))
        return pairs

    def _enqueue(self, keys, labels=None):
        """Writes this step's keys (all replicas', in replica order) into the ring, and their
        labels (-1 when the data has none) into the label queue at the same places."""
        if labels is None:
            labels = tf.fill(tf.shape(keys)[:1], tf.constant(-1, tf.int64))
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            keys = context.all_gather(keys, axis=0)
            labels = context.all_gather(labels, axis=0)
        size = self.memory_size
        count = keys.shape[0] if keys.shape[0] is not None else tf.shape(keys)[0]
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
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "projector": keras.saving.serialize_keras_object(self.projector),
            "memory_size": self.memory_size,
            "momentum": self.momentum,
            "t1": self.t1,
            "t2": self.t2,
            "num_neighbors": self.num_neighbors,
            "mode": self.mode,
            "shuffle_keys": self.shuffle_keys,
            "seed": self.seed,
            "weight_decay": self.weight_decay,
            "label_purity": self.label_purity,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(
            config["backbone"], custom_objects=custom_objects)
        config["projector"] = keras.saving.deserialize_keras_object(
            config["projector"], custom_objects=custom_objects)
        return cls(**config)
