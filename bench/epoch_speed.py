"""Benchmark: is a training epoch as fast as its steps?  Both measured side by side.

    python bench/epoch_speed.py --data .data/cifar10-prepared [--cases small_cnn_f32,resnet18_bf16]
                                [--repeats 2] [--json bench/results/epoch_speed.json]

For each case, alternating within every repeat:

* **epoch**: ``ascl train`` itself (``pipeline.train.train``) for 2 epochs on the prepared
  CIFAR-10, reading the second epoch's images/s from the run's history (``RunStats``: the
  epoch's wall time from ``on_epoch_begin`` to ``on_epoch_end``, before the kNN monitor;
  kNN, checkpoints and previews off).  The first epoch fills the cache and traces.
* **step**: the same model, built and compiled from the same config, on one batch of
  views already in memory: median time between step ends inside one ``fit`` (as
  ``bench/train_speed.py``), so only the step is timed.

The ratio epoch / step is what the input pipeline costs the epoch.  Cases:

* ``small_cnn_f32``: ``configs/cifar10_small_cpu.yaml`` as it is (batch 256, 45,000 images);
* ``resnet18_bf16``: ``configs/cifar10_resnet18.yaml`` under ``mixed_bfloat16`` at batch 64
  (lr scaled linearly), on a fixed 5,120-image sample so that an epoch takes a minute or two;
* ``small_cnn_f32_noblur`` (diagnostic, run only when named): the first case without the
  strong view's blur, a cheaper input pipeline with the same step.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

import keras
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_speed import StepTimes  # noqa: E402

CASES = {
    "small_cnn_f32": ("configs/cifar10_small_cpu.yaml", []),
    "resnet18_bf16": ("configs/cifar10_resnet18.yaml",
                      ["train.mixed_precision=mixed_bfloat16", "optimizer.batch_size=64",
                       "data.train_limit=5120"]),
    # diagnostic, not a target: the small CNN without the strong view's blur, to show how
    # the ratio moves with the input pipeline's cost
    "small_cnn_f32_noblur": ("configs/cifar10_small_cpu.yaml", ["data.blur=false"]),
}
COMMON = ["train.epochs=2", "train.knn_every=0", "train.view_images=0", "train.verbose=0",
          "train.mixed_precision=none",  # each case names its precision; auto would choose
          "train.checkpoint_every=1000"]


def config_of(case, data):
    from pipeline.config import load_config

    path, extra = CASES[case]
    return load_config(path, [f"data.dataset={data}", *COMMON, *extra])


def epoch_images_per_second(config):
    from pipeline.train import train

    run_dir = tempfile.mkdtemp(prefix="epoch-speed-")
    try:
        train(config, run_dir)
        with open(os.path.join(run_dir, "history.json")) as handle:
            return json.load(handle)[1]["images_per_second"]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def step_images_per_second(config, steps=20, warmup=3):
    from beam_jobs.dataset_format import load_manifest
    from pipeline.run_dir import build_model

    manifest = load_manifest(config.data.dataset)
    keras.mixed_precision.set_global_policy(
        "float32" if config.train.mixed_precision == "none" else config.train.mixed_precision)
    keras.utils.set_random_seed(0)
    model = build_model(config, manifest)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=False)
    keras.mixed_precision.set_global_policy("float32")
    batch = config.optimizer.batch_size
    images = tf.random.stateless_normal([batch, *manifest["image_shape"]], seed=[0, 0])
    views = tf.data.Dataset.from_tensors(
        {"strong_view": images, "weak_view": images}).repeat()
    model.fit(views, steps_per_epoch=3, epochs=1, verbose=0)  # trace, warm up
    timer = StepTimes()
    model.fit(views, steps_per_epoch=steps + warmup + 1, epochs=1, verbose=0, callbacks=[timer])
    return batch / statistics.median(timer.intervals(warmup))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".data/cifar10-prepared")
    parser.add_argument("--cases", default="small_cnn_f32,resnet18_bf16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cases = args.cases.split(",")
    rates = {case: {"epoch": [], "step": []} for case in cases}
    for repeat in range(args.repeats):
        for case in cases:
            config = config_of(case, args.data)
            rates[case]["epoch"].append(epoch_images_per_second(config))
            rates[case]["step"].append(step_images_per_second(config))
            print(f"repeat {repeat + 1} {case}: epoch {rates[case]['epoch'][-1]:.1f} img/s, "
                  f"step {rates[case]['step'][-1]:.1f} img/s", flush=True)
    results = {"command": "python bench/epoch_speed.py " + " ".join(sys.argv[1:]), "cases": {}}
    for case in cases:
        epoch, step = (statistics.median(rates[case][k]) for k in ("epoch", "step"))
        results["cases"][case] = {
            "config": CASES[case][0], "overrides": CASES[case][1] + COMMON,
            "epoch_images_per_s": round(epoch, 1), "step_images_per_s": round(step, 1),
            "epoch_over_step": round(epoch / step, 3),
            "per_repeat": {k: [round(v, 1) for v in vals] for k, vals in rates[case].items()}}
    print(json.dumps(results, indent=2))
    if args.json:
        from beam_jobs.atomic_json import write_json  # imports TensorFlow

        write_json(args.json, results, indent=2)


if __name__ == "__main__":
    main()
