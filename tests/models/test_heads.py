"""The projection head."""

import numpy as np
import pytest

from models.heads import projection_head


def test_reference_widths():
    head = projection_head(512)
    assert head.output_shape == (None, 128)
    assert [layer.units for layer in head.layers if hasattr(layer, "units")] == [2048, 128]


def test_configurable_widths_and_normalisation():
    head = projection_head(16, hidden_dims=(32, 24), output_dim=8, norm="split", bn_splits=2)
    assert [layer.units for layer in head.layers if hasattr(layer, "units")] == [32, 24, 8]
    assert sum(type(layer).__name__ == "SplitBatchNormalization" for layer in head.layers) == 2
    assert head(np.zeros((4, 16), "float32"), training=True).shape == (4, 8)


def test_invalid_output_width():
    with pytest.raises(ValueError, match="output_dim=0"):
        projection_head(16, output_dim=0)
