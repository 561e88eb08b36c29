"""Two-view augmentations against the reference's torchvision and PIL behaviour."""

import itertools
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image, ImageFilter

from pipeline import augment

SEED = tf.constant([3, 7], tf.int64)


def _images(n=64, size=16, seed=0):
    return tf.constant(np.random.default_rng(seed).random((n, size, size, 3)), tf.float32)


def _natural_image(size=48, seed=0):
    """Smooth shapes plus fine texture, uint8: what photographs look like to a blur."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC), np.float64)
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("view", [augment.weak_view, augment.strong_view])
def test_views_are_seeded_batched_and_in_range(view):
    images = _images()
    a = view(images, SEED, size=12).numpy()
    b = view(images, SEED, size=12).numpy()
    c = view(images, tf.constant([3, 8], tf.int64), size=12).numpy()
    assert a.shape == (64, 12, 12, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.min() >= -1e-6 and a.max() <= 1 + 1e-6
    # images within a batch get different crops
    tiled = view(tf.tile(images[:1], [4, 1, 1, 1]), SEED, size=12).numpy()
    assert not np.allclose(tiled[0], tiled[1])


# -- random resized crop: torchvision's RandomResizedCrop.get_params ---------------------

def _torchvision_crop_params(rng, height, width, scale, ratio):
    """torchvision.transforms.RandomResizedCrop.get_params, in NumPy."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _ks_statistic(a, b):
    values = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), values, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), values, side="right") / len(b)
    return np.abs(cdf_a - cdf_b).max()


@pytest.mark.parametrize("scale, shape", [((0.2, 1.0), (32, 32)), ((0.08, 1.0), (24, 40))])
def test_crop_windows_are_distributed_as_torchvision_draws_them(scale, shape):
    count = 20000
    height, width = shape
    top, left, h, w = (t.numpy().astype(np.float64) for t in augment.draw_crop_windows(
        SEED, count, height, width, scale=scale))
    assert np.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0))
    assert np.all((top + h <= height) & (left + w <= width))
    assert np.all(h == np.round(h)) and np.all(w == np.round(w))
    rng = np.random.default_rng(0)
    ref = np.array([_torchvision_crop_params(rng, height, width, scale, (3 / 4, 4 / 3))
                    for _ in range(count)], np.float64)
    # two-sample Kolmogorov-Smirnov; 0.02 is the 0.1% critical value for 20,000 each
    for ours, theirs in ((h * w, ref[:, 2] * ref[:, 3]), (w / h, ref[:, 3] / ref[:, 2]),
                         (top, ref[:, 0]), (left, ref[:, 1])):
        assert _ks_statistic(ours, theirs) < 0.02


def test_crop_falls_back_to_the_centred_window_as_torchvision():
    # ratio 2-3 on a square image at full area: every try is too wide, so the fallback runs
    top, left, h, w = (t.numpy() for t in augment.draw_crop_windows(
        SEED, 5, 32, 32, scale=(1.0, 1.0), ratio=(2.0, 3.0)))
    np.testing.assert_array_equal(np.stack([top, left, h, w], 1), [[8, 0, 16, 32]] * 5)


@pytest.mark.parametrize("window", [(4, 6, 16, 20), (0, 0, 12, 12), (20, 20, 12, 12),
                                    (0, 0, 32, 24), (5, 0, 27, 32), (0, 8, 10, 24)])
def test_crop_resize_matches_pil_bilinear_at_the_borders_too(window):
    image = _natural_image(32)
    ours = augment.apply_crop_windows(
        tf.constant(image[None] / 255.0, tf.float32), [tf.constant([float(v)]) for v in window],
        32)
    top, left, height, width = window
    pil = Image.fromarray(image).crop((left, top, left + width, top + height)).resize(
        (32, 32), Image.BILINEAR)
    # PIL rounds to whole grey levels and computes in fixed point
    assert np.abs(ours.numpy()[0] * 255 - np.asarray(pil, np.float64)).max() <= 1.01


def test_full_scale_crop_of_a_square_image_is_the_image():
    images = _images(8)
    out = augment.random_resized_crop(images, SEED, size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(out.numpy(), images.numpy(), atol=1e-5)


# -- flips, grayscale -------------------------------------------------------------------

def test_weak_view_flip_mirrors_about_half_the_images():
    images = _images(400)
    # a full-scale crop of a square image is the whole image, so only the flip changes it
    out = augment.weak_view(images, SEED, size=16, scale=(1.0, 1.0)).numpy()
    flipped = np.all(np.isclose(out, images.numpy()[:, :, ::-1]), axis=(1, 2, 3))
    kept = np.all(np.isclose(out, images.numpy()), axis=(1, 2, 3))
    assert np.all(flipped | kept) and 150 < flipped.sum() < 250


def test_grayscale_probability_and_torchvision_weights():
    images = _images(500)
    out = augment.random_grayscale(images, SEED, p=0.2).numpy()
    gray = np.all(np.isclose(out[..., 0], out[..., 1]) & np.isclose(out[..., 1], out[..., 2]),
                  axis=(1, 2))
    assert 60 < gray.sum() < 140
    luma = images.numpy() @ np.array([0.299, 0.587, 0.114])  # PIL's convert("L")
    np.testing.assert_allclose(out[gray][..., 0], luma[gray], atol=1e-6)


# -- colour jitter: torchvision's ColorJitter, operations in a random order ------------------

def _np_gray(image):
    return image @ np.array([0.299, 0.587, 0.114])


_NP_OPS = (
    lambda x, f: np.clip(x * f, 0, 1),
    lambda x, f: np.clip((x - _np_gray(x).mean()) * f + _np_gray(x).mean(), 0, 1),
    lambda x, f: np.clip((x - _np_gray(x)[..., None]) * f + _np_gray(x)[..., None], 0, 1),
    lambda x, f: hsv_to_rgb(np.concatenate(
        [np.mod(rgb_to_hsv(x)[..., :1] + f, 1.0), rgb_to_hsv(x)[..., 1:]], axis=-1)),
)


def test_jitter_applies_torchvision_operations_in_each_images_order():
    orders = np.array(list(itertools.permutations(range(4))))  # all 24 orders
    images = _images(len(orders), size=8, seed=1)
    rng = np.random.default_rng(2)
    factors = np.stack([rng.uniform(0.6, 1.4, 24), rng.uniform(0.6, 1.4, 24),
                        rng.uniform(0.6, 1.4, 24), rng.uniform(-0.1, 0.1, 24)], 1)
    ours = augment.apply_color_jitter(images, tf.constant(factors, tf.float32),
                                      tf.constant(orders)).numpy()
    for index, (image, order) in enumerate(zip(images.numpy().astype(np.float64), orders)):
        expected = image
        for op in order:
            expected = _NP_OPS[op](expected, factors[index, op])
        np.testing.assert_allclose(ours[index], expected, atol=2e-5)
    # the order matters: the same factors in the reverse order give another image
    reverse = augment.apply_color_jitter(images, tf.constant(factors, tf.float32),
                                         tf.constant(orders[:, ::-1].copy())).numpy()
    assert np.abs(reverse - ours).max() > 0.01


def test_jitter_draws_every_order_equally_often_and_applies_with_p():
    batch = 4800
    factors, order, applied = augment.draw_color_jitter(SEED, batch)
    order = order.numpy()
    assert np.all(np.sort(order, axis=1) == np.arange(4))
    counts = np.unique(order @ (4 ** np.arange(4)), return_counts=True)[1]
    assert len(counts) == 24
    expected = batch / 24
    assert np.sum((counts - expected) ** 2 / expected) < 60  # chi-square, 23 dof: p < 1e-4
    assert 0.77 < applied.numpy().mean() < 0.83
    factors = factors.numpy()
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4
    assert np.abs(factors[:, 3]).max() <= 0.1
    images = _images(batch // 40, size=8)
    out = augment.color_jitter(images, SEED).numpy()
    small = augment.draw_color_jitter(SEED, batch // 40)
    expected = np.where(small[2].numpy()[:, None, None, None],
                        augment.apply_color_jitter(images, small[0], small[1]).numpy(),
                        images.numpy())
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_color_jitter_identity_at_zero_strength():
    images = _images(50)
    same = augment.color_jitter(images, SEED, brightness=0, contrast=0, saturation=0, hue=0, p=1.0)
    np.testing.assert_allclose(same.numpy(), images.numpy(), atol=1e-4)


# -- Gaussian blur: PIL's ImageFilter.GaussianBlur(radius=sigma) -----------------------------

def test_blur_kernel_is_not_truncated():
    # the kernel array spans +-3 sigma of the largest sigma, and holds every tap of PIL's
    # three box passes for any sigma up to it
    radius = augment.blur_radius(2.0)
    assert radius >= 3 * 2.0
    for sigma in np.linspace(0.1, 2.0, 39):
        assert augment.blur_radius(sigma) <= radius


@pytest.mark.parametrize("sigma", [0.1, 0.2, 0.3, 0.45, 0.7, 1.0, 1.5, 2.0])
def test_blur_matches_pil_gaussian_blur(sigma):
    radius = augment.blur_radius(2.0)
    for seed in range(2):
        image = _natural_image(48, seed)
        pil = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)),
                         np.float64)
        ours = augment.apply_blur(tf.constant(image[None] / 255.0, tf.float32),
                                  tf.constant([sigma]), radius).numpy()[0] * 255
        inner = np.s_[radius:-radius, radius:-radius]  # away from the borders
        difference = np.abs(ours - pil)[inner]
        assert difference.mean() < 1.0 and difference.max() < 3.0, (sigma, difference.mean(),
                                                                     difference.max())


def test_blur_draws_the_reference_sigma_range_and_probability():
    sigmas, applied = (t.numpy() for t in augment.draw_blur(SEED, 4000))
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
    assert sigmas.min() < 0.11 and sigmas.max() > 1.99 and abs(np.median(sigmas) - 1.05) < 0.05
    assert 0.47 < applied.mean() < 0.53


def test_blur_applies_with_p_and_keeps_constants():
    constant = tf.fill([4, 32, 32, 3], 100 / 255)  # the blur works on 8-bit levels, as PIL
    np.testing.assert_allclose(augment.gaussian_blur(constant, SEED, p=1.0).numpy(), 100 / 255,
                               atol=1e-6)
    noise = _images(400, size=16)
    out = augment.gaussian_blur(noise, SEED, sigma=(1.0, 2.0), p=0.5).numpy()
    blurred = ~np.all(np.isclose(out, noise.numpy()), axis=(1, 2, 3))
    assert 160 < blurred.sum() < 240
    assert out[blurred].std() < 0.8 * noise.numpy()[blurred].std()


def test_strong_view_blurs_by_default_at_32_px(monkeypatch):
    calls = []
    blur = augment.gaussian_blur
    monkeypatch.setattr(augment, "gaussian_blur",
                        lambda *args, **kwargs: calls.append(1) or blur(*args, **kwargs))
    augment.strong_view(_images(4, size=32), SEED, size=32)
    assert calls


# -- the fast paths: same results as the plain operations -------------------------------------

def _fixed_point_blur(image, sigma, box_radius):
    """PIL's three box passes per axis in exact 24-bit integer arithmetic (NumPy int64)."""
    kernel = augment.box_kernels(tf.constant([sigma]), box_radius).numpy()[0].astype(np.int64)
    out = np.round(image * 255.0).astype(np.int64)
    for axis in (1, 0):  # along the rows (width) first, as PIL
        length = out.shape[axis]
        for _ in range(augment.BLUR_PASSES):
            total = np.zeros_like(out)
            for tap, weight in zip(range(-box_radius, box_radius + 1), kernel):
                source = np.clip(np.arange(length) + tap, 0, length - 1)
                total += weight * np.take(out, source, axis=axis)
            out = (total + 2 ** 23) >> 24
    return out


@pytest.mark.parametrize("sigma", [0.3, 1.0, 1.7])
def test_blur_is_exact_24_bit_fixed_point(sigma):
    # sigma 1 puts many sums exactly on half a grey level: float32 sums would round them
    # the other way (the matrix-product blur computes them in float64)
    images = np.stack([_natural_image(20, seed) for seed in range(2)]) / 255.0
    radius = augment.blur_radius(2.0)
    ours = augment.apply_blur(tf.constant(images, tf.float32), tf.constant([sigma] * 2),
                              radius).numpy() * 255
    for image, result in zip(images, ours):
        np.testing.assert_array_equal(np.round(result), _fixed_point_blur(image, sigma,
                                                                          radius // 3))


def test_flip_inside_the_crop_equals_a_flip_after_it():
    images = _images(32, size=16)
    windows = augment.draw_crop_windows(SEED, 32, 16, 16, scale=(0.2, 1.0))
    flip = tf.constant(np.arange(32) % 3 == 0)
    fused = augment.apply_crop_windows(images, windows, 12, flip=flip).numpy()
    plain = augment.apply_crop_windows(images, windows, 12).numpy()
    expected = np.where(flip.numpy()[:, None, None, None], plain[:, :, ::-1], plain)
    np.testing.assert_array_equal(fused, expected)
    # the weak view is the crop drawn from its crop seed, then the flip drawn from its flip seed
    weak = augment.weak_view(images, SEED, size=12).numpy()
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(SEED, 2))
    cropped = augment.random_resized_crop(images, crop_seed, size=12).numpy()
    flipped = augment.draw_flip(flip_seed, 32).numpy()
    separate = np.where(flipped[:, None, None, None], cropped[:, :, ::-1], cropped)
    np.testing.assert_array_equal(weak, separate)


def test_operations_drawn_for_some_images_leave_the_others_bit_identical():
    images = _images(64, size=8)
    factors, order, _ = augment.draw_color_jitter(SEED, 64)
    applied = tf.constant(np.arange(64) % 2 == 0)
    jittered = augment.apply_color_jitter(images, factors, order, applied).numpy()
    everything = augment.apply_color_jitter(images, factors, order).numpy()
    np.testing.assert_array_equal(jittered[1::2], images.numpy()[1::2])
    np.testing.assert_allclose(jittered[::2], everything[::2], atol=1e-6)
    blurred = augment.gaussian_blur(images, SEED, p=0.5).numpy()
    sigmas, chosen = (t.numpy() for t in augment.draw_blur(SEED, 64))
    np.testing.assert_array_equal(blurred[~chosen], images.numpy()[~chosen])
    alone = augment.apply_blur(tf.constant(images.numpy()[chosen]), sigmas[chosen],
                               augment.blur_radius(2.0)).numpy()
    np.testing.assert_array_equal(blurred[chosen], alone)
    gray = augment.random_grayscale(images, SEED, p=0.5).numpy()
    kept = np.all(gray == images.numpy(), axis=(1, 2, 3))
    assert 16 < kept.sum() < 48 and np.all(gray[~kept][..., 0] == gray[~kept][..., 2])


def test_views_are_bit_identical_to_the_recorded_views():
    """``data/recorded_views.npz`` holds both views of a fixed batch, the
    augmentations' numerics recorded once, so that any change to them fails here.  Such a
    change must regenerate the file on purpose (and say so: it changes what runs train on)."""
    stored = np.load(os.path.join(os.path.dirname(__file__), "data",
                                  "recorded_views.npz"))
    images = tf.constant(np.random.default_rng(0).random((16, 20, 20, 3)).astype(np.float32))
    np.testing.assert_array_equal(augment.strong_view(images, SEED, size=16).numpy(),
                                  stored["strong"])
    np.testing.assert_array_equal(augment.weak_view(images, SEED, size=16).numpy(),
                                  stored["weak"])


def test_blur_of_a_non_square_image_is_exact_fixed_point():
    image = _natural_image(24, 1)[:12, :20] / 255.0  # 12 x 20: rows and columns differ
    radius = augment.blur_radius(2.0)
    ours = augment.apply_blur(tf.constant(image[None], tf.float32), tf.constant([1.3]),
                              radius).numpy()[0] * 255
    np.testing.assert_array_equal(np.round(ours), _fixed_point_blur(image, 1.3, radius // 3))


def test_views_with_nothing_drawn_a_single_image_and_an_unknown_batch():
    images = _images(5, size=8)
    for operation in (lambda x: augment.gaussian_blur(x, SEED, p=0.0),
                      lambda x: augment.random_grayscale(x, SEED, p=0.0),
                      lambda x: augment.color_jitter(x, SEED, p=0.0)):
        np.testing.assert_array_equal(operation(images).numpy(), images.numpy())
    single = augment.strong_view(images[:1], SEED, size=8)
    assert single.shape == (1, 8, 8, 3)
    traced = tf.function(lambda x: augment.strong_view(x, SEED, size=8),
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    np.testing.assert_array_equal(traced(images).numpy(),
                                  augment.strong_view(images, SEED, size=8).numpy())
