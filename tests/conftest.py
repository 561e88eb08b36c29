"""Test set-up shared by the whole suite.

Two logical CPU devices are configured before anything initialises
TensorFlow, so distributed code runs under ``MirroredStrategy`` on this
2-core, GPU-less machine exactly as it would over two accelerators.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def two_replicas():
    """One ``MirroredStrategy`` over the two logical CPU devices, for the whole run.

    Several strategy objects in one process can hand out clashing collective
    instance keys (seen as "Shape mismatch in the collective instance" when
    a second model trains), so the suite shares one, as a program would.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends in float32, whatever the previous one set."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="session")
def digits16(tmp_path_factory):
    """The Beam job's output for scikit-learn digits resized to 16x16; returns its manifest."""
    from beam_jobs.prepare import run as prepare
    from pipeline.prepared_dataset import load_manifest

    output = tmp_path_factory.mktemp("digits16") / "data"
    prepare(["--source", "digits", "--image-size", "16", "--output", str(output)])
    return load_manifest(str(output))


@pytest.fixture(scope="session")
def exported(digits16, tmp_path_factory):
    """A one-epoch run on the digits, exported: ``(run_dir, saved_models_dir, version_dir)``."""
    from pipeline.export import export_run
    from pipeline.train import train
    from tests.small_runs import small_config

    root = tmp_path_factory.mktemp("export")
    run_dir = str(root / "run")
    train(small_config(digits16, "train.epochs=1", "train.knn_every=0", "train.view_images=0"),
          run_dir)
    base = str(root / "saved_models")
    return run_dir, base, export_run(run_dir, name="digits", checkpoint="last", base_dir=base)
