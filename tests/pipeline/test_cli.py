"""The ``ascl`` console script."""

import os
import subprocess
import sys

from pipeline.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as stop:
        assert stop.code == 0
    out = capsys.readouterr().out
    assert "usage: ascl" in out
    for command in ("prepare", "train", "evaluate", "export", "embed", "demo", "version"):
        assert command in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: ascl" in capsys.readouterr().out


def test_installed_console_script_runs():
    script = os.path.join(os.path.dirname(sys.executable), "ascl")
    result = subprocess.run([script, "version"], capture_output=True, text=True, check=True)
    assert "tensorflow 2.21" in result.stdout and "keras 3." in result.stdout


def test_subcommand_help_lists_every_flag():
    for command, flags in (("prepare", ["--source", "--output", "--image-size", "--num-shards",
                                        "--overwrite", "--test-fraction", "--tfds-data-dir"]),
                           ("train", ["--config", "--run-dir", "--set", "--strategy",
                                      "--mixed-precision", "--jit-compile"]),
                           ("export", ["--run-dir", "--checkpoint", "--name", "--version"]),
                           ("embed", ["--model", "--input", "--output", "--parquet"])):
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", command, "--help"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-1000:]
        for flag in flags:
            assert flag in result.stdout, (command, flag)


def test_beam_job_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["prepare", "--source", "pictures", "--output", str(tmp_path / "x")]) == 2
    assert "ascl prepare: error: --source must be" in capsys.readouterr().err


def test_evaluate_and_export_default_to_the_last_checkpoint():
    from pipeline.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["evaluate", "--run-dir", "r"]).checkpoint == "last"
    assert parser.parse_args(["export", "--run-dir", "r", "--name", "n"]).checkpoint == "last"


def test_tensorflow_startup_logs_are_quiet_unless_asked_for():
    script = os.path.join(os.path.dirname(sys.executable), "ascl")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run([script, "version"], capture_output=True, text=True, env=env,
                           check=True)
    assert quiet.stdout.startswith("ascl ") and quiet.stderr == ""
    loud = subprocess.run([script, "version"], capture_output=True, text=True, check=True,
                          env={**env, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert "I0000" in loud.stderr  # the user's setting wins


def test_documented_switch_values_are_accepted_as_typed(tmp_path):
    # YAML reads on/off as booleans: both spellings must reach the config, which is
    # validated before the (missing) dataset is looked at
    for flags in (["--set", "data.blur=on", "--jit-compile", "off"],
                  ["--set", "data.blur=off", "--jit-compile", "on"]):
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "train", "--config", "configs/digits_small.yaml",
             "--run-dir", str(tmp_path / "run"), *flags,
             "--set", f"data.dataset={tmp_path / 'missing'}"], capture_output=True, text=True)
        typed = " ".join(flags)
        assert result.returncode == 2 and "is not a prepared dataset" in result.stderr, (
            typed, result.stderr[-500:])


def test_user_errors_are_one_line_messages(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: images\n")
    for argv, message in (
            (["embed", "--model", str(tmp_path / "nowhere"), "--input", str(tmp_path),
              "--output", str(tmp_path / "out")], "is not an `ascl export` SavedModel"),
            (["evaluate", "--run-dir", str(tmp_path / "nowhere")], "is not a training run"),
            (["train", "--config", str(bad), "--run-dir", str(tmp_path / "run")],
             "section 'data' must be a mapping, received 'images'")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"ascl {argv[0]}: error: " in err and message in err, err
        assert "Traceback" not in err


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only the project's own error types become one-line messages: a ValueError from a bug
    (here, one raised where no project code would) propagates with its traceback."""
    import pytest

    from pipeline import evaluate

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(evaluate, "evaluate_run", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["evaluate", "--run-dir", str(tmp_path)])


def test_export_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["export", "--run-dir", str(tmp_path), "--name", "x", "--version", "0"]) == 2
    assert "ascl export: error: --version must be >= 1, received 0" in capsys.readouterr().err


def test_byol_framework_through_demo_train_evaluate_and_export(tmp_path, capsys, monkeypatch):
    """``ascl.framework=byol`` end to end from the command line; the export holds only the
    online backbone and projector."""
    import json

    import numpy as np
    import tensorflow as tf

    from pipeline.run_dir import load_trained_model
    from tests.serving import saved_variable_sizes, weight_sizes

    workdir, exports = tmp_path / "demo", tmp_path / "exports"
    byol = ["--set", "ascl.framework=byol", "--set", "train.knn_every=1"]
    monkeypatch.chdir(tmp_path)  # the demo exports to ./saved_models
    # (the demo's linear probes are the moco demo's test: here a one-epoch probe suffices)
    probe = ["--set", "evaluation.linear_epochs=1"]
    assert main(["demo", "--workdir", str(workdir), "--epochs", "1", *byol, *probe]) == 0
    assert "kNN top-1" in capsys.readouterr().out
    run_dir = str(workdir / "run")
    # `ascl train` resumes the demo's run for one more epoch
    assert main(["train", "--config", os.path.join(ROOT, "configs/digits_small.yaml"),
                 "--run-dir", run_dir, "--set", f"data.dataset={workdir / 'digits16'}",
                 *byol, *probe, "--epochs", "2", "--set", "train.verbose=0"]) == 0
    history = json.load(open(os.path.join(run_dir, "history.json")))
    assert [record["epoch"] for record in history] == [1, 2]
    assert {"loss", "confidence", "max_soft_label", "soft_label_purity",
            "val_knn_top1", "projection_spread"} <= set(history[-1])
    assert main(["evaluate", "--run-dir", run_dir, "--no-linear"]) == 0
    report = json.load(open(os.path.join(run_dir, "evaluation.json")))
    assert report["checkpoint"]["epoch"] == 2 and 0.1 < report["knn"]["top1"] <= 1.0
    assert main(["export", "--run-dir", run_dir, "--name", "byol",
                 "--base-dir", str(exports)]) == 0

    model, _, manifest = load_trained_model(run_dir, "last")
    assert type(model).__name__ == "BYOLModel"
    served = tf.saved_model.load(str(exports / "byol" / "1"))
    exported = saved_variable_sizes(exports / "byol" / "1")
    assert exported == weight_sizes(model.backbone, model.projector)  # no predictor or target
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    out = served.signatures["embed_pixels"](images=tf.constant(images))["projection"].numpy()
    stats = manifest["train_statistics"]
    x = ((images - np.array(stats["mean"])) / np.array(stats["std"])).astype(np.float32)
    online_projection = model.projector(model.backbone(x)).numpy()
    target_projection = model.key_encoder(x).numpy()
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(out, unit(online_projection), atol=1e-5)
    assert np.abs(unit(target_projection) - out).max() > 1e-3  # the target branch differs
