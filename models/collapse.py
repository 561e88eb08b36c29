"""The collapse monitor: how spread out the online projections are.

A self-supervised encoder can satisfy its loss by mapping every image to the
same point (BYOL's known failure, and a MoCo run whose loss stalls).  kNN sees
it only every few epochs and on a labelled bank; this sees it every step, from
the training batch alone (Lightly's benchmarks log the same quantity)::

    z_i   = e_i / ||e_i||                 online projections, [N, D]
    s_d   = std_i(z_id)                   per dimension (over the batch)
    spread = sqrt(D) * mean_d(s_d)

Unit vectors drawn uniformly on the sphere have per-dimension variance 1/D, so
their spread is about 1; identical rows give 0.
"""

import tensorflow as tf


def projection_spread(embeddings):
    """The collapse monitor of ``embeddings [N, D]`` (any float dtype), a float32 scalar:
    about 1 for well spread unit rows, 0 when every row is the same."""
    unit = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=1)
    dim = unit.shape[-1] if unit.shape[-1] is not None else tf.shape(unit)[-1]
    return tf.reduce_mean(tf.math.reduce_std(unit, axis=0)) * tf.sqrt(tf.cast(dim, tf.float32))

