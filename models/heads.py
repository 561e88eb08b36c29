"""The projection head that maps backbone features to the contrastive space.

MoCo v2 and ASCL put a small MLP between the backbone and the contrastive
loss (reference: 512 -> 2048 -> 128).  Embeddings for downstream use are the
backbone features *before* this head, which generalise better.
"""

import keras
from keras import layers

from models.normalization import normalization_layer


def projection_head(input_dim, *, hidden_dims=(2048,), output_dim=128, norm="none",
                    bn_splits=8, name="projector"):
    """An MLP ``input_dim -> hidden_dims... -> output_dim``.

    Args:
      input_dim: width of the backbone features.
      hidden_dims: widths of the hidden layers, each followed by the chosen
        normalisation and ReLU.  The reference uses one hidden layer of 2048.
      output_dim: width of the contrastive embedding (128 in the reference).
      norm: normalisation after each hidden layer: ``"none"`` (MoCo v2),
        ``"batch"``, ``"split"`` or ``"sync"``.
      bn_splits: sub-batches for ``norm="split"``.
      name: model name.

    Returns:
      A ``keras.Model`` from ``[B, input_dim]`` to ``[B, output_dim]``.

    Example:
      >>> head = projection_head(512)
      >>> head.output_shape
      (None, 128)
    """
    if output_dim < 1:
        raise ValueError(f"`output_dim` must be >= 1, received output_dim={output_dim!r}")
    inputs = keras.Input(shape=(input_dim,), name="features")
    x = inputs
    for index, width in enumerate(hidden_dims):
        x = layers.Dense(width, use_bias=norm == "none", name=f"hidden{index + 1}")(x)
        if norm != "none":
            x = normalization_layer(norm, bn_splits=bn_splits, name=f"hidden{index + 1}_norm")(x)
        x = layers.ReLU(name=f"hidden{index + 1}_relu")(x)
    outputs = layers.Dense(output_dim, name="output")(x)
    return keras.Model(inputs, outputs, name=name)
