"""Backbones from Keras's catalogues, keras.applications and KerasHub, as ASCL backbones.

A config names one by its path, ``keras.applications.ResNet50V2`` or
``keras_hub.ResNetBackbone`` (a class of ``keras_hub.models``; its constructor arguments in
``model.backbone_args``).  It is built from its architecture with random weights, or with
pretrained ones where asked (``pretrained="imagenet"`` for keras.applications, ``preset`` for
KerasHub).  Then two things make it an ASCL backbone:

* every ``BatchNormalization`` is replaced by the project's layer of the chosen ``norm``
  (``models.normalization``: split BN on one device and sync BN across replicas are what
  MoCo's key encoder needs), through ``keras.models.clone_model`` with a ``clone_function``,
  keeping each layer's epsilon, momentum and weights, so that in inference mode the network
  computes what it computed before;
* its output is pooled to ``[B, F]`` (global average) whether it is a feature map or a
  vector; ``F`` is read from it (``feature_dim``).

Only functional models can be cloned layer by layer; a subclassed model is refused with
that reason.  Pretrained weights need the network: offline, asking for them fails at once
(a three-second connection probe), never a hang; a KerasHub preset may be a local folder.
KerasHub is an optional extra (``pip install .[hub]``).
"""

import os
import socket
import warnings

import keras

from models.normalization import normalization_layer

PREFIXES = ("keras.applications.", "keras_hub.")
WEIGHT_HOSTS = {"keras.applications.": "storage.googleapis.com", "kaggle": "www.kaggle.com",
                "hf": "huggingface.co"}


class CatalogError(ValueError):
    """A catalogue backbone that cannot be built or used; the message says why."""


def is_catalog_name(name):
    return isinstance(name, str) and name.startswith(PREFIXES)


def _reachable(host, timeout=3.0):
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _require_network(host, what):
    if not _reachable(host):
        raise CatalogError(f"{what} must be downloaded from {host}, which cannot be reached from "
                           f"here (offline?); build with random weights (leave it unset), or "
                           f"run once where {host} is reachable so the weights are cached")


def _keras_cache_has(fragment):
    folder = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models")
    return os.path.isdir(folder) and any(fragment in name.lower() for name in os.listdir(folder))


def _application(class_name, input_shape, args, pretrained):
    constructor = getattr(keras.applications, class_name, None)
    if constructor is None or not callable(constructor):
        raise CatalogError(f"keras.applications has no {class_name!r}")
    if pretrained not in (None, "", "imagenet"):
        raise CatalogError(f"model.pretrained must be imagenet for keras.applications, received "
                           f"{pretrained!r}")
    weights = "imagenet" if pretrained else None
    if weights and not _keras_cache_has(class_name.lower()):
        _require_network(WEIGHT_HOSTS["keras.applications."],
                         f"keras.applications.{class_name}'s ImageNet weights")
    return constructor(include_top=False, weights=weights, input_shape=tuple(input_shape),
                       **args)


def _hub_model(class_name, input_shape, args, preset, load_weights):
    try:
        import keras_hub
    except ImportError as error:
        raise CatalogError("KerasHub backbones need the optional extra: pip install .[hub] "
                           "(keras-hub)") from error
    constructor = getattr(keras_hub.models, class_name, None)
    if constructor is None or not isinstance(constructor, type):
        raise CatalogError(f"keras_hub.models has no {class_name!r}")
    args = dict(args)
    if preset:
        if not os.path.exists(preset):
            scheme = "hf" if preset.startswith("hf://") else "kaggle"
            _require_network(WEIGHT_HOSTS[scheme], f"KerasHub preset {preset!r}")
        return constructor.from_preset(preset, load_weights=load_weights, **args)
    args.setdefault("image_shape", tuple(input_shape))
    return constructor(**args)


def _swap_batch_norm(model, norm, bn_splits):
    """``model`` cloned with each ``BatchNormalization`` replaced by ``norm``'s layer, weights
    carried over (``norm`` "batch" keeps a plain BN, with the layer's own settings)."""
    if norm == "none":
        raise CatalogError("model.norm none would drop the catalogue backbone's batch norm "
                           "(its weights were trained with it); use batch, split or sync")

    replacements = set()

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            if layer.axis not in (-1, len(layer.input.shape) - 1):
                raise CatalogError(f"layer {layer.name} normalises axis {layer.axis}: only "
                                   f"channels-last batch norm can be replaced")
            replacement = normalization_layer(norm, bn_splits=bn_splits, name=layer.name,
                                              momentum=layer.momentum, epsilon=layer.epsilon,
                                              center=layer.center, scale=layer.scale)
            replacements.add(id(replacement))
            return replacement
        return layer.__class__.from_config(layer.get_config())

    try:
        # recursive: the batch norm of nested functional sub-models is replaced too
        swapped = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except CatalogError:
        raise
    except Exception as error:  # noqa: BLE001 - Keras's reason, reported with the name
        what = ("is a subclassed model, not a functional one: it cannot be cloned layer by "
                "layer" if "Functional" in str(error) else "cannot be cloned layer by layer")
        raise CatalogError(f"{model.name} {what}, so its batch norm cannot be replaced "
                           f"(Keras: {type(error).__name__}: {error})") from error
    if norm != "batch":  # a batch norm inside a custom layer is out of clone_model's reach
        hidden = [layer.path for layer in swapped._flatten_layers(include_self=False)
                  if isinstance(layer, keras.layers.BatchNormalization)
                  and id(layer) not in replacements]
        if hidden:
            raise CatalogError(
                f"{model.name} keeps batch norm inside custom layers ({', '.join(hidden[:3])}"
                f"{', ...' if len(hidden) > 3 else ''}), where model.norm {norm} cannot reach "
                f"it; use model.norm batch for this network")
    for layer in model.layers:
        if layer.weights:
            swapped.get_layer(layer.name).set_weights(layer.get_weights())
    return swapped


def _pooled(model, name):
    """``[B, F]`` features from ``model``'s output, a feature map or a vector."""
    outputs = model.output
    if len(outputs.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="pool")(outputs)
    elif len(outputs.shape) == 2:
        features = outputs
    else:
        raise CatalogError(f"{name} returns outputs of shape {outputs.shape}: expected a "
                           f"feature map [B, H, W, C] or features [B, F]")
    pooled = keras.Model(model.input, features, name=model.name)
    pooled.feature_dim = int(features.shape[-1])
    return pooled


def _warn_if_stem_too_aggressive(model, name, input_shape):
    """A catalogue network meant for ImageNet downsamples by 32; on 32 px images the last
    feature map is 1x1, and most of the image's layout is gone before the last stage."""
    for layer in reversed(model.layers):
        shape = getattr(layer, "output", None)
        shape = getattr(shape, "shape", None)
        if shape is not None and len(shape) == 4:
            side = shape[1]
            if side is not None and side <= 2 and input_shape[0] <= 64:
                warnings.warn(
                    f"{name} reduces {input_shape[0]} px images to {side}x{side} feature maps "
                    f"(an ImageNet stem and stages downsample by 32): expect weak features at "
                    f"this size; the project's CIFAR-stem ResNets (model.backbone resnet18, "
                    f"model.stem cifar) are made for small images", stacklevel=3)
            return


def build_catalog_backbone(name, *, input_shape, norm="batch", bn_splits=8, args=None,
                           pretrained=None, preset=None, load_weights=True):
    """The catalogue network ``name`` as an ASCL backbone (see the module docstring).

    ``load_weights`` False builds a preset's architecture without its weights (a trained
    run's checkpoint replaces them); ``pretrained`` is then ignored too."""
    args = dict(args or {})
    if name.startswith("keras.applications."):
        if preset:
            raise CatalogError("model.preset names a KerasHub preset; keras.applications takes "
                               "model.pretrained: imagenet")
        model = _application(name[len("keras.applications."):], input_shape, args,
                             pretrained if load_weights else None)
    elif name.startswith("keras_hub."):
        if pretrained:
            raise CatalogError("model.pretrained is for keras.applications; a KerasHub backbone "
                               "takes its weights from model.preset")
        model = _hub_model(name[len("keras_hub."):], input_shape, args, preset, load_weights)
    else:
        raise CatalogError(f"{name!r} is not a catalogue name (it starts with one of {PREFIXES})")
    _warn_if_stem_too_aggressive(model, name, input_shape)
    return _pooled(_swap_batch_norm(model, norm, bn_splits), name)
