"""``tf.data`` readers of a dataset written by ``beam_jobs.prepare``.

The format, its manifest and its checks are ``beam_jobs.dataset_format``'s;
``read_split`` yields ``(image uint8 [H, W, 3], label int64)`` (and the
example's id on request) through ``tf.data`` with a parallel interleave over
the shards, optionally in a file order reshuffled on every pass.  Paths may be local or
any filesystem TensorFlow reads (``gs://``, ...).
"""

import tensorflow as tf

from beam_jobs.dataset_format import (
    FEATURES,
    DatasetError,
    decode_example,
    load_manifest,
    split_files,
)


def read_ids(manifest, split, files=None):
    """A ``tf.data.Dataset`` of the example ids of ``split`` (or of those of its shard
    ``files``), without decoding any image."""
    spec = {"id": FEATURES["id"]}
    return (tf.data.TFRecordDataset(files if files is not None else split_files(manifest, split))
            .map(lambda record: tf.io.parse_single_example(record, spec)["id"],
                 num_parallel_calls=tf.data.AUTOTUNE))


def read_split(manifest_or_directory, split, *, deterministic=True, with_ids=False,
               shuffle_files_seed=None, files=None):
    """A ``tf.data.Dataset`` of ``(image, label[, id])`` for one split of a prepared dataset.

    With ``shuffle_files_seed`` the order of the shard files is reshuffled on
    every pass over the dataset (every epoch under ``repeat``), from that seed:
    two readers given the same seed read the files in the same order, which
    element-wise sharding across input pipelines relies on.  ``files``: read only
    these shards of the split (an input pipeline's share when sharding by file).
    """
    manifest = manifest_or_directory
    if not isinstance(manifest, dict):
        manifest = load_manifest(manifest_or_directory)
    elif "directory" not in manifest:
        raise DatasetError("read_split needs the manifest returned by load_manifest(directory)")
    paths = list(files) if files is not None else split_files(manifest, split)
    image_shape = list(manifest["image_shape"])
    files = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
    if shuffle_files_seed is not None:
        files = files.shuffle(len(paths), seed=shuffle_files_seed, reshuffle_each_iteration=True)
    dataset = files.interleave(
        tf.data.TFRecordDataset, cycle_length=max(1, min(len(paths), 8)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    return dataset.map(lambda record: decode_example(record, image_shape, with_id=with_ids),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
