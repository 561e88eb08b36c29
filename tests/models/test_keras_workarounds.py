"""The Keras bugs ``models.keras_workarounds`` works around are still there (the multi-worker
one is checked in ``test_multi_worker.py``, inside its cluster)."""

import keras
import numpy as np
import tensorflow as tf

from models.keras_workarounds import untracked_export_archive
from tests.serving import saved_variable_sizes


def _export(archive, layer, path):
    archive.add_endpoint("serve", lambda x: layer(x),
                         input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    archive.write_out(str(path), verbose=False)
    return saved_variable_sizes(path)


def test_the_untracked_archive_saves_each_weight_once_and_serves(tmp_path):
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    assert _export(untracked_export_archive(), layer, tmp_path / "untracked") == [3, 12]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    served = tf.saved_model.load(str(tmp_path / "untracked")).signatures["serve"]
    np.testing.assert_allclose(list(served(x=tf.constant(x)).values())[0], layer(x), atol=1e-6)


def test_keras_still_saves_tracked_layers_twice(tmp_path):
    """Fails once keras-team/keras#23553 is fixed: then ``untracked_export_archive`` can go
    (tracking the layers would cost nothing and give the revived export its ``variables``)."""
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    archive = keras.export.ExportArchive()
    archive.track(layer)
    assert _export(archive, layer, tmp_path / "tracked") == [3, 3, 12, 12], (
        "keras-team/keras#23553 looks fixed: delete untracked_export_archive")
