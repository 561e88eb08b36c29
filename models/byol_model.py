"""``BYOLModel``: ASCL on BYOL, the paper's second framework, as a ``keras.Model``.

The reference's ``_forward_byol``:

* the online branch (backbone, projector, predictor) sees the strong view and
  is trained by gradients; the target branch, a moving average of the online
  backbone and projector (no predictor), sees the weak view in training mode
  (batch statistics) under stop-gradient, without a key shuffle;
* there is no memory queue: a key's neighbours are the other keys of the
  batch, and the loss regresses the online prediction onto the keys weighted
  by the soft labels of ``models.objective.byol_ascl_targets``; mode
  ``"byol"`` is plain BYOL.

Beyond the reference, two of BYOL's own choices (Grill et al. 2020) are options:
``symmetric`` adds the other direction (weak view predicts the strong view's
keys), and ``momentum_schedule="cosine"`` anneals the target's momentum to 1.

Under a ``tf.distribute`` strategy "the batch" is the global batch, a choice
of this implementation (the reference runs on one GPU): every replica
all-gathers the keys (in replica order), computes the labels over all of them
and keeps its own rows, so a step on N replicas is the step of one device on
the global batch.  With batch norm in the encoders or the predictor that holds
only for ``norm="sync"``, whose statistics are global too.
"""

import keras
import tensorflow as tf

from models.heads import projection_head
from models.momentum_encoder import MomentumEncoderModel, l2_normalize, replica_offset
from models.objective import byol_ascl_targets, byol_regression_loss, validate_byol_args


def prediction_head(dim, *, hidden_dims=(512,), norm="batch", bn_splits=8, name="predictor"):
    """BYOL's predictor ``dim -> 512 -> dim`` (Dense, BN, ReLU, Dense), as the reference."""
    return projection_head(dim, hidden_dims=hidden_dims, output_dim=dim, norm=norm,
                           bn_splits=bn_splits, name=name)


@keras.saving.register_keras_serializable(package="ascl")
class BYOLModel(MomentumEncoderModel):
    """ASCL's in-batch soft labels on BYOL (or plain BYOL) over a backbone and heads.

    Args:
      backbone: functional ``keras.Model`` from images to ``[B, F]`` features
        (``model.backbone``; ``model(images)`` returns its features).
      projector: ``keras.Model`` from ``[B, F]`` to ``[B, D]``.
      predictor: ``keras.Model`` from ``[B, D]`` to ``[B, D]``; by default
        ``prediction_head(D)`` (512 hidden units with batch norm).
      momentum: m of the target branch's moving average.
      t2: temperature of the key-to-key distribution of the soft labels.
      num_neighbors: K, the neighbours a confident key may credit.
      mode: ``"ascl"`` (soft labels) or ``"byol"`` (plain BYOL).
      symmetric: also regress the weak view's prediction onto the target's keys of
        the strong view, and sum the two directions (BYOL's symmetrised loss; the
        reference computes one direction).  The soft labels come from the weak-view
        keys in both directions.
      momentum_schedule, momentum_steps: the target's EMA schedule (see
        ``MomentumEncoderModel``; ``"cosine"`` is BYOL's).
      seed: kept for the config; BYOL draws nothing itself.
      weight_decay: L2 penalty on every trainable weight (online encoder and
        predictor) through the loss, as ``ASCLModel``.
      label_purity: report ``soft_label_purity``, the share of each label
        row's neighbour mass on keys of the row's class (labels are gathered
        across replicas with the keys; they never enter the loss).

    Attributes ``query_encoder`` (online backbone + projector) and
    ``key_encoder`` (the target branch) have the names ``ASCLModel`` uses.
    ``fit`` takes the same elements as ``ASCLModel``.

    Example:
      >>> from models import build_backbone, projection_head
      >>> backbone = build_backbone("small_cnn", input_shape=(32, 32, 3))
      >>> model = BYOLModel(backbone, projection_head(backbone.feature_dim), mode="ascl")
      >>> model.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9))
    """

    def __init__(self, backbone, projector, predictor=None, *, momentum=0.99, t2=0.05,
                 num_neighbors=5, mode="ascl", symmetric=False, seed=None, weight_decay=0.0,
                 label_purity=False, **kwargs):
        validate_byol_args(t2, num_neighbors, mode)
        super().__init__(backbone, projector, momentum=momentum, seed=seed,
                         weight_decay=weight_decay, label_purity=label_purity, **kwargs)
        self.t2 = float(t2)
        self.num_neighbors = num_neighbors
        self.mode = mode
        self.symmetric = bool(symmetric)
        predictor = predictor or prediction_head(self.embedding_dim)
        shapes = (predictor.input_shape[-1], predictor.output_shape[-1])
        if shapes != (self.embedding_dim, self.embedding_dim):
            raise ValueError(
                f"`predictor` must map the projector's {self.embedding_dim}-d embeddings to "
                f"{self.embedding_dim}-d predictions, received one from {shapes[0]} to "
                f"{shapes[1]}")
        self.predictor = predictor
        self.built = True

    # ------------------------------------------------------------------ training
    def _target_keys(self, views, training):
        """Unit target-branch keys of this replica's ``views`` and of the global batch
        (all replicas' in replica order; the same tensor on one device)."""
        local_keys = tf.stop_gradient(l2_normalize(self.key_encoder(views, training=training)))
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return local_keys, context.all_gather(local_keys, axis=0)
        return local_keys, local_keys

    def _batch_targets(self, weak, labels, training):
        """``(keys [N, D], labels of this replica's rows [n, N], confidence [n],
        own-row mask [n, N], every key's class [N] or None)`` over the global batch, from
        the target's keys of the weak views."""
        local_keys, keys = self._target_keys(weak, training)
        context = tf.distribute.get_replica_context()
        gather = context is not None and context.num_replicas_in_sync > 1
        targets, confidence = byol_ascl_targets(keys, t2=self.t2,
                                                num_neighbors=self.num_neighbors, mode=self.mode)
        count = tf.shape(local_keys)[0]
        offset = replica_offset(keys, count, context) if gather else tf.constant(0)
        rows = offset + tf.range(count)  # replicas hold equal slices, gathered in order
        own = tf.one_hot(rows, tf.shape(keys)[0], dtype=tf.float32)
        batch_labels = None
        if labels is not None:
            batch_labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
            batch_labels = context.all_gather(batch_labels, axis=0) if gather else batch_labels
        return (keys, tf.gather(targets, rows), tf.gather(confidence, rows), own, batch_labels)

    def _objective(self, strong, weak, keys, targets, training, strong_keys=None):
        """``(per-example loss [n], online projections of the strong views)``.

        One direction: the online branch predicts, from the strong view, the target's keys
        of the weak views.  With ``symmetric`` the other direction is added: from the weak
        view, the target's keys of the strong views.  Both directions use the soft labels
        of the weak-view keys, the relations the paper trusts (a weak view keeps an image
        recognisable), so both regress onto the same neighbours."""
        projections = self.query_encoder(strong, training=training)
        loss = byol_regression_loss(self.predictor(projections, training=training), keys,
                                    targets)
        if self.symmetric:
            if strong_keys is None:
                _, strong_keys = self._target_keys(strong, training)
            weak_predictions = self.predictor(self.query_encoder(weak, training=training),
                                              training=training)
            loss += byol_regression_loss(weak_predictions, strong_keys, targets)
        return loss, projections

    def _update_metrics(self, per_example_loss, targets, confidence, own, labels, batch_labels,
                        projections):
        self._track_spread(tf.stop_gradient(projections))
        self.loss_tracker.update_state(per_example_loss)
        self.confidence_tracker.update_state(confidence)
        neighbour_mass = targets * (1.0 - own)
        self.max_soft_label_tracker.update_state(tf.reduce_max(neighbour_mass, axis=1))
        if labels is not None and self.label_purity:
            self.purity_tracker.update_state(
                *self._purity(neighbour_mass, labels, batch_labels))
        return self._metric_logs()

    def train_step(self, data):
        strong, weak, labels = self._unpack(data)
        keys, targets, confidence, own, batch_labels = self._batch_targets(
            weak, labels, training=True)
        # the target's keys of the strong views, before the tape (they carry no gradient)
        strong_keys = self._target_keys(strong, True)[1] if self.symmetric else None
        per_example_loss, projections = self._minimize(
            lambda: self._objective(strong, weak, keys, targets, True, strong_keys),
            [self.query_encoder, self.predictor])
        return self._update_metrics(per_example_loss, targets, confidence, own, labels,
                                    batch_labels, projections)

    def test_step(self, data):
        """The training objective on held-out pairs, target branch in inference mode."""
        strong, weak, labels = self._unpack(data)
        keys, targets, confidence, own, batch_labels = self._batch_targets(
            weak, labels, training=False)
        per_example_loss, projections = self._objective(strong, weak, keys, targets, False)
        return self._update_metrics(per_example_loss, targets, confidence, own, labels,
                                    batch_labels, projections)

    # ------------------------------------------------------------- serialisation
    def get_config(self):
        return {**super().get_config(),
                "predictor": keras.saving.serialize_keras_object(self.predictor),
                "t2": self.t2, "num_neighbors": self.num_neighbors, "mode": self.mode,
                "symmetric": self.symmetric}
