"""Split ("ghost") batch normalisation against NumPy."""

import keras
import numpy as np
import pytest

from models.normalization import SplitBatchNormalization


def test_each_split_is_normalised_with_its_own_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3, 3, 4)).astype("float32")
    x[4:] = x[4:] * 5.0 + 3.0  # second half has a very different distribution
    layer = SplitBatchNormalization(num_splits=2)
    y = layer(x, training=True).numpy()
    for half in (slice(0, 4), slice(4, 8)):
        group = x[half]
        mean = group.mean(axis=(0, 1, 2))
        var = group.var(axis=(0, 1, 2))
        np.testing.assert_allclose(y[half], (group - mean) / np.sqrt(var + 1e-5), atol=1e-4)
    # moving statistics move towards the average of the groups' statistics
    group_means = np.stack([x[:4].mean(axis=(0, 1, 2)), x[4:].mean(axis=(0, 1, 2))]).mean(0)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * group_means, atol=1e-5)


def test_inference_uses_moving_statistics():
    layer = SplitBatchNormalization(num_splits=2)
    x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32")
    layer.build(x.shape)
    layer.moving_mean.assign(np.full(6, 2.0, "float32"))
    layer.moving_variance.assign(np.full(6, 4.0, "float32"))
    np.testing.assert_allclose(layer(x, training=False).numpy(), (x - 2.0) / np.sqrt(4.0 + 1e-5),
                               atol=1e-5)


def test_one_split_equals_batch_normalisation():
    x = np.random.default_rng(2).normal(size=(6, 5)).astype("float32")
    split = SplitBatchNormalization(num_splits=1)(x, training=True).numpy()
    plain = keras.layers.BatchNormalization(epsilon=1e-5)(x, training=True).numpy()
    np.testing.assert_allclose(split, plain, atol=1e-5)


def test_indivisible_batch_and_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="divisible by num_splits.*batch of 6"):
        SplitBatchNormalization(num_splits=4)(np.zeros((6, 3), "float32"), training=True)
    with pytest.raises(ValueError, match="num_splits=0"):
        SplitBatchNormalization(num_splits=0)
    with pytest.raises(ValueError, match="axis=1"):
        SplitBatchNormalization(num_splits=2, axis=1)


def test_config_round_trip():
    layer = SplitBatchNormalization(num_splits=4, name="bn")
    clone = SplitBatchNormalization.from_config(layer.get_config())
    assert clone.num_splits == 4 and clone.momentum == pytest.approx(0.9)


def test_bfloat16_activations_keep_float32_statistics():
    """Under mixed_bfloat16 the output is bfloat16 and as close to the float32 layer as
    bfloat16 inputs and outputs allow, even with a mean 30 times the spread (a bfloat16
    multiply-add would cancel catastrophically there); statistics stay float32."""
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(8, 4, 4, 6)) * 3.0 + 100.0).astype("float32")  # a large mean
    exact = SplitBatchNormalization(num_splits=2, gamma_initializer="ones")
    expected = exact(x, training=True).numpy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    low = SplitBatchNormalization(num_splits=2)
    y = low(keras.ops.cast(x, "bfloat16"), training=True)
    assert y.dtype == "bfloat16" and low.moving_mean.dtype == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(y, "float32")),
                               expected, atol=0.1)  # bf16 inputs near 100 are 0.5 apart
    np.testing.assert_allclose(low.moving_mean.numpy(), exact.moving_mean.numpy(), rtol=1e-2)


@pytest.mark.parametrize("shape", [(8, 3, 5, 4), (12, 6)])
def test_gradients_and_moving_variance_match_per_group_batch_norm(shape):
    """SplitBatchNormalization against batch norm written out per group: outputs, gradients
    for the inputs, gamma and beta, and the moving variance (the biased variance averaged
    over groups), for images and for vectors."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=shape) * 2.0 + 1.0, tf.float32)
    weights = tf.constant(rng.normal(size=shape), tf.float32)
    layer = SplitBatchNormalization(num_splits=4, momentum=0.0)
    layer.build(shape)
    layer.gamma.assign(rng.uniform(0.5, 1.5, shape[-1]).astype("float32"))
    layer.beta.assign(rng.normal(size=shape[-1]).astype("float32"))

    def reference(x, gamma, beta):
        groups = tf.reshape(x, (4, -1) + shape[1:])
        axes = list(range(1, len(shape)))
        mean, variance = tf.nn.moments(groups, axes=axes, keepdims=True)
        out = (groups - mean) / tf.sqrt(variance + 1e-5) * gamma + beta
        return tf.reshape(out, shape), tf.reduce_mean(tf.reshape(variance, (4, -1)), axis=0)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = layer(x, training=True)
        expected, variance = reference(x, layer.gamma, layer.beta)
        loss_ours, loss_expected = (tf.reduce_sum(y * weights) for y in (ours, expected))
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), atol=1e-4)
    for wrt in (x, layer.gamma, layer.beta):
        np.testing.assert_allclose(tape.gradient(loss_ours, wrt).numpy(),
                                   tape.gradient(loss_expected, wrt).numpy(), atol=1e-4)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance.numpy(), rtol=1e-5)
