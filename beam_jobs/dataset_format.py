"""The prepared-dataset format: what ``beam_jobs.prepare`` writes and training reads.

A prepared dataset is a folder holding:

* ``<split>-00000-of-000NN.tfrecord`` (``shard_file_name``): ``tf.train.Example``
  records (``FEATURES``) with the PNG-encoded image, label index (-1 if
  unlabelled), class name, a stable id and the source path.  An example's shard
  is a hash of its id, and inside a shard examples are ordered by a keyed hash
  of the id (``beam_jobs.prepare.order_key``): an order that is deterministic,
  so the same input always gives byte-identical shards, and independent of the
  class (ids begin with the class folder, so sorting by id would write
  class-sorted shards).
* ``dead_letters-00000-of-00001.jsonl`` (``DEAD_LETTERS_NAME``): one JSON line
  per rejected input, with its path and reason.
* ``manifest.json`` (``MANIFEST_NAME``), **last**: format version, source,
  creation time, image shape, class names, per-split counts and shard files
  (size, sha256), the train split's per-channel mean and std (0-255) and the
  dead-letter count.  A folder without a manifest is never a dataset.

``load_manifest`` refuses anything that is not a finished, intact dataset (no
manifest, unknown format, a listed shard missing or of the wrong size);
``encode_example`` writes a record, ``parse_example`` (Python values) and
``decode_example`` (TensorFlow, for ``tf.data``) read one.  Every image in a
dataset is made to size by ``square_crop_and_resize``, the one resize policy.
Paths may be local or any filesystem TensorFlow reads (``gs://``, ...).

No Beam and no Keras here: the preparation job, training, batch embedding and
the serving graph all read the format through this module.
"""

import json
import posixpath
import re

import tensorflow as tf
from tensorflow.core.example import example_pb2

from beam_jobs.errors import InputError

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
DEAD_LETTER_PREFIX = "dead_letters"
DEAD_LETTERS_NAME = f"{DEAD_LETTER_PREFIX}-00000-of-00001.jsonl"
SHARD_FILE_PATTERN = re.compile(r"^[A-Za-z0-9_]+-\d{5}-of-\d{5}\.tfrecord$")

# The features of one record, as ``tf.io.parse_single_example`` reads them.
FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),  # PNG
    "image/format": tf.io.FixedLenFeature([], tf.string),  # b"png"
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/channels": tf.io.FixedLenFeature([], tf.int64),
    "label": tf.io.FixedLenFeature([], tf.int64),  # index in class_names, -1 if unlabelled
    "class_name": tf.io.FixedLenFeature([], tf.string),
    "id": tf.io.FixedLenFeature([], tf.string),
    "source_path": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "split": tf.io.FixedLenFeature([], tf.string),
}
_DECODED = ("image/encoded", "label", "id")  # what training reads of a record
_VALUE_LISTS = {tf.string: "bytes_list", tf.int64: "int64_list"}


class DatasetError(InputError):
    """A prepared dataset that is missing, unfinished or damaged; the message says how."""


def shard_file_name(split, index, count):
    """The name of shard ``index`` of the ``count`` shards of ``split``."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def shard_file_glob(split):
    """A glob matching every shard file name of ``split``."""
    return f"{split}-*-of-*.tfrecord"


def is_dataset_file(name):
    """Whether a file name is one of a dataset's files other than its manifest (a shard or
    the dead letters)."""
    return bool(SHARD_FILE_PATTERN.match(name)) or name.startswith(DEAD_LETTER_PREFIX + "-")


def encode_example(*, png, shape, label, class_name, example_id, source_path, split):
    """A serialised ``tf.train.Example`` of ``FEATURES`` (deterministic bytes)."""
    values = {
        "image/encoded": png, "image/format": b"png", "image/height": shape[0],
        "image/width": shape[1], "image/channels": shape[2], "label": label,
        "class_name": class_name.encode("utf-8"), "id": example_id.encode("utf-8"),
        "source_path": source_path.encode("utf-8"), "split": split.encode("utf-8")}
    example = example_pb2.Example()
    for name, spec in FEATURES.items():
        getattr(example.features.feature[name], _VALUE_LISTS[spec.dtype]).value.append(
            values[name])
    return example.SerializeToString(deterministic=True)


def parse_example(serialized):
    """``{feature name: bytes or int}`` of one serialised Example, without TensorFlow ops:
    what ``tf.io.parse_single_example(serialized, FEATURES)`` gives, as Python values.

    Raises:
      DatasetError: a feature without a default is missing, or one holds other than
        exactly one value.
    """
    stored = example_pb2.Example.FromString(serialized).features.feature
    features = {}
    for name, spec in FEATURES.items():
        if name not in stored:
            if spec.default_value is None:
                raise DatasetError(f"the example has no feature {name!r} (expected "
                                   f"{sorted(FEATURES)})")
            features[name] = spec.default_value
            continue
        values = getattr(stored[name], _VALUE_LISTS[spec.dtype]).value
        if len(values) != 1:
            raise DatasetError(f"feature {name!r} of the example holds {len(values)} values "
                               f"(expected 1 {spec.dtype.name})")
        features[name] = values[0]
    return features


def decode_example(serialized, image_shape, *, with_id=False):
    """``(image uint8 [H, W, 3], label int64[, id string])`` from one serialised Example."""
    features = tf.io.parse_single_example(serialized, {name: FEATURES[name] for name in _DECODED})
    image = tf.io.decode_png(features["image/encoded"], channels=3)
    image = tf.ensure_shape(image, image_shape)
    if with_id:
        return image, features["label"], features["id"]
    return image, features["label"]


def _join(directory, name):
    if "://" in directory:
        return posixpath.join(directory, name)
    return f"{directory.rstrip('/')}/{name}"


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


def square_crop_and_resize(image, size=None):
    """``uint8 [H, W, 3]`` -> ``uint8 [S, S, 3]``: the largest centred square, resized to
    ``size`` (``None``: the square as it is, ``S = min(H, W)``).

    The one resize-and-crop policy for stored images, wherever an image is made to size:
    preparation (``beam_jobs``), batch embedding and the serving graph
    (``pipeline.export``) all call it, so an image that is not at the training size gets
    the same pixels at training and at serving time:

    1. centre-crop the largest square (a non-square image loses the ends of its
       longer side, never its aspect ratio);
    2. resize that square to ``size`` x ``size``, bicubic, antialiased when it
       shrinks, rounded to 8 bits.

    An image already at ``size`` x ``size`` is returned unchanged.  It is written
    in TensorFlow so that the serving graph can run it; preparation calls it
    eagerly, and only for images that are not at the size already.
    """
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
