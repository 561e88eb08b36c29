"""``ascl demo``: the whole pipeline on the embedded digits, in a few minutes on a CPU.

prepare (Beam, DirectRunner) -> pre-train ASCL (small CNN) -> evaluate (kNN
against the same kNN on raw pixels, linear probe against the same probe on raw
pixels) -> export for TF Serving -> a short summary with paths, numbers and a
verdict for each comparison that calls a difference inside the measured
run-to-run range a tie.
"""

import os
import shutil
import time

from beam_jobs.atomic_json import write_json
from beam_jobs.errors import OutputExists
from beam_jobs.prepare import run as prepare
from pipeline.config import load_config
from pipeline.evaluate import evaluate_run
from pipeline.export import export_run
from pipeline.train import train

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "digits_small.yaml")


DEMO_MARKER = ".ascl-demo"

# Run-to-run range (max - min over train.seed 0, 1, 2) of each comparison's difference,
# encoder minus raw pixels, measured by `python bench/demo_seeds.py` on the 324 test
# digits (results in bench/results/demo_seeds.json). A difference inside it is a tie: another
# seed, or another CPU's kernels, can flip its sign.
SEED_RANGE = {"knn": 0.012346, "linear": 0.027778}
SEED_RANGE_SEEDS = 3


def verdict(score, baseline, seed_range, *, seeds=SEED_RANGE_SEEDS):
    """How ``score`` compares with ``baseline``, in words honest about the spread: a
    difference no larger than ``seed_range`` (the run-to-run range) is a tie."""
    difference = score - baseline
    if seed_range is None:  # settings other than the measured default recipe
        return (f"{'beats' if difference > 0 else 'does not beat'} the baseline "
                f"({difference:+.4f}; no run-to-run range measured for these settings)")
    if abs(difference) <= seed_range:
        return (f"ties the baseline ({difference:+.4f}, within the run-to-run range "
                f"{seed_range:.4f} of {seeds} seeds)")
    word = "beats" if difference > 0 else "trails"
    return (f"{word} the baseline by {abs(difference):.4f} (more than the run-to-run range "
            f"{seed_range:.4f} of {seeds} seeds)")


def run_demo(workdir="runs/demo", *, epochs=None, overrides=(), quiet=False,
             export_dir="saved_models"):
    """Runs the demo under ``workdir``; returns the summary dict.

    ``overrides`` are ``section.key=value`` strings applied to ``configs/digits_small.yaml``
    (``ascl demo --set``), e.g. ``ascl.framework=byol``.

    A ``workdir`` the demo made before (it holds ``.ascl-demo``) is replaced; any other
    non-empty folder is refused, so a mistyped ``--workdir`` never deletes a user's files.
    """
    # One function over 60 lines on purpose: the demo's steps (prepare, train, evaluate,
    # export, report) read top to bottom in the order a user sees them printed.
    start = time.perf_counter()
    marker = os.path.join(workdir, DEMO_MARKER)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise OutputExists(f"--workdir {workdir} is a file, not a folder")
    if os.path.exists(workdir) and os.listdir(workdir):
        if not os.path.exists(marker):
            raise OutputExists(
                f"{workdir} exists and was not made by `ascl demo` (no {DEMO_MARKER} in it); "
                f"the demo replaces its workdir, so pass another --workdir or remove it yourself")
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(marker, "w") as handle:
        handle.write("made by `ascl demo`, which replaces this folder on its next run\n")
    dataset_dir = os.path.join(workdir, "digits16")
    run_dir = os.path.join(workdir, "run")
    say = (lambda *a: None) if quiet else print

    say(f"[1/4] preparing scikit-learn digits with Beam -> {dataset_dir}")
    manifest = prepare(["--source", "digits", "--image-size", "16", "--output", dataset_dir])
    sets = [f"data.dataset={dataset_dir}", *overrides]
    if epochs:
        sets.append(f"train.epochs={epochs}")
    if quiet:
        sets.append("train.verbose=0")
    config = load_config(CONFIG, sets)
    say(f"[2/4] pre-training ASCL ({config.ascl.framework} form, mode {config.ascl.mode}, "
        f"{config.model.backbone}, {config.train.epochs} epochs) -> {run_dir}")
    trained = train(config, run_dir)
    say("[3/4] evaluating: kNN and a linear probe on backbone features, each against the "
        "same classifier on raw pixels")
    report = evaluate_run(run_dir, checkpoint="last")
    say(f"[4/4] exporting the encoder for TF Serving -> {export_dir}/ascl_digits/")
    exported = export_run(run_dir, name="ascl_digits", checkpoint="last", base_dir=export_dir)
    summary = {
        "dataset": dataset_dir,
        "examples": {split: info["num_examples"] for split, info in manifest["splits"].items()},
        "run_dir": run_dir,
        "checkpoint": trained["checkpoints"]["last"],
        "knn_top1": report["knn"]["top1"],
        "raw_pixel_knn_top1": report["raw_pixel_knn"]["top1"],
        "linear_probe_top1": report["linear_probe"]["top1"],
        "raw_pixel_linear_probe_top1": report["raw_pixel_linear_probe"]["top1"],
        "knn_k": report["knn"]["k"],
        "evaluation_report": os.path.join(run_dir, "evaluation.json"),
        "export": exported,
        "tensorboard": f"tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}",
        "seconds": round(time.perf_counter() - start, 1),
    }
    # the range was measured for the default recipe (any seed); other settings have none
    recipe_changed = epochs or any(not o.startswith(("train.seed=", "train.verbose="))
                                   for o in overrides)
    measured = {"knn": None, "linear": None} if recipe_changed else SEED_RANGE
    knn_verdict = verdict(summary["knn_top1"], summary["raw_pixel_knn_top1"], measured["knn"])
    linear_verdict = verdict(summary["linear_probe_top1"],
                             summary["raw_pixel_linear_probe_top1"], measured["linear"])
    summary["verdicts"] = {"knn": knn_verdict, "linear": linear_verdict}
    write_json(os.path.join(workdir, "summary.json"), summary, indent=2)
    say("\nASCL demo summary")
    say(f"  data        {dataset_dir}  ({summary['examples']})")
    say(f"  run         {run_dir}")
    say(f"  kNN top-1   {summary['knn_top1']:.4f}  (k={summary['knn_k']}, backbone features) "
        f"vs {summary['raw_pixel_knn_top1']:.4f} (the same kNN on raw pixels):")
    say(f"              the encoder {knn_verdict}")
    say(f"  linear      {summary['linear_probe_top1']:.4f}  (frozen backbone + Dense) vs "
        f"{summary['raw_pixel_linear_probe_top1']:.4f} (the same Dense on raw pixels):")
    say(f"              the encoder {linear_verdict}")
    say(f"  report      {summary['evaluation_report']}")
    say(f"  export      {exported}  (tensorflow_model_server --model_config_file="
        f"{os.path.join(export_dir, 'models.config')})")
    say(f"  watch       {summary['tensorboard']}")
    say(f"  took        {summary['seconds']} s")
    return summary
