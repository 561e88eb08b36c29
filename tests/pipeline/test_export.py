"""SavedModel export: loads without the project, signatures, errors, warm-up, versions."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from pipeline.export import export_run
from pipeline.run_dir import load_trained_model
from tests.serving import (
    saved_variable_shapes,
    saved_variable_sizes,
    serve_in_a_clean_process,
    weight_sizes,
    weight_sources,
)


def _png_batch(digits16, count=5):
    from pipeline.prepared_dataset import read_split

    images = np.stack([image for image, _ in read_split(digits16, "test").take(count)
                       .as_numpy_iterator()])
    return images, [tf.io.encode_png(image).numpy() for image in images]


def _expected(run_dir, images):
    model, _, manifest = load_trained_model(run_dir, "last")
    stats = manifest["train_statistics"]
    x = (images.astype(np.float32) - np.array(stats["mean"])) / np.array(stats["std"])
    features = model.backbone(x.astype(np.float32), training=False).numpy()
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def test_layout_versions_and_models_config(exported):
    run_dir, base, path = exported
    assert path == os.path.join(base, "digits", "1")
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert os.path.exists(os.path.join(path, "assets.extra", "tf_serving_warmup_requests"))
    assert not [n for n in os.listdir(os.path.join(base, "digits")) if n.startswith(".")]
    second = export_run(run_dir, name="digits", checkpoint="last", base_dir=base)
    assert second == os.path.join(base, "digits", "2")
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_run(run_dir, name="digits", checkpoint="last", base_dir=base, version=1)
    config = open(os.path.join(base, "models.config")).read()
    assert 'name: "digits"' in config and os.path.abspath(os.path.join(base, "digits")) in config


def test_fresh_process_without_the_project_matches_in_process_embeddings(exported, digits16,
                                                                          tmp_path):
    run_dir, _, path = exported
    images, pngs = _png_batch(digits16)
    served = serve_in_a_clean_process(path, pngs, tmp_path)
    np.testing.assert_allclose(served["embedding"], _expected(run_dir, images), atol=1e-5)
    projection = served["projection"]
    model, _, manifest = load_trained_model(run_dir, "last")
    stats = manifest["train_statistics"]
    x = ((images.astype(np.float32) - np.array(stats["mean"])) / np.array(stats["std"]))
    expected = model.projector(model.backbone(x.astype(np.float32), training=False),
                               training=False).numpy()
    np.testing.assert_allclose(
        projection, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)


def test_embed_pixels_matches_and_bad_input_is_rejected(exported, digits16):
    run_dir, _, path = exported
    images, _ = _png_batch(digits16)
    model = tf.saved_model.load(path)
    embed = model.signatures["embed_pixels"]
    np.testing.assert_allclose(embed(images=tf.constant(images))["embedding"].numpy(),
                               _expected(run_dir, images), atol=1e-5)
    spec = embed.structured_input_signature[1]["images"]
    assert spec.shape.as_list() == [None, 16, 16, 3] and spec.dtype == tf.uint8
    with pytest.raises(tf.errors.InvalidArgumentError, match="shape \\[batch, 16, 16, 3\\]"):
        embed(images=tf.zeros([2, 16, 16], tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="shape \\[batch, 16, 16, 3\\]"):
        embed(images=tf.zeros([2, 8, 8, 3], tf.uint8))
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError), match="uint8"):
        embed(images=tf.zeros([2, 16, 16, 3], tf.float32))
    serve = model.signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError):
        serve(image_bytes=tf.constant([b"definitely not an image"]))
    # still works afterwards
    assert serve(image_bytes=tf.constant(_png_batch(digits16, 2)[1]))["embedding"].shape == (2, 128)


def test_off_size_images_get_the_same_pixels_in_preparation_and_serving(exported, tmp_path):
    """Train/serve skew: a non-square, off-size image is prepared by the Beam job and sent as
    bytes to serving_default; both must produce the same 16 px image (within 1 grey level)."""
    from PIL import Image

    from beam_jobs.dataset_format import load_manifest
    from beam_jobs.prepare import run as prepare
    from pipeline.prepared_dataset import read_split

    run_dir, _, path = exported
    rng = np.random.default_rng(3)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    photo = np.asarray(coarse.resize((70, 41), Image.BICUBIC))  # 41 x 70, not square
    (tmp_path / "raw" / "train" / "a").mkdir(parents=True)
    Image.fromarray(photo).save(tmp_path / "raw" / "train" / "a" / "0.png")
    prepare(["--source", f"folder:{tmp_path / 'raw'}", "--output", str(tmp_path / "prepared"),
             "--image-size", "16"])
    prepared = next(read_split(load_manifest(str(tmp_path / "prepared")), "train")
                    .as_numpy_iterator())[0]
    png = tf.io.encode_png(photo).numpy()
    served = tf.saved_model.load(path).signatures["serving_default"](image_bytes=tf.constant([png]))
    _, _, manifest = load_trained_model(run_dir, "last")
    stats = manifest["train_statistics"]
    model, _, _ = load_trained_model(run_dir, "last")
    features = model.backbone(((prepared[None].astype(np.float32) - np.array(stats["mean"]))
                               / np.array(stats["std"])).astype(np.float32), training=False)
    np.testing.assert_allclose(served["embedding"].numpy(),
                               tf.math.l2_normalize(features, axis=1).numpy(), atol=1e-4)
    from pipeline.export import _preprocess_bytes

    in_graph = _preprocess_bytes(tf.constant(png), 16).numpy().astype(int)
    assert np.abs(in_graph - prepared.astype(int)).max() <= 1
    # the policy: the centred 41 x 41 square, resized; not the whole image squeezed
    squeezed = np.asarray(Image.fromarray(photo).resize((16, 16), Image.BICUBIC), int)
    assert np.abs(squeezed - prepared.astype(int)).mean() > 5


def test_the_export_saves_each_weight_once(exported):
    """The backbone's and projector's weights, each once: a tracked layer would save two
    (``models.keras_workarounds.untracked_export_archive``)."""
    run_dir, _, path = exported
    model, _, _ = load_trained_model(run_dir, "last")
    assert saved_variable_sizes(path) == weight_sizes(model.backbone, model.projector)


def test_saved_model_cli_lists_both_signatures(exported):
    _, _, path = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run([cli, "show", "--dir", path, "--all"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-2000:]
    text = shown.stdout
    assert "signature_def['serving_default']" in text and "signature_def['embed_pixels']" in text
    assert "dtype: DT_STRING" in text and "dtype: DT_UINT8" in text
    assert "outputs['embedding']" in text and "outputs['projection']" in text
    assert "shape: (-1, 128)" in text


def test_warmup_requests_parse_and_run(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    _, _, path = exported
    model = tf.saved_model.load(path)
    records = list(tf.data.TFRecordDataset(
        os.path.join(path, "assets.extra", "tf_serving_warmup_requests")))
    assert len(records) == 2
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        batch = tf.make_ndarray(request.inputs["image_bytes"])
        out = model.signatures["serving_default"](image_bytes=tf.constant(batch.tolist()))
        assert out["embedding"].shape[0] == len(batch)


def test_bad_name_is_refused(exported):
    run_dir, base, _ = exported
    with pytest.raises(ValueError, match="--name"):
        export_run(run_dir, name="../escape", base_dir=base)


def test_export_defaults_to_last_and_records_it(exported, tmp_path):
    run_dir, _, _ = exported
    path = export_run(run_dir, name="digits", base_dir=str(tmp_path))
    info = json.load(open(os.path.join(path, "assets.extra", "ascl_export.json")))
    assert info["checkpoint"]["name"] == "last" and info["checkpoint"]["epoch"] == 1
    # that run had no kNN monitor, so no `best`: asking for it is a clear error
    with pytest.raises(FileNotFoundError, match="has no best checkpoint"):
        export_run(run_dir, name="digits", checkpoint="best", base_dir=str(tmp_path))


def test_version_zero_is_rejected_not_taken_as_next(exported, tmp_path):
    run_dir, _, _ = exported
    with pytest.raises(ValueError, match="--version must be >= 1, received 0"):
        export_run(run_dir, name="digits", version=0, base_dir=str(tmp_path))
    assert not (tmp_path / "digits").exists() or not os.listdir(tmp_path / "digits")


def test_a_bfloat16_export_computes_in_bfloat16_and_keeps_the_float32_embeddings(
        exported, digits16, tmp_path):
    """The same run exported with --precision bfloat16 (batch norm folded, kernels constants
    of the graph):
    outputs float32 and unit-norm,
    cosine >= 0.999 with the float32 export's on the real (digit) test images, the same
    weights digest (so a float32-embedded gallery is accepted), and precision recorded."""
    run_dir, _, float32_path = exported
    path = export_run(run_dir, name="digits_bf16", base_dir=str(tmp_path), precision="bfloat16")
    info = json.load(open(os.path.join(path, "assets.extra", "ascl_export.json")))
    float32_info = json.load(open(os.path.join(float32_path, "assets.extra",
                                               "ascl_export.json")))
    assert info["precision"] == "bfloat16" and float32_info["precision"] == "float32"
    assert info["weights_sha256"] == float32_info["weights_sha256"]
    _, pngs = _png_batch(digits16, count=64)
    request = tf.constant(pngs)
    reference = tf.saved_model.load(float32_path).signatures["serving_default"](
        image_bytes=request)
    model = tf.saved_model.load(path)
    outputs = model.signatures["serving_default"](image_bytes=request)
    for name in ("embedding", "projection"):
        assert outputs[name].dtype == tf.float32
        values = outputs[name].numpy()
        np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)
        cosine = np.sum(values * reference[name].numpy(), axis=1)
        assert cosine.min() >= 0.999, (name, cosine.min())
    graph = model.signatures["serving_default"].graph.as_graph_def()
    nodes = [node for function in graph.library.function for node in function.node_def]
    convolutions = [node for node in nodes if node.op == "Conv2D"]
    assert convolutions and all(node.attr["T"].type == tf.bfloat16.as_datatype_enum
                                for node in convolutions)
    # batch norm is folded into the convolutions: the only square roots left are the two
    # L2 normalisations of the outputs (a float32 batch norm adds one each)
    assert [node.op for node in nodes].count("Rsqrt") == 2
    # every convolution and matmul reads its kernel from a constant of the graph (so oneDNN
    # keeps its reordered filters), every bias from a variable (so grappler still fuses
    # convolution, bias and ReLU), and every op is stock TensorFlow
    from tensorflow.python.framework import op_def_registry

    sources = weight_sources(model.signatures["serving_default"])
    assert sources["kernels"] and set(sources["kernels"]) == {"Const"}, sources
    assert sources["biases"] and set(sources["biases"]) == {"ReadVariableOp"}, sources
    assert [op for op in {node.op for node in nodes} if op_def_registry.get(op) is None] == []
    # the kernels are stored once, as those constants: the saved variables are the biases
    # alone (1-d), not the kernels a second time (a tracked layer would save them too)
    saved = saved_variable_shapes(path)
    assert saved and all(len(shape) == 1 for shape in saved), saved
    with pytest.raises(ValueError, match="--precision must be one of"):
        export_run(run_dir, name="digits_x", base_dir=str(tmp_path), precision="float16")


def test_a_model_that_cannot_be_folded_is_rebuilt_in_bfloat16_unfolded(monkeypatch):
    """in_precision's fallback: when folding refuses the model (not functional), the
    architecture is rebuilt under the bfloat16 policy and the float32 weights copied in,
    with a warning, not an error."""
    import keras

    import pipeline.export as export
    from models import build_backbone, projection_head
    from models.batch_norm_folding import NotFunctional

    def refuse(model, dtype=None):
        raise NotFunctional("fold_batch_norm needs a functional model")

    def build():
        keras.utils.set_random_seed(0)
        backbone = build_backbone("small_cnn", input_shape=(16, 16, 3), norm="batch")
        return backbone, projection_head(backbone.feature_dim, hidden_dims=(32,), output_dim=8)

    backbone, projector = build()
    for layer in backbone.layers:  # weights unlike the rebuilt model's initial ones
        for weight in layer.weights:
            weight.assign(np.random.default_rng(len(weight.path)).uniform(
                0.5, 1.5, weight.shape).astype("float32"))
    monkeypatch.setattr(export, "fold_batch_norm", refuse)
    rebuilt = type("Rebuilt", (), {})
    with pytest.warns(UserWarning, match="batch norm unfolded"):
        half, half_projector = export.in_precision(
            backbone, projector, "bfloat16",
            rebuild=lambda: setattr(rebuilt, "backbone", build()[0]) or setattr(
                rebuilt, "projector", build()[1]) or rebuilt)
    assert export.compute_precision(half) == "bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"
    x = np.random.default_rng(1).normal(size=(4, 16, 16, 3)).astype("float32")
    expected = backbone(x, training=False).numpy()
    values = keras.ops.convert_to_numpy(keras.ops.cast(half(x, training=False), "float32"))
    cosine = np.sum(values * expected, 1) / np.linalg.norm(values, axis=1) / np.linalg.norm(
        expected, axis=1)
    assert cosine.min() >= 0.999
    with pytest.raises(NotFunctional):  # without a rebuild there is nothing to fall back on
        export.in_precision(backbone, projector, "bfloat16")
