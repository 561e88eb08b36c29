"""Two-view augmentations: shapes, ranges, seeds, probabilities."""

import numpy as np
import pytest
import tensorflow as tf

from pipeline import augment

SEED = tf.constant([3, 7], tf.int64)


def _images(n=64, size=16, seed=0):
    return tf.constant(np.random.default_rng(seed).random((n, size, size, 3)), tf.float32)


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
    assert not np.allclose(view(tf.tile(images[:1], [4, 1, 1, 1]), SEED, size=12)[0],
                           view(tf.tile(images[:1], [4, 1, 1, 1]), SEED, size=12)[1])


def test_full_scale_crop_of_a_square_image_is_the_image():
    images = _images(8)
    out = augment.random_resized_crop(images, SEED, size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(out.numpy(), images.numpy(), atol=1e-5)


def test_flip_mirrors_about_half_the_images():
    images = _images(400)
    out = augment.random_flip(images, SEED).numpy()
    flipped = np.all(np.isclose(out, images.numpy()[:, :, ::-1]), axis=(1, 2, 3))
    kept = np.all(np.isclose(out, images.numpy()), axis=(1, 2, 3))
    assert np.all(flipped | kept) and 150 < flipped.sum() < 250


def test_grayscale_probability_and_result():
    images = _images(500)
    out = augment.random_grayscale(images, SEED, p=0.2).numpy()
    gray = np.all(np.isclose(out[..., 0], out[..., 1]) & np.isclose(out[..., 1], out[..., 2]),
                  axis=(1, 2))
    assert 60 < gray.sum() < 140
    luma = images.numpy() @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(out[gray][..., 0], luma[gray], atol=1e-5)


def test_color_jitter_probability_and_identity_at_zero_strength():
    images = _images(500)
    out = augment.color_jitter(images, SEED, p=0.8).numpy()
    changed = ~np.all(np.isclose(out, images.numpy(), atol=1e-4), axis=(1, 2, 3))
    assert 340 < changed.sum() < 460
    same = augment.color_jitter(images, SEED, brightness=0, contrast=0, saturation=0, hue=0, p=1.0)
    np.testing.assert_allclose(same.numpy(), images.numpy(), atol=1e-4)


def test_gaussian_blur_preserves_constants_and_smooths_noise():
    constant = tf.fill([4, 32, 32, 3], 0.5)
    np.testing.assert_allclose(augment.gaussian_blur(constant, SEED, p=1.0).numpy(), 0.5, atol=1e-5)
    noise = _images(4, size=32)
    blurred = augment.gaussian_blur(noise, SEED, sigma=(1.5, 2.0), p=1.0).numpy()
    assert blurred.shape == noise.shape and blurred.std() < 0.8 * noise.numpy().std()


def test_padded_crop_keeps_size_and_content_shift():
    images = _images(8)
    out = augment.padded_crop_and_flip(images, SEED, padding=2).numpy()
    assert out.shape == images.shape
    for original, cropped in zip(images.numpy(), out):
        candidates = [np.pad(original, [(2, 2), (2, 2), (0, 0)], mode="reflect")[y:y + 16, x:x + 16]
                      for y in range(5) for x in range(5)]
        candidates += [c[:, ::-1] for c in candidates]
        assert min(np.abs(c - cropped).max() for c in candidates) < 1e-4
