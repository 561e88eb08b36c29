"""``ascl demo``: end to end on the digits, and it never deletes a folder it did not make."""

import os

import pytest

from pipeline.demo import DEMO_MARKER, run_demo


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("months of work")
    with pytest.raises(FileExistsError, match="was not made by `ascl demo`"):
        run_demo(str(precious), epochs=1, quiet=True, export_dir=str(tmp_path / "exports"))
    assert (precious / "chapter1.tex").read_text() == "months of work"


def test_demo_runs_end_to_end_and_replaces_its_own_workdir(tmp_path):
    workdir = str(tmp_path / "demo")
    exports = str(tmp_path / "exports")
    first = run_demo(workdir, epochs=2, quiet=True, export_dir=exports)
    assert os.path.exists(os.path.join(workdir, DEMO_MARKER))
    assert first["raw_pixel_knn_top1"] > 0.9 and os.path.isdir(first["export"])
    second = run_demo(workdir, epochs=1, quiet=True, export_dir=exports)
    assert second["export"] != first["export"]
