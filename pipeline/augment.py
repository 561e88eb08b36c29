"""Two-view augmentation, vectorised over a batch, driven by explicit seeds.

ASCL's query sees a *strong* view and its key a *weak* one, as in the
reference (torchvision transforms on PIL images):

* strong: ``RandomResizedCrop(scale=(0.2, 1))`` + horizontal flip +
  ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with p=0.8 (the four operations in a
  random order per image) + grayscale with p=0.2 + Gaussian blur (sigma
  uniform in [0.1, 2.0] pixels, p=0.5) at every image size;
* weak: ``RandomResizedCrop(scale=(0.2, 1))`` + horizontal flip.

Each view and each random operation (``random_resized_crop``,
``color_jitter``, ``random_grayscale``, ``gaussian_blur``) takes a batch of
float images in [0, 1] and a stateless seed (an int64 ``[2]`` tensor), so that
the input pipeline can hand each batch a seed drawn from one base seed per
input pipeline and epoch: replicas and epochs then see different randomness
and a run is reproducible.  An operation with parameters is built from a
pair: ``draw_*`` draws the per-image parameters from a seed and ``apply_*``
applies given parameters, so that the tests can compare the draws with the
reference's distributions (torchvision's crop parameters and colour factors)
and the application with its numerics (torchvision's colour operations, PIL's
resize and blur) separately.

The operations are batched TensorFlow ops (``tf.image``, gathers and matrix
products over the whole batch) rather than Keras's preprocessing layers, for
three reasons:

* torchvision's ``ColorJitter`` brightness *multiplies* by [0.6, 1.4] and
  applies its operations in a random order; Keras 3's ``RandomBrightness``
  *adds* an offset, ``RandomSaturation``'s factor has another scale (0.5 is
  the identity), and ``RandomColorJitter`` uses a fixed order, so the layers
  would silently train a different recipe;
* Keras has no random resized crop with torchvision's ten tries and
  fallback, and keras-cv's per-image ``RandomCropAndResize`` runs at half the
  speed of a batched crop (measured: about 2,500 vs 5,200 view pairs/s
  against one batched ``tf.image.crop_and_resize``);
* the layers draw from a stateful generator and take no per-call seed, so in
  a parallel ``tf.data`` map the batch-to-randomness mapping is not
  reproducible.
"""

import math

import tensorflow as tf

# PIL's "L" conversion (ITU-R 601-2), which the reference's transforms on PIL images use.
# A plain tuple: a module-level tf.constant would initialise TensorFlow's context on import,
# after which a multi-worker strategy can no longer be created.
_GRAY = (0.299, 0.587, 0.114)


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
    """Luma [..., 1]: one matrix product over the channels (half the time of a multiply and
    a reduction here)."""
    weights = tf.constant(_GRAY, images.dtype, shape=[3, 1])
    luma = tf.matmul(tf.reshape(images, [-1, 3]), weights)
    return tf.reshape(luma, tf.concat([tf.shape(images)[:-1], [1]], axis=0))


def _clip_unit(images):
    """Clamps to [0, 1] in one pass (``tf.clip_by_value`` takes two)."""
    return tf.raw_ops.ClipByValue(t=images, clip_value_min=tf.constant(0.0, images.dtype),
                                  clip_value_max=tf.constant(1.0, images.dtype))


def draw_crop_windows(seed, batch, height, width, *, scale=(0.08, 1.0),
                      ratio=(3 / 4, 4 / 3), attempts=10):
    """Integer crop windows ``(top, left, crop_height, crop_width)`` [B] each, drawn as
    torchvision's ``RandomResizedCrop.get_params`` draws them.

    Per image, up to ``attempts`` tries: an area of ``U(scale)`` times the image's
    area and an aspect ratio of ``exp(U(log ratio))`` give ``w = round(sqrt(area *
    ratio))`` and ``h = round(sqrt(area / ratio))``; the first try that fits
    inside the image is placed uniformly at random.  When none fits, the
    fallback is the whole image clamped to the ratio range, centred.  All tries
    are drawn at once, so the batch stays vectorised.
    """
    height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area_seed, ratio_seed, y_seed, x_seed = _split(seed, 4)
    target = height_f * width_f * tf.random.stateless_uniform([batch, attempts], area_seed,
                                                              scale[0], scale[1])
    aspect = tf.exp(tf.random.stateless_uniform([batch, attempts], ratio_seed,
                                                math.log(ratio[0]), math.log(ratio[1])))
    tries_w = tf.round(tf.sqrt(target * aspect))  # round half to even, like Python's round
    tries_h = tf.round(tf.sqrt(target / aspect))
    fits = (tries_w > 0) & (tries_w <= width_f) & (tries_h > 0) & (tries_h <= height_f)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    found = tf.reduce_any(fits, axis=1)
    crop_w = tf.gather(tries_w, first, batch_dims=1)
    crop_h = tf.gather(tries_h, first, batch_dims=1)
    top = tf.floor(_uniform(y_seed, batch) * (height_f - crop_h + 1))
    left = tf.floor(_uniform(x_seed, batch) * (width_f - crop_w + 1))
    # torchvision's fallback: the largest centred window with a ratio in range.
    in_ratio = width_f / height_f
    fallback_w = tf.where(in_ratio < min(ratio), width_f,
                          tf.where(in_ratio > max(ratio), tf.round(height_f * max(ratio)), width_f))
    fallback_h = tf.where(in_ratio < min(ratio), tf.round(width_f / min(ratio)), height_f)
    fallback_top = tf.floor((height_f - fallback_h) / 2)
    fallback_left = tf.floor((width_f - fallback_w) / 2)
    pick = lambda drawn, fallback: tf.where(found, drawn, tf.fill([batch], fallback))  # noqa: E731
    return (pick(top, fallback_top), pick(left, fallback_left), pick(crop_h, fallback_h),
            pick(crop_w, fallback_w))


def apply_crop_windows(images, windows, size, flip=None):
    """Bilinear resize of integer pixel windows to ``size`` x ``size`` as PIL resizes a
    cropped image (``crop(...).resize(..., BILINEAR)``): half-pixel centres, and sample
    positions clamped to the window, so the window's edge rows extend outwards.

    Exact for windows no larger than ``size`` (always when views keep the stored size, as
    on CIFAR-10); PIL would also low-pass filter a window it shrinks.  ``flip`` [B] (bool)
    mirrors those views left-right by reading their columns in reverse, which costs
    nothing next to a flip of the finished view.
    """
    top, left, crop_h, crop_w = windows

    def positions(start, extent):
        steps = (tf.range(size, dtype=tf.float32)[None, :] + 0.5) * (extent[:, None] / size)
        where = tf.clip_by_value(start[:, None] + steps - 0.5, start[:, None],
                                 start[:, None] + extent[:, None] - 1)
        low = tf.floor(where)
        high = tf.minimum(low + 1, start[:, None] + extent[:, None] - 1)
        return tf.cast(low, tf.int32), tf.cast(high, tf.int32), (where - low)

    y0, y1, wy = positions(top, crop_h)
    x0, x1, wx = positions(left, crop_w)
    if flip is not None:
        mirrored = flip[:, None]
        x0, x1, wx = (tf.where(mirrored, tf.reverse(t, [1]), t) for t in (x0, x1, wx))
    rows = (tf.gather(images, y0, axis=1, batch_dims=1) * (1 - wy)[:, :, None, None]
            + tf.gather(images, y1, axis=1, batch_dims=1) * wy[:, :, None, None])
    return (tf.gather(rows, x0, axis=2, batch_dims=1) * (1 - wx)[:, None, :, None]
            + tf.gather(rows, x1, axis=2, batch_dims=1) * wx[:, None, :, None])


def draw_flip(seed, batch):
    """``flip`` [B] of torchvision's ``RandomHorizontalFlip()``: true with probability 1/2,
    for ``apply_crop_windows``."""
    return _uniform(seed, batch) < 0.5


def random_resized_crop(images, seed, *, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                        flip_seed=None):
    """torchvision's ``RandomResizedCrop(size, scale, ratio)``, per image, vectorised;
    with ``flip_seed`` followed by ``RandomHorizontalFlip()`` drawn from that seed, in the
    same pass."""
    batch = _batch_size(images)
    windows = draw_crop_windows(seed, batch, tf.shape(images)[1], tf.shape(images)[2],
                                scale=scale, ratio=ratio)
    flip = None if flip_seed is None else draw_flip(flip_seed, batch)
    return apply_crop_windows(images, windows, size, flip=flip)


# torchvision's _blend(image, other, factor) = clamp(factor * image + (1 - factor) * other)

def _brightness(images, factor):
    return _clip_unit(images * _per_image(factor))


def _contrast(images, factor):
    mean = tf.reduce_mean(_grayscale(images), axis=[1, 2, 3], keepdims=True)
    # (x - m) f + m, the same value as torchvision's f x + (1 - f) m, in the form whose
    # rounding the recorded views pin (the other form moves an ulp, which the blur's 8-bit
    # rounding can turn into a grey level)
    return _clip_unit((images - mean) * _per_image(factor) + mean)


def _saturation(images, factor):
    gray = _grayscale(images)
    return _clip_unit((images - gray) * _per_image(factor) + gray)


def _hue(images, shift):
    hsv = tf.image.rgb_to_hsv(images)
    hue = tf.math.floormod(hsv[..., :1] + _per_image(shift), 1.0)
    return tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], axis=-1))


# torchvision's ColorJitter operations, in the column order of ``factors`` below.
_COLOR_OPS = (_brightness, _contrast, _saturation, _hue)


def apply_color_jitter(images, factors, order, applied=None):
    """Applies brightness, contrast, saturation and hue with per-image ``factors`` [B, 4]
    (multipliers, multipliers, multipliers, hue shift) in the per-image ``order`` [B, 4]
    (a permutation of 0..3 per row), as torchvision's ColorJitter does with its
    ``randperm(4)``; images whose ``applied`` [B] is false pass through unchanged.

    Each stage partitions the batch by the operation each image needs next (or none), so
    every jittered image goes through exactly four operations and no other image through
    any.
    """
    order = tf.cast(order, tf.int32)
    skip = len(_COLOR_OPS)  # the partition of images left as they are
    if applied is not None:
        order = tf.where(applied[:, None], order, skip)
    positions = tf.range(_batch_size(images))
    out = images
    for stage in range(len(_COLOR_OPS)):
        op_index = order[:, stage]
        parts = tf.dynamic_partition(out, op_index, skip + 1)
        factor_parts = tf.dynamic_partition(
            tf.gather(factors, tf.minimum(op_index, skip - 1), axis=1, batch_dims=1), op_index,
            skip + 1)
        index_parts = tf.dynamic_partition(positions, op_index, skip + 1)
        results = [op(part, factor) for op, part, factor in zip(_COLOR_OPS, parts, factor_parts)]
        out = tf.reshape(tf.dynamic_stitch(index_parts, results + [parts[skip]]),
                         tf.shape(images))
    return out


def draw_color_jitter(seed, batch, *, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                      p=0.8):
    """``(factors [B, 4], order [B, 4], applied [B])`` of torchvision's
    ``RandomApply([ColorJitter(b, c, s, h)], p)``: per image, factors uniform in
    ``[1 - b, 1 + b]``, ``[1 - c, 1 + c]``, ``[1 - s, 1 + s]``, ``[-h, h]``, a uniformly
    random order of the four operations (its ``randperm(4)``), and whether to apply."""
    apply_seed, b_seed, c_seed, s_seed, h_seed, order_seed = _split(seed, 6)
    factors = tf.stack([_uniform(b_seed, batch, 1 - brightness, 1 + brightness),
                        _uniform(c_seed, batch, 1 - contrast, 1 + contrast),
                        _uniform(s_seed, batch, 1 - saturation, 1 + saturation),
                        _uniform(h_seed, batch, -hue, hue)], axis=1)
    # argsort of i.i.d. uniforms: a uniformly random permutation per image
    order = tf.argsort(tf.random.stateless_uniform([batch, 4], order_seed), axis=1)
    return factors, order, _uniform(apply_seed, batch) < p


def color_jitter(images, seed, *, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8):
    """torchvision's ``RandomApply([ColorJitter(b, c, s, h)], p)``, per image."""
    factors, order, applied = draw_color_jitter(
        seed, _batch_size(images), brightness=brightness, contrast=contrast,
        saturation=saturation, hue=hue, p=p)
    return apply_color_jitter(images, factors, order, applied)


def random_grayscale(images, seed, *, p=0.2):
    """Replaces each image by its luma in all three channels with probability p."""
    return _update_chosen(images, _uniform(seed, _batch_size(images)) < p,
                          lambda chosen: tf.tile(_grayscale(chosen), [1, 1, 1, 3]))


def _update_chosen(images, mask, transform, *per_image_args):
    """``images`` with those whose ``mask`` [B] is true replaced by ``transform`` of them
    (called with those images and the same rows of each ``per_image_args``): an operation
    drawn for a fraction of the images costs that fraction."""
    chosen = tf.where(mask)
    changed = transform(tf.gather_nd(images, chosen),
                        *(tf.gather_nd(arg, chosen) for arg in per_image_args))
    return tf.tensor_scatter_nd_update(images, chosen, changed)


BLUR_PASSES = 3  # PIL's GaussianBlur: three box blurs per axis


def _pil_box_radius(sigma, passes=BLUR_PASSES):
    """``(l, a)``: the integer and fractional box radius PIL's ``_gaussian_blur_radius``
    gives a Gaussian of std ``sigma`` made of ``passes`` box blurs (Gwosdek et al. 2011).
    Works on floats and on tensors."""
    floor, sqrt = (math.floor, math.sqrt) if isinstance(sigma, float) else (tf.floor, tf.sqrt)
    sigma2 = sigma * sigma / passes
    whole = floor((sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)
    fraction = ((2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
                / (6 * (sigma2 - (whole + 1) * (whole + 1))))
    return whole, fraction


def blur_radius(max_sigma):
    """Half-width of the blur for sigmas up to ``max_sigma``: the support of PIL's three
    box passes together, ``3 * (l + 1)``, which is at least 3 sigma up to sigma 2."""
    return BLUR_PASSES * (int(_pil_box_radius(float(max_sigma))[0]) + 1)


def box_kernels(sigmas, box_radius):
    """Per-image 1-D kernels ``[B, 2 * box_radius + 1]`` of one of PIL's box-blur passes for
    ``GaussianBlur(sigma)``, in PIL's 24-bit fixed point (integers summing to ``2**24``):
    ``ww = 2**24 // (2 r + 1)`` within ``l`` of the centre and ``fw`` for the fractional ends."""
    whole, fraction = _pil_box_radius(tf.cast(sigmas, tf.float64))
    ww = tf.floor(2.0 ** 24 / (2 * (whole + fraction) + 1))
    fw = tf.floor((2.0 ** 24 - (2 * whole + 1) * ww) / 2)
    offsets = tf.abs(tf.range(-box_radius, box_radius + 1, dtype=tf.float64))[None, :]
    return tf.where(offsets <= whole[:, None], ww[:, None],
                    tf.where(offsets == whole[:, None] + 1, fw[:, None], tf.zeros_like(offsets)))


def _box_pass_matrices(sigmas, box_radius, length):
    """``[B, length, length]`` matrices of one of PIL's box passes along an axis of
    ``length`` pixels, edges extended: row ``i`` holds the 24-bit fixed-point weights
    (``box_kernels``) of the source pixels ``clip(i + t, 0, length - 1)`` for the taps
    ``t`` in ``[-box_radius, box_radius]``."""
    weights = box_kernels(sigmas, box_radius)  # [B, taps], float64
    sources = tf.clip_by_value(tf.range(length)[:, None] + tf.range(-box_radius, box_radius + 1),
                               0, length - 1)  # [length, taps]
    return tf.einsum("bt,itj->bij", weights, tf.one_hot(sources, length, dtype=tf.float64))


def apply_blur(images, sigmas, radius):
    """PIL's ``GaussianBlur(radius=sigma)`` of each image with its own ``sigmas`` [B]
    (pixels), computed as PIL computes it on 8-bit images: three box-blur passes along the
    rows, then three along the columns, edges extended, each pass rounded to 8 bits.
    ``radius`` is the support of the three passes together (``blur_radius``).

    Each pass is one batched matrix product (the pass's banded matrix per image, edge
    extension folded in): at 32 px about half the time of depthwise convolutions over
    gathered edges.  Its work grows with the side length (a dense L x L matrix for a few
    taps), so for much larger views the convolution form may be faster; not measured above
    32 px.  The sums are PIL's 24-bit fixed point, exact in float64: float32 would round
    them, and with sigma 1 (weights 2/3, 1/6, 1/6) many pixels lie exactly on a half grey
    level, where PIL's rounding then flips (half a level on average).
    """
    batch = _batch_size(images)
    height, width, channels = tf.shape(images)[1], tf.shape(images)[2], images.shape[-1]
    box_radius = radius // BLUR_PASSES

    def passes(columns, matrices):  # three rounded passes along axis 1 of [B, length, N]
        for _ in range(BLUR_PASSES):
            columns = tf.floor((tf.matmul(matrices, columns) + 2.0 ** 23) / 2.0 ** 24)
        return columns

    along_rows = _box_pass_matrices(sigmas, box_radius, width)
    square = images.shape[1] is not None and images.shape[1] == images.shape[2]
    along_columns = along_rows if square else _box_pass_matrices(sigmas, box_radius, height)
    pixels = tf.round(tf.cast(images, tf.float64) * 255.0)  # the reference blurs 8-bit images
    # along the rows (width) first, as PIL: width to axis 1, height and channels flattened
    out = passes(tf.reshape(tf.transpose(pixels, [0, 2, 1, 3]), [batch, width, -1]),
                 along_rows)
    out = tf.transpose(tf.reshape(out, [batch, width, height, channels]), [0, 2, 1, 3])
    out = passes(tf.reshape(out, [batch, height, -1]), along_columns)
    return tf.cast(tf.reshape(out, tf.shape(images)) / 255.0, images.dtype)


def draw_blur(seed, batch, *, sigma=(0.1, 2.0), p=0.5):
    """``(sigmas [B], applied [B])`` of the reference's ``RandomApply([GaussianBlur(sigma)],
    p)``: sigma uniform per image, in pixels."""
    apply_seed, sigma_seed = _split(seed, 2)
    return _uniform(sigma_seed, batch, *sigma), _uniform(apply_seed, batch) < p


def gaussian_blur(images, seed, *, sigma=(0.1, 2.0), p=0.5):
    """The reference's ``RandomApply([GaussianBlur(sigma)], p)`` with PIL's
    ``ImageFilter.GaussianBlur(radius=sigma)``, whose three box blurs this reproduces
    (within a grey level of PIL at every sigma; tested against PIL)."""
    sigmas, applied = draw_blur(seed, _batch_size(images), sigma=sigma, p=p)
    radius = blur_radius(sigma[1])
    return _update_chosen(images, applied,
                          lambda chosen, chosen_sigmas: apply_blur(chosen, chosen_sigmas, radius),
                          sigmas)


def weak_view(images, seed, *, size, scale=(0.2, 1.0), flip=True):
    """Crop + flip: the key's view (``flip=False`` for data whose mirror image means something
    else, e.g. digits)."""
    crop_seed, flip_seed = _split(seed, 2)
    return random_resized_crop(images, crop_seed, size=size, scale=scale,
                               flip_seed=flip_seed if flip else None)


def strong_view(images, seed, *, size, blur=True, scale=(0.2, 1.0), flip=True):
    """Crop + flip + colour jitter (p=0.8) + grayscale (p=0.2) + blur (p=0.5): the query's view."""
    view_seed, jitter_seed, gray_seed, blur_seed = _split(seed, 4)
    out = weak_view(images, view_seed, size=size, scale=scale, flip=flip)
    out = random_grayscale(color_jitter(out, jitter_seed), gray_seed)
    return gaussian_blur(out, blur_seed) if blur else out
