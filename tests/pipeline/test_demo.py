"""``ascl demo``: end to end on the digits, and it never deletes a folder it did not make."""

import json
import os

import pytest

from pipeline.demo import DEMO_MARKER, SEED_RANGE, SEED_RANGE_SEEDS, run_demo, verdict


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
    assert first["raw_pixel_linear_probe_top1"] > 0.5
    assert set(first["verdicts"]) == {"knn", "linear"}
    second = run_demo(workdir, epochs=1, quiet=True, export_dir=exports)
    assert second["export"] != first["export"]


def test_a_difference_inside_the_run_to_run_range_is_a_tie():
    assert verdict(0.9722, 0.9846, 0.02).startswith("ties the baseline (-0.0124")
    assert verdict(0.9846, 0.9846, 0.0).startswith("ties")
    assert verdict(0.99, 0.95, 0.02).startswith("beats the baseline by 0.0400")
    assert verdict(0.90, 0.95, 0.02).startswith("trails the baseline by 0.0500")
    assert "run-to-run range 0.0200 of 3 seeds" in verdict(0.99, 0.95, 0.02)


def test_the_demos_run_to_run_ranges_are_the_measured_ones():
    """SEED_RANGE is what bench/demo_seeds.py recorded, not a number typed by hand."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "results",
                        "demo_seeds.json")
    with open(path) as handle:
        recorded = json.load(handle)
    assert len(recorded["per_seed"]) == SEED_RANGE_SEEDS
    for name in ("knn", "linear"):
        assert SEED_RANGE[name] == recorded["spread"][f"{name}_difference"]["range"]
