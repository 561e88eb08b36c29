"""Benchmark: the speed cost of ``train.deterministic`` (TensorFlow's op determinism).

    python bench/deterministic_cost.py [--repeats 3] [--settings small_cnn_ascl,ascl]

Op determinism is process-wide and cannot be switched off again through a public
API, so the two arms run in separate processes of ``bench/train_speed.py``
(``--deterministic`` or not), alternating (off, on, off, on, ...), so slow
phases of this shared machine hit both alike.  Each process times training steps
with a callback inside ``fit`` on in-memory views (see that script); this
reports, per setting, the median over processes of each arm's images/s and their
ratio.  Results: ``bench/results/deterministic_cost.json``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", default="small_cnn_ascl,ascl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=os.path.join(HERE, "results",
                                                       "deterministic_cost.json"))
    args = parser.parse_args()
    names = args.settings.split(",")
    speeds = {arm: {name: [] for name in names} for arm in ("off", "on")}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for arm in ("off", "on"):
                out = os.path.join(scratch, f"{arm}{repeat}.json")
                subprocess.run([sys.executable, os.path.join(HERE, "train_speed.py"),
                                "--settings", args.settings, "--repeats", "1",
                                "--steps", str(args.steps), "--json", out,
                                *(["--deterministic"] if arm == "on" else [])],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                with open(out) as handle:
                    measured = json.load(handle)["settings"]
                for name in names:
                    speeds[arm][name].append(measured[name]["images_per_s"])
                print(f"repeat {repeat + 1} op determinism {arm}: " + ", ".join(
                    f"{name} {speeds[arm][name][-1]} img/s" for name in names), flush=True)
    results = {
        "command": "python bench/deterministic_cost.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "json"),
        "what": "training images/s, median over alternating processes (train_speed.py)",
        "settings": {name: {
            "off_images_per_s": statistics.median(speeds["off"][name]),
            "on_images_per_s": statistics.median(speeds["on"][name]),
            "on_over_off": round(statistics.median(speeds["on"][name])
                                 / statistics.median(speeds["off"][name]), 3),
            "per_process": {arm: speeds[arm][name] for arm in speeds}} for name in names},
    }
    print(json.dumps(results, indent=2))
    from beam_jobs.atomic_json import write_json  # imports TensorFlow

    write_json(args.json, results, indent=2)


if __name__ == "__main__":
    main()
