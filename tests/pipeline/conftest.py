"""A small prepared dataset (bundled digits at 16 px) shared by the pipeline tests."""

import pytest

from beam_jobs.prepare import run as prepare
from pipeline.prepared_dataset import load_manifest


@pytest.fixture(scope="session")
def digits16(tmp_path_factory):
    """The Beam job's output for scikit-learn digits resized to 16x16; returns its manifest."""
    output = tmp_path_factory.mktemp("digits16") / "data"
    prepare(["--source", "digits", "--image-size", "16", "--output", str(output)])
    return load_manifest(str(output))
