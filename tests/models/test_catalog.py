"""Catalogue backbones: keras.applications and KerasHub networks with the project's BN."""

import keras
import numpy as np
import pytest

from models import catalog
from models.catalog import CatalogError, build_catalog_backbone

MOBILENET = ("keras.applications.MobileNetV2", {"alpha": 0.35})
HUB_RESNET = ("keras_hub.ResNetBackbone", dict(
    input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32],
    stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block"))


def _pretrained_shaped(model, seed=0):
    """Gives every weight, batch-norm statistics included, values unlike their initialisers,
    as pretrained weights would have."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        values = rng.normal(0.0, 0.05, weight.shape).astype("float32")
        if "variance" in weight.path or "gamma" in weight.path:
            values = np.abs(values) + 0.5
        weight.assign(values)


@pytest.mark.parametrize("name, args", [MOBILENET, HUB_RESNET], ids=["applications", "hub"])
@pytest.mark.parametrize("norm", ["split", "sync", "batch"])
def test_swapping_batch_norm_keeps_the_inference_outputs(name, args, norm, monkeypatch):
    if name.startswith("keras_hub"):
        pytest.importorskip("keras_hub")
    built = {}
    original_swap = catalog._swap_batch_norm

    def keep_the_original(model, norm_, bn_splits):  # record the network before the swap
        _pretrained_shaped(model)
        built["original"] = model
        return original_swap(model, norm_, bn_splits)

    monkeypatch.setattr(catalog, "_swap_batch_norm", keep_the_original)
    backbone = build_catalog_backbone(name, input_shape=(32, 32, 3), norm=norm, bn_splits=2,
                                      args=args)
    original = built["original"]
    kinds = {type(layer).__name__ for layer in backbone.layers}
    assert "BatchNormalization" not in kinds or norm != "split"
    if norm == "split":
        assert "SplitBatchNormalization" in kinds
    if norm == "sync":
        assert any(getattr(layer, "synchronized", False) for layer in backbone.layers)
    images = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype("float32")
    before = keras.ops.convert_to_numpy(original(images, training=False))
    if before.ndim == 4:
        before = before.mean(axis=(1, 2))
    after = keras.ops.convert_to_numpy(backbone(images, training=False))
    assert after.shape == (4, backbone.feature_dim)
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=1e-5)


def test_a_subclassed_model_is_refused_with_the_reason():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.norm = keras.layers.BatchNormalization()

        def call(self, inputs):
            return self.norm(inputs)

    with pytest.raises(CatalogError, match="subclassed model, not a functional one"):
        catalog._swap_batch_norm(Subclassed(), "split", 2)


def _nested_network():
    """A functional network with a functional block inside it, each with its own BN."""
    block_in = keras.Input((8, 8, 4))
    block = keras.Model(block_in, keras.layers.BatchNormalization(name="inner_bn")(
        keras.layers.Conv2D(4, 3, padding="same", name="inner_conv")(block_in)), name="block")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.BatchNormalization(name="outer_bn")(
        keras.layers.Conv2D(4, 3, padding="same", name="outer_conv")(inputs))
    return keras.Model(inputs, block(x), name="nested")


def test_the_batch_norm_of_a_nested_sub_model_is_replaced_too():
    model = _nested_network()
    _pretrained_shaped(model)
    swapped = catalog._swap_batch_norm(model, "split", 2)
    kinds = [type(layer).__name__ for layer in swapped._flatten_layers(include_self=False)
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert kinds == ["SplitBatchNormalization"] * 2
    images = np.random.default_rng(2).normal(size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(swapped(images, training=False)),
                               keras.ops.convert_to_numpy(model(images, training=False)),
                               atol=1e-5, rtol=1e-5)


class _BlockWithItsOwnNorm(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization()

    def call(self, inputs):
        return self.norm(inputs)


def test_batch_norm_inside_a_custom_layer_is_refused_unless_plain_batch_norm_is_asked():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, _BlockWithItsOwnNorm(name="custom")(inputs), name="opaque")
    with pytest.raises(CatalogError, match="keeps batch norm inside custom layers .*custom.*"
                                           "use model.norm batch"):
        catalog._swap_batch_norm(model, "split", 2)
    assert catalog._swap_batch_norm(model, "batch", 2) is not None


def test_pretrained_weights_offline_fail_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setattr(catalog, "_reachable", lambda host, timeout=3.0: False)
    constructed = []
    monkeypatch.setattr(keras.applications, "ResNet50", lambda **kw: constructed.append(kw))
    with pytest.raises(CatalogError, match="storage.googleapis.com, which cannot be reached"):
        build_catalog_backbone("keras.applications.ResNet50", input_shape=(32, 32, 3),
                               pretrained="imagenet")
    assert not constructed  # refused before anything tried to download
    with pytest.raises(CatalogError, match="www.kaggle.com, which cannot be reached"):
        build_catalog_backbone("keras_hub.ResNetBackbone", input_shape=(32, 32, 3),
                               preset="resnet_50_imagenet")


@pytest.mark.parametrize("name, message", [
    ("keras.applications.NoSuchNet", "keras.applications has no 'NoSuchNet'"),
    ("keras_hub.NoSuchBackbone", "keras_hub.models has no 'NoSuchBackbone'"),
])
def test_unknown_names_are_refused(name, message):
    if name.startswith("keras_hub"):
        pytest.importorskip("keras_hub")
    with pytest.raises(CatalogError, match=message):
        build_catalog_backbone(name, input_shape=(32, 32, 3))


def test_an_imagenet_stem_on_small_images_warns():
    with pytest.warns(UserWarning, match="reduces 32 px images to 1x1 feature maps"):
        build_catalog_backbone(*MOBILENET[:1], input_shape=(32, 32, 3), args=MOBILENET[1])


def test_norm_none_is_refused():
    with pytest.raises(CatalogError, match="model.norm none would drop"):
        build_catalog_backbone(*MOBILENET[:1], input_shape=(32, 32, 3), norm="none",
                               args=MOBILENET[1])
