"""Encoder backbones: ResNet-18/34/50, the CIFAR ResNet-20 and a small CNN, as Keras
functional models.

ResNets are written out here rather than taken from ``keras.applications`` or
keras-cv because ASCL needs two things neither offers: the CIFAR stem (a 3x3
stride-1 first convolution and no max-pool, which the reference recipe uses
for 32-64 px images) and a pluggable normalisation layer (split/ghost BN on a
single device, synchronised BN across replicas; see ``normalization``).

Every backbone maps ``[B, H, W, C]`` images to pooled ``[B, F]`` features;
``F`` is the model's ``feature_dim`` attribute (also ``output_shape[-1]``).
"""

import keras
from keras import layers

from models.catalog import build_catalog_backbone, is_catalog_name
from models.normalization import normalization_layer

STEMS = ("cifar", "imagenet")
RESNET_LAYOUTS = {
    # depth: (block kind, blocks per stage, widths per stage)
    18: ("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    34: ("basic", (3, 4, 6, 3), (64, 128, 256, 512)),
    50: ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512)),
    # He et al. 2016, section 4.2: the 6n+2-layer CIFAR network with n = 3
    20: ("basic", (3, 3, 3), (16, 32, 64)),
}
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet20", "small_cnn")


def _conv(filters, kernel_size, strides, use_bias, name):
    return layers.Conv2D(filters, kernel_size, strides=strides, padding="same",
                         use_bias=use_bias, kernel_initializer="he_normal", name=name)


def _basic_block(x, filters, strides, norm, bn_splits, name):
    use_bias = norm == "none"
    shortcut = x
    y = _conv(filters, 3, strides, use_bias, f"{name}_conv1")(x)
    y = normalization_layer(norm, bn_splits=bn_splits, name=f"{name}_norm1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(filters, 3, 1, use_bias, f"{name}_conv2")(y)
    y = normalization_layer(norm, bn_splits=bn_splits, name=f"{name}_norm2")(y)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, strides, use_bias, f"{name}_proj")(x)
        shortcut = normalization_layer(norm, bn_splits=bn_splits,
                                       name=f"{name}_proj_norm")(shortcut)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


def _bottleneck_block(x, filters, strides, norm, bn_splits, name, expansion=4):
    use_bias = norm == "none"
    shortcut = x
    y = _conv(filters, 1, 1, use_bias, f"{name}_conv1")(x)
    y = normalization_layer(norm, bn_splits=bn_splits, name=f"{name}_norm1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(filters, 3, strides, use_bias, f"{name}_conv2")(y)
    y = normalization_layer(norm, bn_splits=bn_splits, name=f"{name}_norm2")(y)
    y = layers.ReLU(name=f"{name}_relu2")(y)
    y = _conv(filters * expansion, 1, 1, use_bias, f"{name}_conv3")(y)
    y = normalization_layer(norm, bn_splits=bn_splits, name=f"{name}_norm3")(y)
    if strides != 1 or x.shape[-1] != filters * expansion:
        shortcut = _conv(filters * expansion, 1, strides, use_bias, f"{name}_proj")(x)
        shortcut = normalization_layer(norm, bn_splits=bn_splits,
                                       name=f"{name}_proj_norm")(shortcut)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


def resnet(depth, *, input_shape=(32, 32, 3), stem="cifar", norm="batch", bn_splits=8,
           name=None):
    """A ResNet-``depth`` feature extractor (no classifier).

    Depth 20 is the 3-stage CIFAR network of He et al. (2016, section 4.2): a 16-channel
    stem and three stages of three basic blocks at 16/32/64 channels (about 0.27 M
    parameters).  Its down-sampling shortcuts are 1x1 projections (the paper's option B)
    rather than zero-padded identities (option A), as in the other depths here; they add
    about 3 k parameters.

    Args:
      depth: 18, 34, 50 or 20.
      input_shape: ``(H, W, C)`` of the images.
      stem: ``"cifar"`` (3x3 stride-1 conv, no max-pool) or ``"imagenet"``
        (7x7 stride-2 conv and 3x3 stride-2 max-pool).
      norm: ``"batch"``, ``"split"``, ``"sync"`` or ``"none"``.
      bn_splits: sub-batches for ``norm="split"``.
      name: model name; ``resnet{depth}`` by default.

    Returns:
      A ``keras.Model`` from images to ``[B, 512]`` (18/34), ``[B, 2048]`` (50) or
      ``[B, 64]`` (20) features after global average pooling; ``model.feature_dim``.

    Example:
      >>> backbone = resnet(18, input_shape=(32, 32, 3), stem="cifar")
      >>> backbone.feature_dim
      512
    """
    if depth not in RESNET_LAYOUTS:
        raise ValueError(f"`depth` must be one of {sorted(RESNET_LAYOUTS)}, "
                         f"received depth={depth!r}")
    if stem not in STEMS:
        raise ValueError(f"`stem` must be one of {STEMS}, received stem={stem!r}")
    block_kind, stage_blocks, widths = RESNET_LAYOUTS[depth]
    block = _basic_block if block_kind == "basic" else _bottleneck_block
    use_bias = norm == "none"

    inputs = keras.Input(shape=input_shape, name="images")
    if stem == "cifar":
        x = _conv(widths[0], 3, 1, use_bias, "stem_conv")(inputs)
    else:
        x = _conv(widths[0], 7, 2, use_bias, "stem_conv")(inputs)
    x = normalization_layer(norm, bn_splits=bn_splits, name="stem_norm")(x)
    x = layers.ReLU(name="stem_relu")(x)
    if stem == "imagenet":
        x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, (filters, blocks) in enumerate(zip(widths, stage_blocks)):
        for index in range(blocks):
            strides = 2 if stage > 0 and index == 0 else 1
            x = block(x, filters, strides, norm, bn_splits, f"stage{stage + 1}_block{index + 1}")
    features = layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, features, name=name or f"resnet{depth}")
    model.feature_dim = int(features.shape[-1])
    return model


def small_cnn(*, input_shape=(32, 32, 3), widths=(32, 64, 128), norm="batch", bn_splits=8,
              name="small_cnn"):
    """A three-stage CNN for CPU runs and tests (about 0.1 M parameters).

    Each stage is a 3x3 convolution (stride 1 for the first, 2 after),
    normalisation and ReLU; global average pooling gives ``widths[-1]``
    features.
    """
    use_bias = norm == "none"
    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for stage, filters in enumerate(widths):
        x = _conv(filters, 3, 1 if stage == 0 else 2, use_bias, f"conv{stage + 1}")(x)
        x = normalization_layer(norm, bn_splits=bn_splits, name=f"norm{stage + 1}")(x)
        x = layers.ReLU(name=f"relu{stage + 1}")(x)
    features = layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, features, name=name)
    model.feature_dim = int(features.shape[-1])
    return model


def build_backbone(name, *, input_shape=(32, 32, 3), stem="cifar", norm="batch", bn_splits=8,
                   widths=(32, 64, 128), args=None, pretrained=None, preset=None,
                   load_weights=True):
    """Backbone by name: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet20``,
    ``small_cnn`` (``widths``), or a catalogue network, ``keras.applications.NAME`` or
    ``keras_hub.NAME`` (``args``, ``pretrained``, ``preset``: ``models.catalog``)."""
    if is_catalog_name(name):
        return build_catalog_backbone(name, input_shape=input_shape, norm=norm,
                                      bn_splits=bn_splits, args=args, pretrained=pretrained,
                                      preset=preset, load_weights=load_weights)
    if name == "small_cnn":
        return small_cnn(input_shape=input_shape, widths=tuple(widths), norm=norm,
                         bn_splits=bn_splits)
    if name.startswith("resnet") and name[len("resnet"):].isdigit():
        depth = int(name[len("resnet"):])
        if depth in RESNET_LAYOUTS:
            return resnet(depth, input_shape=input_shape, stem=stem, norm=norm, bn_splits=bn_splits)
    raise ValueError(f"`backbone` must be one of {BACKBONES}, received backbone={name!r}")
