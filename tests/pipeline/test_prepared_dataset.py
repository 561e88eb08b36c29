"""The tf.data readers of a prepared dataset: what they refuse (what they read is tested with
the job's own output, ``tests/beam_jobs/test_prepare.py``)."""

import pytest

from beam_jobs.dataset_format import DatasetError
from pipeline.prepared_dataset import read_split


def test_read_split_refuses_a_missing_dataset_split_or_manifest(tmp_path):
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        read_split(str(tmp_path), "train")
    manifest = {"directory": str(tmp_path), "image_shape": [4, 4, 3],
                "splits": {"train": {"num_examples": 0, "shards": []}}}
    with pytest.raises(DatasetError, match="split 'validation' is not in"):
        read_split(manifest, "validation")
    with pytest.raises(DatasetError, match="needs the manifest returned by load_manifest"):
        read_split({key: value for key, value in manifest.items() if key != "directory"},
                   "train")
