"""The one JSON writer: every JSON file the project writes appears whole or not at all.

A reader of a manifest, a run's ``best.json`` or a benchmark's results never sees half a
file, even when the writer is killed mid-write: the text goes to a temporary file beside the
target, which is then renamed over it (a rename within a folder is atomic on a local file
system; on an object store such as ``gs://`` the object appears only once it is complete).
``tf.io.gfile`` serves both (datasets and exports may live on ``gs://``; run folders are local).
"""

import json
import uuid

import tensorflow as tf


def write_json(path, value, *, indent=1, sort_keys=False):
    """Writes ``value`` as JSON to ``path``, atomically (replacing any file there)."""
    text = json.dumps(value, indent=indent, sort_keys=sort_keys)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"  # unique: two writers never share one
    try:
        with tf.io.gfile.GFile(temporary, "w") as handle:
            handle.write(text)
        tf.io.gfile.rename(temporary, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(temporary):
            tf.io.gfile.remove(temporary)


def read_json(path):
    """The value of the JSON file at ``path`` (local or any file system TensorFlow reads)."""
    with tf.io.gfile.GFile(path, "r") as handle:
        return json.load(handle)
