"""Benchmark: the demo's run-to-run range, over train.seed 0, 1, 2.

    python bench/demo_seeds.py [--seeds 0,1,2] [--runs runs/demo_seeds]

Runs ``ascl demo`` (``pipeline.demo.run_demo``, the bundled digits, its
default 200 epochs) once per seed and records, per seed, the four scores the
demo prints: kNN on the encoder's features and on raw pixels, and the linear
probe on each.  Then, for each comparison, the range (max - min over seeds) of
the scores and of the difference encoder minus raw pixels.  The demo's
``SEED_RANGE`` is the range of the differences: the spread a single demo run's
comparison carries.

Results go to ``bench/results/demo_seeds.json`` a seed at a time, so a rerun
skips finished seeds (pass ``--fresh`` to start over, e.g. on another CPU).
"""

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "demo_seeds.json")
SCORES = ("knn_top1", "raw_pixel_knn_top1", "linear_probe_top1", "raw_pixel_linear_probe_top1")
COMPARISONS = {"knn": ("knn_top1", "raw_pixel_knn_top1"),
               "linear": ("linear_probe_top1", "raw_pixel_linear_probe_top1")}


def spread(per_seed):
    """Ranges over seeds of every score and of each comparison's difference."""
    def value_range(values):
        return round(max(values) - min(values), 6)

    rows = list(per_seed.values())
    summary = {score: {"min": min(r[score] for r in rows), "max": max(r[score] for r in rows),
                       "range": value_range([r[score] for r in rows])} for score in SCORES}
    for name, (encoder, baseline) in COMPARISONS.items():
        differences = [r[encoder] - r[baseline] for r in rows]
        summary[f"{name}_difference"] = {"min": round(min(differences), 6),
                                         "max": round(max(differences), 6),
                                         "range": value_range(differences)}
    return summary


def cpu_name():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default="runs/demo_seeds")
    parser.add_argument("--fresh", action="store_true", help="discard recorded seeds")
    args = parser.parse_args(argv)

    from pipeline.demo import run_demo

    results = {}
    if os.path.exists(RESULTS) and not args.fresh:
        with open(RESULTS) as handle:
            results = json.load(handle)
    per_seed = results.get("per_seed", {})
    for seed in [int(s) for s in args.seeds.split(",")]:
        if str(seed) in per_seed:
            print(f"seed {seed}: recorded, skipped")
            continue
        start = time.perf_counter()
        workdir = os.path.join(args.runs, f"seed{seed}")
        summary = run_demo(workdir, overrides=[f"train.seed={seed}"], quiet=True,
                           export_dir=os.path.join(args.runs, "saved_models"))
        per_seed[str(seed)] = {**{score: summary[score] for score in SCORES},
                               "seconds": round(time.perf_counter() - start, 1)}
        results = {"command": "python bench/demo_seeds.py", "cpu": cpu_name(),
                   "test_digits": summary["examples"].get("test"), "per_seed": per_seed,
                   "spread": spread(per_seed)}
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        from beam_jobs.atomic_json import write_json  # imports TensorFlow

        write_json(RESULTS, results, indent=1)
        print(f"seed {seed}: " + ", ".join(f"{s} {summary[s]:.4f}" for s in SCORES))
    print(json.dumps(results.get("spread"), indent=1))


if __name__ == "__main__":
    main()
