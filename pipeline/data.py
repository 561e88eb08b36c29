"""``tf.data`` input for training and evaluation, from a prepared dataset.

Pre-training elements are dicts ``{"strong_view", "weak_view", "label"}`` of
normalised float32 ``[B, S, S, 3]`` views (``ASCLModel.fit`` ignores the
label).  The chain: read shards (parallel interleave) -> decode -> cache the
decoded uint8 images in memory when they fit -> shuffle -> batch (dropping
the remainder) -> two views per image, vectorised per batch -> normalise with
the manifest's mean and std -> prefetch.

Each batch gets its own stateless seed from ``tf.data.Dataset.random`` seeded
by ``seed`` and the input pipeline id and re-randomised every epoch, so every
replica and every epoch draws different augmentations from one seed.
"""

import numpy as np
import tensorflow as tf

from pipeline import augment
from pipeline.prepared_dataset import read_split

CACHE_LIMIT_BYTES = 4 * 2 ** 30


def dataset_bytes(manifest, split):
    height, width, channels = manifest["image_shape"]
    return manifest["splits"][split]["num_examples"] * height * width * channels


def channel_statistics(manifest):
    """Per-channel ``(mean, std)`` of the train split in pixel units (0-255), as float32 arrays.

    The std is floored at 0.255 (1e-3 in [0, 1] units): a constant channel must not
    divide by zero.  Training, the TensorBoard previews and the export all use these.
    """
    stats = manifest["train_statistics"]
    return (np.asarray(stats["mean"], np.float32),
            np.maximum(np.asarray(stats["std"], np.float32), np.float32(0.255)))


def normalizer(manifest):
    """A function mapping float images in [0, 1] to the manifest's standardised units."""
    mean, std = channel_statistics(manifest)
    mean, std = tf.constant(mean / 255.0), tf.constant(std / 255.0)
    return lambda images: (images - mean) / std


def _images(manifest, split, *, input_context=None, cache=True, limit=None):
    count = manifest["splits"][split]["num_examples"]
    # The manifest knows the size: tell tf.data, so Keras shows complete progress bars.
    dataset = read_split(manifest, split).apply(tf.data.experimental.assert_cardinality(count))
    if limit:
        dataset = dataset.take(limit)
    if input_context and input_context.num_input_pipelines > 1:
        dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if cache and dataset_bytes(manifest, split) <= CACHE_LIMIT_BYTES:
        dataset = dataset.cache()
    return dataset


def _batch_seeds(seed, input_context):
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    return tf.data.Dataset.random(seed=seed * 1009 + pipeline_id,
                                  rerandomize_each_iteration=True).batch(2)


def pretrain_dataset(manifest, *, batch_size, seed=0, split="train", input_context=None,
                     strong_key=False, blur=False, crop_scale=(0.2, 1.0), flip=True,
                     shuffle_buffer=10_000, cache=True, limit=None):
    """Two-view batches for ``ASCLModel.fit``.

    Args:
      manifest: from ``pipeline.prepared_dataset.load_manifest``.
      batch_size: the *global* batch size; each input pipeline batches
        ``input_context.get_per_replica_batch_size(batch_size)``.
      seed: base seed of shuffling and augmentation.
      split: which split to train on.
      input_context: a ``tf.distribute.InputContext`` under
        ``distribute_datasets_from_function``.
      strong_key: give the key the strong view too (the paper's ablation).
      blur: add Gaussian blur to the strong view.
      crop_scale: area range of the random resized crops.
      flip: random horizontal flips in both views.
      shuffle_buffer: examples in the shuffle buffer.
      cache: keep decoded images in memory when they fit (4 GiB).
      limit: use only the first ``limit`` examples (quick runs, benchmarks).
    """
    per_replica = input_context.get_per_replica_batch_size(batch_size) if input_context else batch_size
    size = manifest["image_shape"][0]
    normalize = normalizer(manifest)
    pipeline_id = input_context.input_pipeline_id if input_context else 0

    def views(batch, batch_seed):
        images, labels = batch
        images = tf.cast(images, tf.float32) / 255.0
        strong_seed, weak_seed = tf.unstack(tf.random.experimental.stateless_split(batch_seed, 2))
        strong = augment.strong_view(images, strong_seed, size=size, blur=blur, scale=crop_scale,
                                     flip=flip)
        if strong_key:
            weak = augment.strong_view(images, weak_seed, size=size, blur=blur, scale=crop_scale,
                                       flip=flip)
        else:
            weak = augment.weak_view(images, weak_seed, size=size, scale=crop_scale, flip=flip)
        return {"strong_view": normalize(strong), "weak_view": normalize(weak), "label": labels}

    images = _images(manifest, split, input_context=input_context, cache=cache, limit=limit)
    # Keras keeps one iterator across epochs when steps_per_epoch is set, so the
    # data repeats; each pass is reshuffled and has exactly N // batch batches.
    batches = (images
               .shuffle(shuffle_buffer, seed=seed * 1009 + pipeline_id, reshuffle_each_iteration=True)
               .batch(per_replica, drop_remainder=True)
               .repeat())
    return (tf.data.Dataset.zip(batches, _batch_seeds(seed, input_context))
            .map(views, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def eval_dataset(manifest, split, *, batch_size, cache=True, limit=None):
    """Centre views (the stored image, normalised) and labels, in a fixed order."""
    normalize = normalizer(manifest)
    return (_images(manifest, split, cache=cache, limit=limit)
            .batch(batch_size)
            .map(lambda images, labels: (normalize(tf.cast(images, tf.float32) / 255.0), labels),
                 num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def probe_train_dataset(manifest, split, *, batch_size, seed=0, cache=True, shuffle_buffer=10_000,
                        limit=None):
    """Linear-probe training input: padded random crop + flip, shuffled, normalised."""
    normalize = normalizer(manifest)
    padding = max(1, manifest["image_shape"][0] // 8)

    def view(batch, batch_seed):
        images, labels = batch
        images = tf.cast(images, tf.float32) / 255.0
        return normalize(augment.padded_crop_and_flip(images, batch_seed, padding=padding)), labels

    batches = (_images(manifest, split, cache=cache, limit=limit)
               .shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
               .batch(batch_size))
    return (tf.data.Dataset.zip(batches, _batch_seeds(seed, None))
            .map(view, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))
