"""Folding inference batch norm into the layer before it (the bfloat16 serving graph)."""

import keras
import numpy as np
import pytest

from models import build_backbone, projection_head
from models.batch_norm_folding import fold_batch_norm, folded_weights
from models.normalization import SplitBatchNormalization


def _trained_statistics(model, seed=0):
    """Batch-norm statistics and affine weights unlike their initialisers (identity maps
    would hide a wrong fold)."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.5, n))
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, n))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 0.3, n))


def _norms(model):
    return sum(isinstance(layer, keras.layers.BatchNormalization)
               for layer in model._flatten_layers())


def test_folded_weights_equal_the_layer_then_batch_norm_in_numpy():
    rng = np.random.default_rng(1)
    x, kernel, bias = rng.normal(size=(5, 4)), rng.normal(size=(4, 3)), rng.normal(size=3)
    mean, var, gamma, beta = (rng.normal(size=3), rng.uniform(0.5, 2, 3), rng.normal(size=3),
                              rng.normal(size=3))
    expected = (x @ kernel + bias - mean) / np.sqrt(var + 1e-5) * gamma + beta
    k, b = folded_weights(kernel, bias, mean, var, 1e-5, gamma, beta)
    np.testing.assert_allclose(x @ k + b, expected, rtol=1e-12)
    # no bias, no scale, no centre: the missing terms are 0, 1 and 0
    k, b = folded_weights(kernel, None, mean, var, 1e-5)
    np.testing.assert_allclose(x @ k + b, (x @ kernel - mean) / np.sqrt(var + 1e-5), rtol=1e-12)


@pytest.mark.parametrize("norm", ["split", "batch"])
def test_a_folded_resnet18_has_no_batch_norm_and_the_same_outputs(norm):
    keras.utils.set_random_seed(0)
    backbone = build_backbone("resnet18", input_shape=(32, 32, 3), norm=norm)
    _trained_statistics(backbone)
    folded, count = fold_batch_norm(backbone)
    assert count == _norms(backbone) == 20 and _norms(folded) == 0
    x = np.random.default_rng(2).normal(size=(4, 32, 32, 3)).astype("float32")
    expected = backbone(x, training=False).numpy()
    np.testing.assert_allclose(folded(x, training=False).numpy(), expected,
                               atol=2e-5 * np.abs(expected).max())
    # in bfloat16: every layer computes in it, and the outputs keep their direction
    half, _ = fold_batch_norm(backbone, "bfloat16")
    assert {layer.dtype_policy.name for layer in half.layers[1:]} == {"bfloat16"}
    assert half.dtype_policy.name == "bfloat16"  # what the export reads as its precision
    assert keras.mixed_precision.global_policy().name == "float32"
    values = keras.ops.convert_to_numpy(keras.ops.cast(half(x), "float32"))
    cosine = np.sum(values * expected, 1) / np.linalg.norm(values, axis=1) / np.linalg.norm(
        expected, axis=1)
    assert cosine.min() >= 0.9999


def test_only_unambiguous_pairs_are_folded_and_the_rest_still_computes_the_same():
    """A convolution with an activation, one whose output also feeds another layer, and a
    dense layer whose output is also a model output keep their batch norm; a depthwise
    convolution and a dense layer followed by split BN are folded; a nested functional model
    is folded inside."""
    inputs = keras.Input((8, 8, 3))
    relu_conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    kept_after_relu = keras.layers.BatchNormalization()(relu_conv)
    shared = keras.layers.Conv2D(4, 1)(kept_after_relu)
    kept_shared = keras.layers.BatchNormalization()(shared)
    mixed = keras.layers.Add()([kept_shared, shared])
    depthwise = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(mixed)
    folded_depthwise = keras.layers.BatchNormalization(center=False)(depthwise)
    inner_in = keras.Input((8, 8, 8))
    inner = keras.Model(inner_in, keras.layers.BatchNormalization(scale=False)(
        keras.layers.Conv2D(8, 1, use_bias=False)(inner_in)), name="inner")
    pooled = keras.layers.GlobalAveragePooling2D()(inner(folded_depthwise))
    dense = keras.layers.Dense(6)(pooled)
    outputs = SplitBatchNormalization(num_splits=2)(dense)
    exposed = keras.layers.Dense(5)(pooled)  # its output is also one of the model's
    model = keras.Model(inputs, [outputs, exposed, keras.layers.BatchNormalization()(exposed)])
    _trained_statistics(model)

    folded, count = fold_batch_norm(model)
    assert count == 3 and _norms(folded) == 3  # the depthwise, the nested and the dense pairs
    x = np.random.default_rng(3).normal(size=(4, 8, 8, 3)).astype("float32")
    for expected, value in zip(model(x, training=False), folded(x, training=False)):
        np.testing.assert_allclose(value.numpy(), expected.numpy(),
                                   atol=1e-5 * np.abs(expected.numpy()).max())


def test_a_model_that_is_not_functional_is_refused():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense, self.norm = keras.layers.Dense(3), keras.layers.BatchNormalization()

        def call(self, x):
            return self.norm(self.dense(x))

    with pytest.raises(ValueError, match="needs a functional model"):
        fold_batch_norm(Subclassed())


def test_a_projector_with_batch_norm_is_folded():
    keras.utils.set_random_seed(0)
    head = projection_head(16, hidden_dims=(32,), output_dim=8, norm="batch")
    _trained_statistics(head)
    folded, count = fold_batch_norm(head)
    assert count == 1 and _norms(folded) == 0
    x = np.random.default_rng(4).normal(size=(5, 16)).astype("float32")
    np.testing.assert_allclose(folded(x).numpy(), head(x, training=False).numpy(), atol=1e-5)
