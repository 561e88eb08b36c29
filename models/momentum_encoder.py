"""``MomentumEncoderModel``: what the MoCo and BYOL forms of ASCL share.

Both train an online encoder (backbone + projector) by gradients and keep a
copy of it, the momentum (target) encoder, that follows it as an exponential
moving average and never receives gradients; both read the same training
elements and decay weights the same way.  ``ASCLModel`` (a memory queue) and
``BYOLModel`` (a predictor, in-batch neighbours) add only their objective.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from models.collapse import projection_spread
from models.keras_workarounds import BuildsOnlyTheOptimizer, across_workers, reducible_logs

VIEW_KEYS = ("strong_view", "weak_view")
MOMENTUM_SCHEDULES = ("constant", "cosine")


def ema_momentum(base, step, total_steps, schedule="constant"):
    """The target branch's momentum at optimiser ``step``.

    ``constant``: ``base`` throughout (MoCo, the reference's BYOL).  ``cosine``: BYOL's
    schedule (Grill et al. 2020, section 3.2), ``1 - (1 - base) * (cos(pi k / K) + 1) / 2``,
    from ``base`` at step 0 to 1 at ``total_steps``: the target moves less and less as the
    online network settles.
    """
    if schedule == "constant":
        return tf.constant(base, tf.float32)
    progress = tf.minimum(tf.cast(step, tf.float32) / float(total_steps), 1.0)
    return 1.0 - (1.0 - base) * (tf.cos(math.pi * progress) + 1.0) / 2.0


def _encoder(backbone, projector, name):
    inputs = keras.Input(shape=backbone.input_shape[1:], name="images")
    return keras.Model(inputs, projector(backbone(inputs)), name=name)


def replica_offset(gathered, local, context):
    """The row where this replica's ``local`` rows start in ``gathered``, a batch gathered
    across replicas in replica order.  Replicas must hold equal slices: unequal ones (a
    ``fit`` whose last global batch does not split evenly) fail loudly here instead of
    mixing up rows."""
    check = tf.debugging.assert_equal(
        tf.shape(gathered)[0], local * context.num_replicas_in_sync,
        message="every replica must hold the same number of examples (drop the remainder "
                "of the global batch)")
    with tf.control_dependencies([check]):
        return tf.cast(context.replica_id_in_sync_group, tf.int32) * local


def l2_normalize(x):
    """Unit rows in float32, whatever the compute dtype."""
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=1)


class MomentumEncoderModel(BuildsOnlyTheOptimizer, keras.Model):
    """Base of ``ASCLModel`` and ``BYOLModel``; not used on its own.

    Args:
      backbone: functional ``keras.Model`` from images to ``[B, F]`` features
        (``model.backbone``; ``model(images)`` returns its features).
      projector: ``keras.Model`` from ``[B, F]`` to ``[B, D]`` (``model.projector``).
      momentum: m of ``key = m * key + (1 - m) * query`` after every step (the base
        value when ``momentum_schedule`` is ``"cosine"``).
      momentum_schedule: ``"constant"`` (the reference) or ``"cosine"`` (BYOL's: from
        ``momentum`` to 1 over ``momentum_steps``, see ``ema_momentum``).
      momentum_steps: the run's optimiser steps; ``"cosine"`` needs it to train (a model
        built only to embed or evaluate may leave it None).
      seed: seeds what the subclass draws (queue, key shuffles).
      weight_decay: an L2 penalty ``wd/2 * sum ||w||^2`` on every trainable
        weight, added to the loss so that, as ``torch.optim.SGD(weight_decay=...)``
        in the reference, the decay passes through the optimiser's momentum.
      label_purity: report ``soft_label_purity`` (needs labels in the data;
        labels never enter the loss).

    Attributes: ``query_encoder`` (online backbone + projector) and
    ``key_encoder`` (its moving average; trainable=False variables, layers
    left trainable so BN uses batch statistics as in the reference).
    """

    def __init__(self, backbone, projector, *, momentum=0.99, momentum_schedule="constant",
                 momentum_steps=None, seed=None, weight_decay=0.0, label_purity=False,
                 **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"`momentum` must be in [0, 1], received momentum={momentum!r}")
        if momentum_schedule not in MOMENTUM_SCHEDULES:
            raise ValueError(f"`momentum_schedule` must be one of {MOMENTUM_SCHEDULES}, "
                             f"received momentum_schedule={momentum_schedule!r}")
        if momentum_steps is not None and not momentum_steps > 0:
            raise ValueError(f"`momentum_steps` must be > 0, received "
                             f"momentum_steps={momentum_steps!r}")
        self.momentum_schedule = momentum_schedule
        self.momentum_steps = int(momentum_steps) if momentum_steps else None
        if not weight_decay >= 0.0:
            raise ValueError(f"`weight_decay` must be >= 0, received weight_decay={weight_decay!r}")
        self.momentum = float(momentum)
        self.seed = seed
        self.weight_decay = float(weight_decay)
        self.label_purity = bool(label_purity)
        # Draws are stateless, seeded by (seed, optimiser step): a run restored from its
        # weights and optimiser (the run's backup) continues the same draws, which a
        # SeedGenerator's state, not part of the saved weights, would not.
        if seed is None and across_workers(tf.distribute.get_strategy()):
            raise ValueError(
                "`seed` must be set under MultiWorkerMirroredStrategy: every worker must draw "
                "the same key permutations, and an unseeded model draws its own per process; "
                "received seed=None")
        self._draw_base = int(seed) if seed is not None else int(
            np.random.default_rng().integers(2 ** 31))

        self.backbone = backbone
        self.projector = projector
        self.query_encoder = _encoder(backbone, projector, "query_encoder")
        self.key_encoder = _encoder(keras.models.clone_model(backbone),
                                    keras.models.clone_model(projector), "key_encoder")
        self.key_encoder.set_weights(self.query_encoder.get_weights())
        for weight in self.key_encoder.weights:
            weight.trainable = False
        self.embedding_dim = int(self.query_encoder.output_shape[-1])

        # The metrics both forms report; a form adds its own through _form_metrics.
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.confidence_tracker = keras.metrics.Mean(name="confidence")
        self.max_soft_label_tracker = keras.metrics.Mean(name="max_soft_label")
        self.purity_tracker = keras.metrics.Mean(name="soft_label_purity")
        # The collapse monitor (models.collapse): ~1 spread out, 0 collapsed.
        self.spread_tracker = keras.metrics.Mean(name="projection_spread")

    def _form_metrics(self):
        return []

    @property
    def metrics(self):
        return [self.loss_tracker, self.confidence_tracker, self.max_soft_label_tracker,
                *self._form_metrics(), self.spread_tracker,
                *([self.purity_tracker] if self.label_purity else [])]

    def _track_spread(self, projections):
        """Updates the collapse monitor with the *global* batch's online projections (the
        spread of a replica's slice is not that of the batch), so N replicas log what one
        device on the global batch logs."""
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            projections = context.all_gather(tf.cast(projections, tf.float32), axis=0)
        self.spread_tracker.update_state(projection_spread(projections))

    def call(self, inputs, training=False):
        """Backbone features of ``inputs`` (the embeddings used downstream)."""
        return self.backbone(inputs, training=training)

    # ------------------------------------------------------------------ training
    def _unpack(self, data):
        """``(strong, weak, labels or None)`` of a training element, whatever its documented
        structure (the structure is known when tracing, so this costs nothing per step)."""
        kind = type(self).__name__
        if isinstance(data, dict):
            missing = [key for key in VIEW_KEYS if key not in data]
            if missing:
                raise ValueError(
                    f"{kind} expects dict elements with keys {VIEW_KEYS}; missing {missing}, "
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
            f"{kind} expects elements (strong_view, weak_view[, labels]) or a dict with keys "
            f"{VIEW_KEYS}; received {type(data).__name__} of structure "
            f"{tf.nest.map_structure(lambda t: getattr(t, 'shape', t), data)}")

    def _metric_logs(self):
        """The metrics' results as ``train_step`` / ``test_step`` return them (in a form
        Keras can average across workers: ``keras_workarounds.reducible_logs``)."""
        return reducible_logs({metric.name: metric.result() for metric in self.metrics},
                              tf.distribute.get_strategy())

    def _step_seed(self):
        """``[seed, optimiser step]``: the seed of this step's stateless draws."""
        return tf.stack([tf.constant(self._draw_base, tf.int64),
                         tf.cast(self.optimizer.iterations, tf.int64)])

    def _minimize(self, per_example_loss_fn, trained):
        """One optimiser step on the ``trained`` models' weights, then the momentum update;
        returns what ``per_example_loss_fn`` returned.

        ``per_example_loss_fn()`` runs the forward pass under the tape and returns
        ``(per_example_loss [n], extras)``.  The loss is summed over this replica's rows
        and divided by the *global* batch, so the all-reduced gradients equal those of one
        device on the global batch; the models' own losses and the weight-decay penalty
        are split evenly between replicas for the same reason.
        """
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        variables = [v for model in trained for v in model.trainable_variables]
        with tf.GradientTape() as tape:
            per_example_loss, extras = per_example_loss_fn()
            global_batch = tf.cast(tf.shape(per_example_loss)[0] * num_replicas, tf.float32)
            loss = tf.reduce_sum(per_example_loss) / global_batch
            layer_losses = [value for model in trained for value in model.losses]
            if layer_losses:
                loss += tf.add_n(layer_losses) / num_replicas
            if self.weight_decay:
                # Every replica adds its share; the all-reduced sum is wd * w.
                penalty = tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32)))
                                    for v in variables])
                loss += 0.5 * self.weight_decay * penalty / num_replicas
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(gradients, variables)
        self._momentum_update()
        return per_example_loss, extras

    def _momentum_update(self):
        """``key = m * key + (1 - m) * query`` for every trainable query weight.

        Query weights are identical on all replicas after the all-reduced
        optimiser step, so each replica's local update keeps its key copy
        identical too.
        """
        if self.momentum_schedule == "cosine" and not self.momentum_steps:
            raise ValueError("`momentum_steps` must be the run's optimiser steps to train with "
                             "momentum_schedule='cosine', received momentum_steps=None")
        # The optimiser has counted this step already: k = iterations - 1, from 0.
        m = self.momentum if self.momentum_schedule == "constant" else ema_momentum(
            self.momentum, self.optimizer.iterations - 1, self.momentum_steps,
            self.momentum_schedule)
        for key_weight, query_weight in self._momentum_pairs():
            key_weight.assign(m * key_weight.value + (1.0 - m) * query_weight.value)

    def _momentum_pairs(self):
        pairs = []
        for query_weight, key_weight in zip(self.query_encoder.weights, self.key_encoder.weights):
            if query_weight.trainable:
                pairs.append((key_weight, query_weight))
        return pairs

    @staticmethod
    def _purity(neighbour_mass, labels, neighbour_labels):
        """Per-row share of the target's neighbour mass on neighbours of the row's class,
        and whether the row has labelled neighbour mass at all (-1: unknown label)."""
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
        known = tf.cast(neighbour_labels >= 0, tf.float32)[None, :]
        same = tf.cast(tf.equal(neighbour_labels[None, :], labels[:, None]), tf.float32) * known
        mass = tf.reduce_sum(neighbour_mass * known, axis=1)
        purity = tf.math.divide_no_nan(tf.reduce_sum(neighbour_mass * same, axis=1), mass)
        has_mass = tf.cast((mass > 0) & (labels >= 0), tf.float32)
        return purity, has_mass

    # ------------------------------------------------------------- serialisation
    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "projector": keras.saving.serialize_keras_object(self.projector),
            "momentum": self.momentum,
            "momentum_schedule": self.momentum_schedule,
            "momentum_steps": self.momentum_steps,
            "seed": self.seed,
            "weight_decay": self.weight_decay,
            "label_purity": self.label_purity,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for name in ("backbone", "projector", "predictor"):
            if name in config:
                config[name] = keras.saving.deserialize_keras_object(
                    config[name], custom_objects=custom_objects)
        return cls(**config)
