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
