"""Catalogue backbones from a config, through the CLI, on the bundled digits: build with the
project's BN, two training steps, export, and serving from a clean process."""

import contextlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from pipeline.cli import main
from tests.serving import serve_in_a_clean_process, weight_sources

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CATALOGUE = {
    "applications": ["--set", "model.backbone=keras.applications.MobileNetV2",
                     "--set", "model.backbone_args={alpha: 0.35}"],
    "hub": ["--set", "model.backbone=keras_hub.ResNetBackbone",
            "--set", "model.backbone_args={input_conv_filters: [64], input_conv_kernel_sizes: [3],"
                     " stackwise_num_filters: [64, 32], stackwise_num_blocks: [1, 1],"
                     " stackwise_num_strides: [1, 2], block_type: basic_block}"],
}


@pytest.fixture(scope="module")
def digits32(tmp_path_factory):
    """The digits at 32 px: keras.applications networks take no smaller input."""
    from beam_jobs.dataset_format import load_manifest
    from beam_jobs.prepare import run as prepare

    output = tmp_path_factory.mktemp("digits32") / "data"
    prepare(["--source", "digits", "--image-size", "32", "--output", str(output)])
    return load_manifest(str(output))


@pytest.mark.parametrize("catalogue", sorted(CATALOGUE))
def test_a_catalogue_backbone_trains_exports_and_serves(catalogue, digits32, tmp_path):
    if catalogue == "hub":
        pytest.importorskip("keras_hub")
    from pipeline.run_dir import load_trained_model

    run_dir, exports = str(tmp_path / "run"), tmp_path / "exports"
    # MobileNetV2's ImageNet stem leaves 1x1 maps of 32 px images; this small ResNet does not
    stem_warning = (pytest.warns(UserWarning, match="px images to 1x1")
                    if catalogue == "applications" else contextlib.nullcontext())
    with stem_warning:
        assert main(["train", "--config", os.path.join(ROOT, "configs/digits_small.yaml"),
                     "--run-dir", run_dir, "--set", f"data.dataset={digits32['directory']}",
                     *CATALOGUE[catalogue], "--epochs", "1", "--set", "data.train_limit=256",
                     "--set", "train.knn_every=0", "--set", "train.view_images=0",
                     "--set", "train.verbose=0"]) == 0
    history = json.load(open(os.path.join(run_dir, "history.json")))
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    model, _, manifest = load_trained_model(run_dir, "last")
    kinds = {type(layer).__name__ for layer in model.backbone.layers}
    assert "SplitBatchNormalization" in kinds and "BatchNormalization" not in kinds
    # two steps: 256 images at batch 128
    assert round(history[0]["images_per_second"] * history[0]["epoch_seconds"]) == 256
    assert main(["export", "--run-dir", run_dir, "--name", catalogue,
                 "--base-dir", str(exports)]) == 0

    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    pngs = [tf.io.encode_png(image).numpy() for image in images]
    served = serve_in_a_clean_process(exports / catalogue / "1", pngs, tmp_path)
    stats = manifest["train_statistics"]
    x = ((images - np.array(stats["mean"])) / np.array(stats["std"])).astype(np.float32)
    features = model.backbone(x, training=False).numpy()
    np.testing.assert_allclose(served["embedding"],
                               features / np.linalg.norm(features, axis=1, keepdims=True),
                               atol=1e-4)
    # in bfloat16 too (its batch norm folded into the layers before it): the same directions
    assert main(["export", "--run-dir", run_dir, "--name", f"{catalogue}_bf16",
                 "--base-dir", str(exports), "--precision", "bfloat16"]) == 0
    signature = tf.saved_model.load(str(exports / f"{catalogue}_bf16" / "1")).signatures[
        "serving_default"]
    half = signature(image_bytes=tf.constant(pngs))["embedding"].numpy()
    assert np.sum(half * served["embedding"], axis=1).min() >= 0.999
    # its kernels (MobileNetV2's depthwise ones too) are constants of the graph
    assert set(weight_sources(signature)["kernels"]) == {"Const"}


@pytest.mark.parametrize("backbone, message", [
    ("keras.applications.NoSuchNet", "keras.applications has no 'NoSuchNet'"),
    ("keras.applications.MobileNetV2", "model.norm none would drop"),
])
def test_a_catalogue_choice_it_cannot_serve_is_a_user_error(backbone, message, digits32,
                                                            tmp_path, capsys):
    """The CLI's answer to a catalogue error is the message and exit 2, not a traceback."""
    assert main(["train", "--config", os.path.join(ROOT, "configs/digits_small.yaml"),
                 "--run-dir", str(tmp_path / "run"), "--set",
                 f"data.dataset={digits32['directory']}", "--set", f"model.backbone={backbone}",
                 "--set", "model.norm=none", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"model.backbone {backbone}" in err and message in err and "Traceback" not in err
