"""The one JSON writer: whole files or none."""

import os

import pytest
import tensorflow as tf

from beam_jobs.atomic_json import read_json, write_json


def test_writes_and_replaces_leaving_no_temporary_file(tmp_path):
    path = str(tmp_path / "best.json")
    write_json(path, {"epoch": 1})
    write_json(path, {"epoch": 2, "knn_top1": 0.5})
    assert read_json(path) == {"epoch": 2, "knn_top1": 0.5}
    assert os.listdir(tmp_path) == ["best.json"]


def test_a_write_killed_half_way_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "manifest.json")
    write_json(path, {"format_version": 1})

    def dies_after_a_little(self, text):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(tf.io.gfile.GFile, "write", dies_after_a_little)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"format_version": 1, "splits": {"train": list(range(1000))}})
    monkeypatch.undo()
    assert read_json(path) == {"format_version": 1}
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_a_value_that_is_not_json_writes_nothing(tmp_path):
    path = str(tmp_path / "summary.json")
    with pytest.raises(TypeError):
        write_json(path, {"weights": object()})
    assert not os.listdir(tmp_path)
