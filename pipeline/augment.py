"""Two-view augmentation, vectorised over a batch, driven by explicit seeds.

ASCL's query sees a *strong* view and its key a *weak* one:

* strong: random resized crop (scale 0.2-1.0) + horizontal flip + colour
  jitter (brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1) with
  p=0.8 + grayscale with p=0.2 (+ Gaussian blur, sigma 0.1-2.0, p=0.5; off by
  default below 64 px as in the reference CIFAR recipe);
* weak: random resized crop (scale 0.2-1.0) + horizontal flip.

Every function takes a batch of float images in [0, 1] and a stateless seed
(an int64 ``[2]`` tensor), so that the input pipeline can hand each batch a
seed drawn from one base seed per input pipeline and epoch: replicas and
epochs then see different randomness and a run is reproducible.

Why not Keras's preprocessing layers (the house preference), measured and
read before choosing:

* the reference recipe is torchvision's ``ColorJitter(0.4, 0.4, 0.4, 0.1)``,
  whose brightness *multiplies* by [0.6, 1.4]; Keras 3's ``RandomBrightness``
  *adds* an offset, and ``RandomSaturation``'s factor has another scale
  (0.5 is the identity), so the layers would silently train a different
  recipe;
* Keras has no random resized crop, and keras-cv's per-image
  ``RandomCropAndResize`` ran at half the speed of one batched
  ``tf.image.crop_and_resize`` here (about 2,500 vs 5,200 view pairs/s);
* the layers draw from a stateful generator and take no per-call seed, so in
  a parallel ``tf.data`` map the batch-to-randomness mapping is not
  reproducible.

The colour operations follow torchvision's definitions in a fixed order
(brightness, contrast, saturation, hue).
"""

import math

import tensorflow as tf

_GRAY = tf.constant([0.299, 0.587, 0.114])


def _split(seed, count):
    return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def _uniform(seed, batch, low=0.0, high=1.0):
    return tf.random.stateless_uniform([batch], seed, low, high)


def _batch_size(images):
    """The static batch size when known: keeps shapes static for XLA and grappler."""
    return images.shape[0] if images.shape[0] is not None else tf.shape(images)[0]


def _per_image(mask):
    return tf.reshape(mask, [-1, 1, 1, 1])


def _grayscale(images):
    return tf.reduce_sum(images * _GRAY, axis=-1, keepdims=True)


def random_resized_crop(images, seed, *, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crops a random area fraction in ``scale`` with aspect ratio in ``ratio``, resized to ``size``."""
    batch = _batch_size(images)
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    area_seed, ratio_seed, y_seed, x_seed = _split(seed, 4)
    area = _uniform(area_seed, batch, *scale)
    log_ratio = _uniform(ratio_seed, batch, math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    crop_w = tf.minimum(1.0, tf.sqrt(area * aspect * height / width))
    crop_h = tf.minimum(1.0, tf.sqrt(area / aspect * width / height))
    top = _uniform(y_seed, batch) * (1.0 - crop_h)
    left = _uniform(x_seed, batch) * (1.0 - crop_w)
    boxes = tf.stack([top, left, top + crop_h, left + crop_w], axis=1)
    return tf.image.crop_and_resize(images, boxes, tf.range(batch), [size, size])


def random_flip(images, seed):
    """Mirrors each image left-right with probability 1/2."""
    flip = _uniform(seed, _batch_size(images)) < 0.5
    return tf.where(_per_image(flip), tf.reverse(images, axis=[2]), images)


def color_jitter(images, seed, *, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8):
    """torchvision's ColorJitter with per-image factors, applied to each image with probability p."""
    batch = _batch_size(images)
    apply_seed, b_seed, c_seed, s_seed, h_seed = _split(seed, 5)
    out = images * _per_image(_uniform(b_seed, batch, 1 - brightness, 1 + brightness))
    out = tf.clip_by_value(out, 0.0, 1.0)
    mean = tf.reduce_mean(_grayscale(out), axis=[1, 2, 3], keepdims=True)
    out = tf.clip_by_value(
        (out - mean) * _per_image(_uniform(c_seed, batch, 1 - contrast, 1 + contrast)) + mean, 0., 1.)
    gray = _grayscale(out)
    out = tf.clip_by_value(
        (out - gray) * _per_image(_uniform(s_seed, batch, 1 - saturation, 1 + saturation)) + gray,
        0.0, 1.0)
    hsv = tf.image.rgb_to_hsv(out)
    shifted_hue = tf.math.floormod(hsv[..., :1] + _per_image(_uniform(h_seed, batch, -hue, hue)), 1.0)
    out = tf.image.hsv_to_rgb(tf.concat([shifted_hue, hsv[..., 1:]], axis=-1))
    return tf.where(_per_image(_uniform(apply_seed, batch) < p), out, images)


def random_grayscale(images, seed, *, p=0.2):
    """Replaces each image by its luma in all three channels with probability p."""
    gray = tf.tile(_grayscale(images), [1, 1, 1, 3])
    return tf.where(_per_image(_uniform(seed, _batch_size(images)) < p), gray, images)


def gaussian_blur(images, seed, *, sigma=(0.1, 2.0), p=0.5):
    """Separable Gaussian blur, sigma per image, kernel about a tenth of the side, reflect padding."""
    size = images.shape[1]
    radius = max(1, int(0.1 * size) // 2)
    batch = _batch_size(images)
    apply_seed, sigma_seed = _split(seed, 2)
    sigmas = _uniform(sigma_seed, batch, *sigma)
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernels = tf.exp(-0.5 * tf.square(offsets[None, :] / sigmas[:, None]))
    kernels /= tf.reduce_sum(kernels, axis=1, keepdims=True)  # [B, k]
    channels = images.shape[-1]
    # One depthwise convolution over all images at once: images become channels.
    stacked = tf.transpose(images, [1, 2, 0, 3])  # [H, W, B, C]
    stacked = tf.reshape(stacked, [1, tf.shape(images)[1], tf.shape(images)[2], -1])
    per_channel = tf.reshape(tf.repeat(kernels, channels, axis=0), [-1, 2 * radius + 1])
    padded = tf.pad(stacked, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    vertical = tf.transpose(per_channel)[:, None, :, None]  # [k, 1, B*C, 1]
    horizontal = tf.transpose(per_channel)[None, :, :, None]  # [1, k, B*C, 1]
    blurred = tf.nn.depthwise_conv2d(padded, vertical, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, horizontal, [1, 1, 1, 1], "VALID")
    blurred = tf.reshape(blurred, [tf.shape(images)[1], tf.shape(images)[2], batch, channels])
    blurred = tf.transpose(blurred, [2, 0, 1, 3])
    return tf.where(_per_image(_uniform(apply_seed, batch) < p), blurred, images)


def weak_view(images, seed, *, size, scale=(0.2, 1.0), flip=True):
    """Crop + flip: the key's view (``flip=False`` for data whose mirror image means else, e.g. digits)."""
    crop_seed, flip_seed = _split(seed, 2)
    out = random_resized_crop(images, crop_seed, size=size, scale=scale)
    return random_flip(out, flip_seed) if flip else out


def strong_view(images, seed, *, size, blur=False, scale=(0.2, 1.0), flip=True):
    """Crop + flip + colour jitter (p=0.8) + grayscale (p=0.2) [+ blur (p=0.5)]: the query's view."""
    view_seed, jitter_seed, gray_seed, blur_seed = _split(seed, 4)
    out = weak_view(images, view_seed, size=size, scale=scale, flip=flip)
    out = random_grayscale(color_jitter(out, jitter_seed), gray_seed)
    return gaussian_blur(out, blur_seed) if blur else out


def padded_crop_and_flip(images, seed, *, padding):
    """Reflect-pad by ``padding`` and crop back at a random offset, then flip (linear-probe input)."""
    size = images.shape[1]
    y_seed, x_seed, flip_seed = _split(seed, 3)
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]],
                    mode="REFLECT")
    batch = _batch_size(images)
    total = float(size + 2 * padding - 1)
    top = tf.floor(_uniform(y_seed, batch, 0, 2 * padding + 1)) / total
    left = tf.floor(_uniform(x_seed, batch, 0, 2 * padding + 1)) / total
    extent = (size - 1) / total
    boxes = tf.stack([top, left, top + extent, left + extent], axis=1)
    return random_flip(tf.image.crop_and_resize(padded, boxes, tf.range(batch), [size, size]),
                       flip_seed)
