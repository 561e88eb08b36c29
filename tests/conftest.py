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
    from beam_jobs.dataset_format import load_manifest
    from beam_jobs.prepare import run as prepare

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


CLASS_FOLDERS = 10
IMAGES_PER_CLASS = 60


@pytest.fixture(scope="session")
def class_foldered(tmp_path_factory):
    """A ``train/<class>/<n>.png`` tree of 10 classes x 60 distinct 8 px images, prepared by
    the Beam job into 2 shards per split; returns the manifest.  Ids begin with the class
    folder, as in any class-foldered dataset (CIFAR-10's JPEG tree included)."""
    import numpy as np
    from PIL import Image

    from beam_jobs.dataset_format import load_manifest
    from beam_jobs.prepare import run as prepare

    root = tmp_path_factory.mktemp("class_tree")
    rng = np.random.default_rng(0)
    for split, count in (("train", IMAGES_PER_CLASS), ("test", 5)):
        for label in range(CLASS_FOLDERS):
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    output = tmp_path_factory.mktemp("class_prepared") / "data"
    prepare(["--source", f"folder:{root}", "--output", str(output), "--num-shards", "2"])
    return load_manifest(str(output))


@pytest.fixture(scope="session")
def class_sorted(class_foldered, tmp_path_factory):
    """The same dataset with every shard rewritten in id order, i.e. class-sorted, as the
    Beam job wrote shards before it ordered them by a keyed hash."""
    import hashlib
    import json
    import shutil

    from beam_jobs.dataset_format import load_manifest

    output = tmp_path_factory.mktemp("class_sorted") / "data"
    shutil.copytree(class_foldered["directory"], output)
    manifest = json.loads((output / "manifest.json").read_text())
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            path = output / shard["file"]
            records = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
            ids = [tf.train.Example.FromString(r).features.feature["id"].bytes_list.value[0]
                   for r in records]
            with tf.io.TFRecordWriter(str(path)) as writer:
                for _, record in sorted(zip(ids, records)):
                    writer.write(record)
            shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            shard["size_bytes"] = path.stat().st_size
    (output / "manifest.json").write_text(json.dumps(manifest))
    return load_manifest(str(output))
