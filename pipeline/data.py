"""``tf.data`` input for training and evaluation, from a prepared dataset.

Pre-training elements are dicts ``{"strong_view", "weak_view", "label"}`` of
normalised float32 ``[B, S, S, 3]`` views (``ASCLModel.fit`` ignores the
label).  The chain: read shards (parallel interleave; file order reshuffled
every epoch, which matters when the split is not cached: a cache replays the
first epoch's order) -> decode -> [keep a hash-chosen part: ``pipeline.splits``] -> [an input
pipeline's share under a strategy: by file when there are enough shards, else by
element; ``_images``]
-> cache the decoded uint8 images in memory when they fit -> shuffle (the
whole split when cached, every epoch) -> batch (dropping the remainder) -> two
views per image, vectorised per batch -> normalise with the manifest's mean
and std -> prefetch.

Each batch gets its own stateless seed from ``tf.data.Dataset.random`` seeded
by ``seed`` and the input pipeline id and re-randomised every epoch, so every
replica and every epoch draws different augmentations from one seed.
"""

import numpy as np
import tensorflow as tf

from beam_jobs.dataset_format import DatasetError, split_shards
from pipeline import augment, splits
from pipeline.prepared_dataset import read_split

CACHE_LIMIT_BYTES = 4 * 2 ** 30


def channel_statistics(manifest):
    """Per-channel ``(mean, std)`` of the train split in pixel units (0-255), as float32 arrays.

    The std is floored at 0.255 (1e-3 in [0, 1] units): a constant channel must not
    divide by zero.  Training, the TensorBoard previews and the export all use these.
    """
    stats = manifest["train_statistics"]
    if not stats:
        raise DatasetError(
            f"the dataset at {manifest.get('directory')} has no 'train' split (it has "
            f"{sorted(manifest['splits'])}), so it has no channel statistics to normalise with; "
            f"prepare it with a train/ folder, or with --test-fraction to split a class folder")
    return (np.asarray(stats["mean"], np.float32),
            np.maximum(np.asarray(stats["std"], np.float32), np.float32(0.255)))


def normalizer(manifest):
    """A function mapping float images in [0, 1] to the manifest's standardised units."""
    mean, std = channel_statistics(manifest)
    mean, std = tf.constant(mean / 255.0), tf.constant(std / 255.0)
    return lambda images: (images - mean) / std


def _images(manifest, selection, *, input_context=None, cache=True, shuffle_files_seed=None):
    """``(image, label)`` of a split or ``Selection``, and how many one input pipeline gets.

    Under a strategy with several input pipelines (one per worker), the split is sharded
    **by file** when its non-empty shards can be dealt out evenly (``_file_shares``):
    pipeline ``i`` of ``P`` reads shards ``i, i + P, ...`` only.  Otherwise it is sharded
    **by element**: every pipeline reads every file, in the same order, and keeps every
    ``P``-th example.  Sharded by file, pipelines hold nearly, not exactly, equal shares; an
    epoch is counted on the global total, so a pipeline with a few examples fewer starts its
    next pass a few batches early.
    """
    selection = splits.as_selection(selection)
    low, high, count = selection.bounds(manifest)
    pipelines = input_context.num_input_pipelines if input_context else 1
    shares = _file_shares(split_shards(manifest, selection.split), pipelines)
    by_file = shares is not None
    files = None
    if by_file:
        shards = shares[input_context.input_pipeline_id]
        files = [path for path, _ in shards]
        count = selection.count_in(manifest, shards)
    dataset = read_split(manifest, selection.split, with_ids=low is not None,
                         shuffle_files_seed=shuffle_files_seed, files=files)
    if low is not None:
        def in_part(image, label, example_id):
            hashed = splits.selection_hash(example_id)
            return tf.logical_and(hashed > low, hashed <= high)

        dataset = dataset.filter(in_part).map(lambda image, label, example_id: (image, label))
    # The count is known: tell tf.data, so Keras shows complete progress bars.
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(count))
    if pipelines > 1 and not by_file:
        # By element: every pipeline reads the files in the same order (same seed).
        dataset = dataset.shard(pipelines, input_context.input_pipeline_id)
        count = -(-count // pipelines)
    height, width, channels = manifest["image_shape"]
    cached = cache and count * height * width * channels <= CACHE_LIMIT_BYTES
    if cached:
        dataset = dataset.cache()
    return dataset, count, cached


FILE_SHARE_TOLERANCE = 0.1


def _replicas_per_pipeline(input_context):
    """How many replicas one input pipeline feeds: one batch each per training step."""
    if input_context is None:
        return 1
    return max(1, input_context.num_replicas_in_sync // input_context.num_input_pipelines)


def _file_shares(shards, pipelines):
    """Each pipeline's ``[(path, num_examples)]`` when dealing the shards out round robin
    gives every pipeline at least one shard and shares within 10% of each other, else None
    (then the split is sharded by element).  16 shards over 9 workers would give 7 of them
    two shards and 2 of them one: those two would see their examples twice as often."""
    if pipelines < 2 or len(shards) < pipelines:
        return None
    shares = [shards[index::pipelines] for index in range(pipelines)]
    sizes = [sum(count for _, count in share) for share in shares]
    return shares if min(sizes) >= (1 - FILE_SHARE_TOLERANCE) * max(sizes) else None


def shuffle_buffer_size(requested, examples, cached):
    """A cached split is shuffled whole every epoch, as the reference's sampler does:
    a smaller buffer over a stream in storage order cannot mix it."""
    return max(requested, examples) if cached else requested


def _batch_seeds(seed, input_context):
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    return tf.data.Dataset.random(seed=seed * 1009 + pipeline_id,
                                  rerandomize_each_iteration=True).batch(2)


def pretrain_dataset(manifest, *, batch_size, seed=0, split="train", input_context=None,
                     strong_key=False, blur=True, crop_scale=(0.2, 1.0), flip=True,
                     shuffle_buffer=10_000, cache=True, skip_steps=0):
    """Two-view batches for ``ASCLModel.fit``.

    Args:
      manifest: from ``beam_jobs.dataset_format.load_manifest``.
      batch_size: the *global* batch size; each input pipeline batches
        ``input_context.get_per_replica_batch_size(batch_size)``.
      seed: base seed of shuffling and augmentation.
      split: which split to train on: a name, or a ``splits.Selection`` (a
        split without its validation hold-out, a limited sample).
      input_context: a ``tf.distribute.InputContext`` under
        ``distribute_datasets_from_function``.
      strong_key: give the key the strong view too (the paper's ablation).
      blur: add Gaussian blur to the strong view.
      crop_scale: area range of the random resized crops.
      flip: random horizontal flips in both views.
      shuffle_buffer: examples in the shuffle buffer when the split is not
        cached; a cached split is shuffled whole every epoch.
      cache: keep decoded images in memory when they fit (4 GiB).
      skip_steps: training steps a resumed run has already taken (epochs done x
        steps per epoch).  A step takes one batch from this pipeline for every replica it
        feeds (round robin over a worker's devices), so that many batches times the
        replicas per pipeline are drawn and dropped before any view is computed, and the
        run continues with exactly the batches and augmentation seeds an uninterrupted run
        would see next.

    The order: a cached split (per input pipeline) is shuffled whole, anew every
    epoch; a split too large to cache is read in a file order reshuffled every
    epoch (one seed for every input pipeline, so element-wise sharding stays a
    partition) through a ``shuffle_buffer`` of examples.
    """
    per_replica = (input_context.get_per_replica_batch_size(batch_size) if input_context
                   else batch_size)
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

    images, count, cached = _images(manifest, split, input_context=input_context, cache=cache,
                                    shuffle_files_seed=seed)
    # Keras keeps one iterator across epochs when steps_per_epoch is set, so the
    # data repeats; each pass is reshuffled and has exactly N // batch batches.
    batches = (images
               .shuffle(shuffle_buffer_size(shuffle_buffer, count, cached),
                        seed=seed * 1009 + pipeline_id, reshuffle_each_iteration=True)
               .batch(per_replica, drop_remainder=True)
               .repeat())
    return (tf.data.Dataset.zip(batches, _batch_seeds(seed, input_context))
            .skip(skip_steps * _replicas_per_pipeline(input_context))
            .map(views, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def eval_dataset(manifest, split, *, batch_size, cache=True):
    """Centre views (the stored image, normalised) and labels of a split or
    ``Selection``, in a fixed order."""
    normalize = normalizer(manifest)
    images, _, _ = _images(manifest, split, cache=cache)
    return (images
            .batch(batch_size)
            .map(lambda images, labels: (normalize(tf.cast(images, tf.float32) / 255.0), labels),
                 num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def probe_train_dataset(manifest, split, *, batch_size, seed=0, cache=True, shuffle_buffer=10_000,
                        crop_scale=(0.08, 1.0)):
    """Linear-probe training input as in the reference: ``RandomResizedCrop(crop_scale)`` +
    flip on the fly, reshuffled every epoch (whole split when cached), normalised."""
    normalize = normalizer(manifest)
    size = manifest["image_shape"][0]

    def view(batch, batch_seed):
        images, labels = batch
        images = tf.cast(images, tf.float32) / 255.0
        return normalize(augment.weak_view(images, batch_seed, size=size, scale=crop_scale)), labels

    images, count, cached = _images(manifest, split, cache=cache, shuffle_files_seed=seed)
    batches = (images
               .shuffle(shuffle_buffer_size(shuffle_buffer, count, cached), seed=seed,
                        reshuffle_each_iteration=True)
               .batch(batch_size))
    return (tf.data.Dataset.zip(batches, _batch_seeds(seed, None))
            .map(view, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))
