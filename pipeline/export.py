"""``ascl export``: a trained run's encoder as a SavedModel that TF Serving loads as it is.

Writes ``saved_models/NAME/VERSION/`` (the layout TF Serving polls) with two
signatures, built with Keras 3's ``keras.export.ExportArchive``:

* ``serving_default``: ``image_bytes`` (``tf.string [None]``, JPEG/PNG/GIF/BMP
  bytes; the ``_bytes`` suffix lets the REST API take ``{"b64": ...}``) ->
  ``embedding`` (``float32 [None, F]``, L2-normalised backbone features) and
  ``projection`` (``float32 [None, D]``, L2-normalised projector output).
  Decoding, resizing (``pipeline.image_policy``: the largest centred square,
  resized, exactly as the preparation job does it) and normalisation with the
  dataset's mean and std run in the graph.
* ``embed_pixels``: ``images`` (``uint8 [None, H, W, 3]``) -> the same outputs.

Only the query-side backbone and projector are exported, not the training
model with its queue and key encoder.  The export is written to a temporary
folder and renamed into place, so a server watching the folder never sees a
half-written version, and an existing version is never overwritten.  Warm-up
requests (``assets.extra/tf_serving_warmup_requests``), a description of the
expected input (``assets.extra/ascl_export.json``) and the server's
``models.config`` are written too.
"""

import json
import os
import re
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from pipeline.data import channel_statistics
from pipeline.image_policy import square_crop_and_resize
from pipeline.run_dir import checkpoint_info, load_trained_model

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
INFO_FILE = os.path.join("assets.extra", "ascl_export.json")


def _next_version(model_dir):
    versions = [int(name) for name in os.listdir(model_dir) if name.isdigit()] if os.path.isdir(
        model_dir) else []
    return max(versions, default=0) + 1


def _preprocess_bytes(image_bytes, size):
    """Decodes one image and brings it to the training size with the preparation's policy."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return square_crop_and_resize(image, size)


def build_export_archive(backbone, projector, manifest):
    """An ``ExportArchive`` with the ``serving_default`` and ``embed_pixels`` endpoints."""
    height, width, _ = manifest["image_shape"]
    mean, std = (tf.constant(value) for value in channel_statistics(manifest))

    def outputs(images):
        x = (tf.cast(images, tf.float32) - mean) / std
        features = tf.cast(backbone(x, training=False), tf.float32)
        projection = tf.cast(projector(features, training=False), tf.float32)
        return {"embedding": tf.math.l2_normalize(features, axis=1),
                "projection": tf.math.l2_normalize(projection, axis=1)}

    def serve_bytes(image_bytes):
        images = tf.map_fn(lambda b: _preprocess_bytes(b, height), image_bytes,
                           fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8))
        return outputs(images)

    def serve_pixels(images):
        # The signature declares [None, H, W, 3], but a loaded SavedModel (and TF Serving)
        # may still be fed another shape. Its static shape is the declared one, so rank and
        # dims checks would be folded away; the element count is only known at run time.
        well_formed = tf.equal(tf.size(images), tf.shape(images)[0] * height * width * 3)
        check = tf.debugging.Assert(well_formed, [
            f"embed_pixels expects uint8 images of shape [batch, {height}, {width}, 3]; "
            "received", tf.size(images), "values for a batch of", tf.shape(images)[0]])
        with tf.control_dependencies([check]):
            return outputs(tf.identity(images))

    archive = keras.export.ExportArchive()
    archive.track(backbone)
    archive.track(projector)
    archive.add_endpoint("serving_default", serve_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint("embed_pixels", serve_pixels,
                         input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8,
                                                        name="images")])
    return archive


def write_warmup_requests(export_dir, manifest, count=3):
    """A few ``PredictionLog`` records on ``serving_default`` (PNG images of the right size)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    height, width, _ = manifest["image_shape"]
    rng = np.random.default_rng(0)
    images = [tf.io.encode_png(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).numpy()
              for _ in range(count)]
    path = os.path.join(export_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for batch in (images[:1], images):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(signature_name="serving_default"))
            request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def write_models_config(base_dir):
    """``base_dir/models.config`` listing every exported model (TF Serving's --model_config_file)."""
    names = sorted(name for name in os.listdir(base_dir)
                   if os.path.isdir(os.path.join(base_dir, name)) and re.fullmatch(r"[\w.-]+", name)
                   and any(v.isdigit() for v in os.listdir(os.path.join(base_dir, name))))
    lines = ["model_config_list {"]
    for name in names:
        lines += ["  config {", f'    name: "{name}"',
                  f'    base_path: "{os.path.abspath(os.path.join(base_dir, name))}"',
                  '    model_platform: "tensorflow"', "  }"]
    lines.append("}")
    path = os.path.join(base_dir, "models.config")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def write_export(backbone, projector, manifest, final, *, provenance=None):
    """Writes the SavedModel for ``backbone`` + ``projector`` at ``final``, atomically."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        build_export_archive(backbone, projector, manifest).write_out(staging, verbose=False)
        write_warmup_requests(staging, manifest)
        with open(os.path.join(staging, INFO_FILE), "w") as handle:
            json.dump({"image_shape": manifest["image_shape"],
                       "class_names": manifest["class_names"],
                       "train_statistics": manifest["train_statistics"],
                       "signatures": ["serving_default", "embed_pixels"],
                       **(provenance or {})}, handle, indent=2)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def export_run(run_dir, *, name, checkpoint="last", version=None, base_dir="saved_models"):
    """Exports a run's encoder to ``base_dir/name/version``; returns that path."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise ValueError(f"--name must be letters, digits, '.', '_' or '-', received {name!r}")
    if version is not None and version < 1:
        raise ValueError(f"--version must be >= 1, received {version}")
    model, _, manifest = load_trained_model(run_dir, checkpoint)
    model_dir = os.path.join(base_dir, name)
    if version is None:
        version = _next_version(model_dir)
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"{final} already exists; versions are never overwritten "
                              f"(omit --version to take the next one)")
    write_export(model.backbone, model.projector, manifest, final,
                 provenance={"run_dir": os.path.abspath(run_dir),
                             "checkpoint": checkpoint_info(run_dir, checkpoint)})
    write_models_config(base_dir)
    return final
