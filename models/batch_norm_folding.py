"""Folding inference-mode batch norm into the layer before it, for a serving graph.

At inference a batch norm is an affine map per channel, ``y = (x - mean) * s + beta``
with ``s = gamma / sqrt(var + eps)``.  When ``x`` is the output of a linear
convolution or dense layer (no activation) that feeds nothing else, the map can be
folded into that layer: ``kernel * s`` and ``(bias - mean) * s + beta``.  The serving
graph then has one op where it had several, and under a ``bfloat16`` policy it also
drops the two casts Keras puts around every batch norm (it normalises in float32):
measured on a batch-1 ResNet-18 request, the folded network is as fast as one built
without normalisation (BENCHMARKS.md, "bfloat16 exports").  The folding is computed
in float64 from the float32 weights, then stored in the clone's dtype (through float32:
a bfloat16 clone's weights are rounded as a cast float32 weight is).

Only what is unambiguous is folded: a ``BatchNormalization`` (or this project's
``SplitBatchNormalization``, the same map at inference) normalising the last axis,
whose only input is a ``Dense``, ``Conv1D/2D/3D`` (channels last) or
``DepthwiseConv2D`` with a linear activation, used once, whose output goes nowhere
else.  Every other layer is cloned as it is, weights copied.
"""

import keras
import numpy as np

from models.normalization import SplitBatchNormalization


class NotFunctional(ValueError):
    """The model is not functional (subclassed, or a nested ``Sequential``): not foldable."""


FOLDABLE_NORMS = (keras.layers.BatchNormalization, SplitBatchNormalization)
FOLDABLE_PRODUCERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
                      keras.layers.Conv3D, keras.layers.DepthwiseConv2D)


def folded_weights(kernel, bias, mean, variance, epsilon, gamma=None, beta=None,
                   depthwise=False):
    """``(kernel, bias)`` of the layer with the batch norm folded in, float64.

    ``kernel``'s last axis is its output channel (``Dense``, ``ConvND``); a depthwise
    kernel (``[..., in, multiplier]``) has output channel ``in * multiplier + m``.
    ``bias`` may be None (a layer built without one)."""
    kernel = np.asarray(kernel, np.float64)
    scale = np.asarray(gamma if gamma is not None else np.ones_like(mean), np.float64) / np.sqrt(
        np.asarray(variance, np.float64) + epsilon)
    shift = np.asarray(beta, np.float64) if beta is not None else 0.0
    bias = np.zeros_like(scale) if bias is None else np.asarray(bias, np.float64)
    per_output = scale.reshape(kernel.shape[-2:]) if depthwise else scale
    return kernel * per_output, (bias - np.asarray(mean, np.float64)) * scale + shift


def _single_producer(norm):
    """The layer whose output is ``norm``'s only input, or None.  Keras has no public
    graph API: this reads the functional model's nodes (``_inbound_nodes``,
    ``parent_nodes``), which ``tests/models/test_batch_norm_folding.py`` exercises."""
    nodes = getattr(norm, "_inbound_nodes", [])
    if len(nodes) != 1 or len(nodes[0].parent_nodes) != 1:
        return None
    return nodes[0].parent_nodes[0].operation


def _foldable_pairs(model):
    """``{producer name: norm}`` for every pair of ``model``'s layers that may be folded."""
    outputs = {id(tensor) for tensor in keras.tree.flatten(model.outputs)}
    pairs = {}
    for norm in model.layers:
        if type(norm) not in FOLDABLE_NORMS:
            continue
        producer = _single_producer(norm)
        if type(producer) not in FOLDABLE_PRODUCERS:
            continue
        if (norm.axis not in (-1, len(norm.input.shape) - 1)
                or len(producer._inbound_nodes) != 1 or len(producer._outbound_nodes) != 1
                or id(producer.output) in outputs
                or producer.activation is not keras.activations.linear
                or getattr(producer, "data_format", "channels_last") != "channels_last"
                or getattr(producer, "quantization_mode", None) is not None
                or getattr(producer, "lora_enabled", False)):
            continue
        pairs[producer.name] = norm
    return pairs


def fold_batch_norm(model, dtype=None):
    """``(clone, folded)``: an inference copy of the functional ``model`` with each foldable
    batch norm folded into the layer before it (``folded``: how many), weights set.

    ``dtype``: the dtype policy of every layer of the clone (``"bfloat16"`` for a bfloat16
    serving graph); by default each keeps its own.  Nested functional models are folded the
    same way.  Raises ``NotFunctional`` for a model that is not functional (a subclassed
    model or a nested ``Sequential``): the caller keeps its unfolded path then."""
    if (not isinstance(model, keras.Model) or isinstance(model, keras.Sequential)
            or not hasattr(model, "_run_through_graph")):
        raise NotFunctional(f"fold_batch_norm needs a functional model, received "
                            f"{type(model).__name__} {getattr(model, 'name', '')!r}")
    norm_of = _foldable_pairs(model)
    folded_norms = {norm.name for norm in norm_of.values()}
    copies, nested = [], [0]

    def clone(layer):
        if isinstance(layer, keras.Model):
            inner, count = fold_batch_norm(layer, dtype)
            nested[0] += count
            return inner
        config = layer.get_config()
        if dtype is not None and layer.dtype_policy.name == "float32":
            config["dtype"] = dtype  # a layer set to another dtype on purpose keeps it
        if layer.name in folded_norms:
            return keras.layers.Identity(name=layer.name, dtype=config.get("dtype"))
        if layer.name in norm_of:
            config["use_bias"] = True
        new = layer.__class__.from_config(config)
        copies.append((layer, new))
        return new

    def call(layer, *args, **kwargs):
        if layer.name in folded_norms:  # an Identity: the norm's mask/training kwargs dropped
            return layer(args[0])
        return layer(*args, **kwargs)

    previous = keras.mixed_precision.global_policy()
    try:  # the clone's own policy (what compute_precision reads) is the dtype asked for
        if dtype is not None:
            keras.mixed_precision.set_global_policy(dtype)
        result = keras.models.clone_model(model, clone_function=clone, call_function=call)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    for old, new in copies:
        norm = norm_of.get(old.name)
        if norm is None:
            new.set_weights(old.get_weights())
            continue
        numpy = keras.ops.convert_to_numpy
        kernel, bias = folded_weights(
            numpy(old.kernel), numpy(old.bias) if old.use_bias else None,
            numpy(norm.moving_mean), numpy(norm.moving_variance), norm.epsilon,
            numpy(norm.gamma) if norm.scale else None, numpy(norm.beta) if norm.center else None,
            depthwise=isinstance(old, keras.layers.DepthwiseConv2D))
        new.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return result, len(norm_of) + nested[0]
