"""The collapse monitor: about 1 for spread-out unit vectors, 0 for identical rows."""

import numpy as np
import pytest

from models.collapse import projection_spread


def test_random_unit_vectors_score_about_one():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4096, 128)).astype("float32")
    assert float(projection_spread(vectors)) == pytest.approx(1.0, abs=0.05)


def test_identical_rows_score_zero_and_scale_does_not_matter():
    row = np.random.default_rng(1).normal(size=(1, 128)).astype("float32")
    assert float(projection_spread(np.repeat(row, 64, axis=0))) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(256, 32)).astype("float32")
    scales = rng.uniform(0.1, 10, size=(256, 1)).astype("float32")
    assert float(projection_spread(vectors * scales)) == pytest.approx(
        float(projection_spread(vectors)), rel=1e-5)


def test_matches_numpy():
    vectors = np.random.default_rng(3).normal(size=(50, 16)).astype("float32")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert float(projection_spread(vectors)) == pytest.approx(
        np.sqrt(16) * unit.std(axis=0).mean(), rel=1e-5)
