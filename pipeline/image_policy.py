"""The one resize-and-crop policy for stored images, wherever an image is made to size.

Preparation (``beam_jobs``), batch embedding and the serving graph
(``pipeline.export``) all call ``square_crop_and_resize``, so an image that is
not at the training size gets the same pixels at training and at serving time:

1. centre-crop the largest square (a non-square image loses the ends of its
   longer side, never its aspect ratio);
2. resize that square to ``size`` x ``size``, bicubic, antialiased when it
   shrinks, rounded to 8 bits.

An image already at ``size`` x ``size`` is returned unchanged.  It is written
in TensorFlow so that the serving graph can run it; preparation calls it
eagerly, and only for images that are not at the size already.
"""

import tensorflow as tf


def square_crop_and_resize(image, size=None):
    """``uint8 [H, W, 3]`` -> ``uint8 [S, S, 3]``: the largest centred square, resized to
    ``size`` (``None``: the square as it is, ``S = min(H, W)``)."""
    image = tf.convert_to_tensor(image)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(height, width)
    square = image[(height - side) // 2:(height - side) // 2 + side,
                   (width - side) // 2:(width - side) // 2 + side]
    if size is None:
        return square

    def resize():
        resized = tf.image.resize(square, [size, size], method="bicubic", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    return tf.ensure_shape(tf.cond(tf.equal(side, size), lambda: tf.cast(square, tf.uint8),
                                   resize), [size, size, image.shape[-1]])
