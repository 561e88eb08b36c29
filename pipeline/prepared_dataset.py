"""Reading a dataset written by ``beam_jobs.prepare``: the manifest is the contract.

``load_manifest`` refuses anything that is not a finished, intact dataset
(no manifest, unknown format, a listed shard missing or of the wrong size);
``read_split`` yields ``(image uint8 [H, W, 3], label int64)`` (and the
example's id on request) through ``tf.data`` with a parallel interleave over
the shards, optionally in a file order reshuffled on every pass.  Paths may be local or
any filesystem TensorFlow reads (``gs://``, ...).
"""

import json
import posixpath

import tensorflow as tf

MANIFEST_NAME = "manifest.json"
SUPPORTED_FORMAT_VERSIONS = (1,)
_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "id": tf.io.FixedLenFeature([], tf.string),
}


class DatasetError(ValueError):
    """A prepared dataset that is missing, unfinished or damaged; the message says how."""


def _join(directory, name):
    return posixpath.join(directory, name) if "://" in directory else f"{directory.rstrip('/')}/{name}"


def load_manifest(directory, *, verify_shards=True):
    """The manifest of the prepared dataset in ``directory``, after checking its shards.

    Raises:
      DatasetError: no manifest (not a dataset, or an unfinished preparation),
        unreadable JSON, an unsupported format version, or a listed shard that
        is missing or whose size differs from the recorded one.
    """
    path = _join(directory, MANIFEST_NAME)
    if not tf.io.gfile.exists(path):
        raise DatasetError(
            f"{directory} is not a prepared dataset: {path} does not exist (prepare it with "
            f"`ascl prepare --output {directory}`; a preparation that did not finish writes "
            f"no manifest)")
    try:
        with tf.io.gfile.GFile(path, "r") as handle:
            manifest = json.load(handle)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from error
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise DatasetError(f"{path}: unsupported format_version {version!r} "
                           f"(expected one of {SUPPORTED_FORMAT_VERSIONS})")
    for key in ("image_shape", "class_names", "splits", "train_statistics"):
        if key not in manifest:
            raise DatasetError(f"{path}: missing field {key!r}")
    manifest["directory"] = directory
    if verify_shards:
        for split, info in manifest["splits"].items():
            for shard in info["shards"]:
                shard_path = _join(directory, shard["file"])
                if not tf.io.gfile.exists(shard_path):
                    raise DatasetError(f"shard {shard_path} of split {split!r} listed in the "
                                       f"manifest is missing")
                size = tf.io.gfile.stat(shard_path).length
                if size != shard["size_bytes"]:
                    raise DatasetError(f"shard {shard_path} has {size} bytes but the manifest "
                                       f"records {shard['size_bytes']}: the dataset is damaged")
    return manifest


def split_shards(manifest, split):
    """``[(path, num_examples)]`` of the non-empty shards of ``split``, in manifest order."""
    if split not in manifest["splits"]:
        raise DatasetError(f"split {split!r} is not in the dataset at {manifest['directory']} "
                           f"(it has {sorted(manifest['splits'])})")
    return [(_join(manifest["directory"], shard["file"]), shard["num_examples"])
            for shard in manifest["splits"][split]["shards"] if shard["num_examples"] > 0]


def split_files(manifest, split):
    """Paths of the non-empty shards of ``split``."""
    return [path for path, _ in split_shards(manifest, split)]


def decode_example(serialized, image_shape, *, with_id=False):
    """``(image uint8 [H, W, 3], label int64[, id string])`` from one serialised Example."""
    features = tf.io.parse_single_example(serialized, _FEATURES)
    image = tf.io.decode_png(features["image/encoded"], channels=3)
    image = tf.ensure_shape(image, image_shape)
    if with_id:
        return image, features["label"], features["id"]
    return image, features["label"]


def read_ids(manifest, split, files=None):
    """A ``tf.data.Dataset`` of the example ids of ``split`` (or of those of its shard
    ``files``), without decoding any image."""
    spec = {"id": _FEATURES["id"]}
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
