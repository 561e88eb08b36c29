"""Batch-normalisation choices for the encoders.

Contrastive models can "cheat" through batch statistics: when every query and
its key are normalised with the same batch's mean and variance, the network
can use those statistics to find the positive.  MoCo's remedies are kept:

* ``"batch"``: plain Keras ``BatchNormalization`` (per replica).
* ``"split"``: ghost BN, ``SplitBatchNormalization``; each of ``bn_splits``
  sub-batches is normalised with its own statistics.  The reference uses 8
  splits on a single device, together with shuffling the key batch.
* ``"sync"``: statistics over the global batch across replicas
  (``BatchNormalization(synchronized=True)``).
* ``"none"``: no normalisation (a BN-free encoder; used to check that
  distributed training is exactly single-device training).

PyTorch's BN defaults (momentum 0.1, epsilon 1e-5) are used, as in the
reference, i.e. Keras ``momentum=0.9``.
"""

import keras
from keras import ops

NORMALIZATIONS = ("batch", "split", "sync", "none")
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="ascl")
class SplitBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalisation with statistics computed per sub-batch ("ghost BN").

    In training the batch is cut into ``num_splits`` equal consecutive groups
    and each group is normalised with its own mean and variance; the moving
    statistics track the average over groups.  At inference it is ordinary
    batch normalisation with the moving statistics.

    Args:
      num_splits: number of sub-batches; the batch size must be a multiple.
      **kwargs: as for ``keras.layers.BatchNormalization`` (channels-last only).

    Example:
      >>> bn = SplitBatchNormalization(num_splits=4)
      >>> y = bn(keras.random.normal((8, 4, 4, 16)), training=True)
    """

    def __init__(self, num_splits=8, **kwargs):
        kwargs.setdefault("momentum", BN_MOMENTUM)
        kwargs.setdefault("epsilon", BN_EPSILON)
        super().__init__(**kwargs)
        if not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(
                f"`num_splits` must be an integer >= 1, received num_splits={num_splits!r}")
        if self.axis != -1:
            raise ValueError(
                f"SplitBatchNormalization supports channels-last inputs only (axis=-1), "
                f"received axis={self.axis!r}")
        self.num_splits = num_splits

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or self.num_splits == 1:
            return super().call(inputs, training=training, mask=mask)
        batch = inputs.shape[0]
        if batch is not None and batch % self.num_splits:
            raise ValueError(
                f"SplitBatchNormalization with num_splits={self.num_splits} needs a batch size "
                f"divisible by num_splits, received a batch of {batch}")
        input_dtype = inputs.dtype
        rank = len(inputs.shape)
        grouped = ops.reshape(inputs, (self.num_splits, -1) + tuple(ops.shape(inputs)[1:]))
        # In float32 whatever the compute dtype: bfloat16 sums are too coarse for the
        # statistics, and x * scale + offset cancels catastrophically in bfloat16 when the
        # mean is large against the spread.
        x = ops.cast(grouped, "float32")
        axes = tuple(range(1, rank))
        mean, variance = ops.moments(x, axes=axes, keepdims=True)
        # One multiply-add per activation with per-group, per-channel scale and offset,
        # instead of subtract, normalise, gamma and beta passes over the activations.
        scale = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            scale = scale * ops.cast(self.gamma, "float32")
        offset = -mean * scale
        if self.center:
            offset = offset + ops.cast(self.beta, "float32")
        normalised = ops.cast(x * scale + offset, input_dtype)
        outputs = ops.reshape(normalised, ops.shape(inputs))

        group_mean = ops.mean(ops.reshape(mean, (self.num_splits, -1)), axis=0)
        group_variance = ops.mean(ops.reshape(variance, (self.num_splits, -1)), axis=0)
        self.moving_mean.assign(
            self.moving_mean * self.momentum + group_mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + group_variance * (1.0 - self.momentum))
        return outputs

    def get_config(self):
        return {**super().get_config(), "num_splits": self.num_splits}


def normalization_layer(kind, *, bn_splits=8, name=None, momentum=BN_MOMENTUM,
                        epsilon=BN_EPSILON, center=True, scale=True):
    """A fresh normalisation layer of the given ``kind`` (see module docstring).  The batch-norm
    settings default to the reference's; a catalogue backbone's layers keep their own
    (``models.catalog``)."""
    settings = dict(momentum=momentum, epsilon=epsilon, center=center, scale=scale, name=name)
    if kind == "batch":
        return keras.layers.BatchNormalization(**settings)
    if kind == "split":
        return SplitBatchNormalization(num_splits=bn_splits, **settings)
    if kind == "sync":
        return keras.layers.BatchNormalization(synchronized=True, **settings)
    if kind == "none":
        return keras.layers.Identity(name=name)
    raise ValueError(f"`norm` must be one of {NORMALIZATIONS}, received norm={kind!r}")
