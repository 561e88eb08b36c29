"""Benchmark: the ASCL training step, timed per step inside ``fit``, settings side by side.

    python bench/train_speed.py [--settings ascl,moco,ascl_xla,ascl_bf16] [--batch 64]
                                [--steps 20] [--repeats 3] [--json bench/results/train_speed.json]

What is timed: ``ASCLModel.train_step`` for ResNet-18 (CIFAR stem, split BN 8, 512 -> 2048 ->
128 projector, M = 4096) on synthetic views already in memory, so no input pipeline is in
the figure.  A ``fit`` call has a one-off set-up cost of seconds (tracing, optimizer
variables, callbacks); timing whole calls of a few steps mostly measures that.  So a
callback takes the time between consecutive ``on_train_batch_end`` calls inside one ``fit``
(``StepTimes``), the first ``--warmup`` intervals are dropped, and the median of the rest is
the step time.  Settings alternate within every repeat (A B C D, A B C D, ...), each model
built once, so slow phases of this shared machine hit every setting alike; the report gives
medians over repeats and ratios of medians.

Settings: ``ascl`` and ``moco`` (float32, graph mode), ``ascl_xla`` (``jit_compile=True``),
``ascl_bf16`` (``mixed_bfloat16``), ``small_cnn_ascl`` (the CPU config's model, batch 256).
"""

import argparse
import json
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from models import ASCLModel, build_backbone, projection_head

SETTINGS = {
    # name: (backbone, mode, jit_compile, policy)
    "ascl": ("resnet18", "ascl", False, "float32"),
    "moco": ("resnet18", "moco", False, "float32"),
    "ascl_xla": ("resnet18", "ascl", True, "float32"),
    "ascl_bf16": ("resnet18", "ascl", False, "mixed_bfloat16"),
    "small_cnn_ascl": ("small_cnn", "ascl", False, "float32"),
}


class StepTimes(keras.callbacks.Callback):
    """Wall time between consecutive ends of training steps within one ``fit``."""

    def __init__(self):
        super().__init__()
        self.ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())

    def intervals(self, skip):
        return list(np.diff(self.ends)[skip:])


def make_model(name, norm="split"):
    backbone_name, mode, jit, policy = SETTINGS[name]
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    backbone = build_backbone(backbone_name, input_shape=(32, 32, 3), stem="cifar", norm=norm,
                              bn_splits=8)
    hidden = (2048,) if backbone_name == "resnet18" else (512,)
    model = ASCLModel(backbone, projection_head(backbone.feature_dim, hidden_dims=hidden),
                      memory_size=4096, mode=mode, seed=0, weight_decay=5e-4)
    model.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9), jit_compile=jit)
    keras.mixed_precision.set_global_policy("float32")
    return model


def views(batch_size):
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(batch_size, 32, 32, 3)).astype("float32"))
    return tf.data.Dataset.from_tensors({"strong_view": images, "weak_view": images}).repeat()


def median_step_seconds(model, dataset, steps, warmup):
    """Median seconds per step over ``steps`` steps of one ``fit`` call, after ``warmup``."""
    timer = StepTimes()
    model.fit(dataset, steps_per_epoch=steps + warmup + 1, epochs=1, verbose=0,
              callbacks=[timer])
    return statistics.median(timer.intervals(warmup))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="ascl,moco,ascl_xla,ascl_bf16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--small-cnn-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per fit call")
    parser.add_argument("--warmup", type=int, default=3, help="step intervals dropped per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--norm", default="split", help="backbone normalisation (split: the "
                                                           "reference's split BN 8)")
    parser.add_argument("--deterministic", action="store_true",
                        help="enable TensorFlow's op determinism first (train.deterministic)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    names = args.settings.split(",")
    unknown = [name for name in names if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")

    models = {name: make_model(name, args.norm) for name in names}
    batches = {name: args.small_cnn_batch if SETTINGS[name][0] == "small_cnn" else args.batch
               for name in names}
    data = {batch: views(batch) for batch in set(batches.values())}
    for name in names:  # trace and warm up every setting before any timing
        models[name].fit(data[batches[name]], steps_per_epoch=3, epochs=1, verbose=0)
    seconds = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names:
            seconds[name].append(median_step_seconds(models[name], data[batches[name]],
                                                     args.steps, args.warmup))
            print(f"repeat {repeat + 1} {name}: {batches[name] / seconds[name][-1]:.1f} img/s",
                  flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    results = {
        "command": "python bench/train_speed.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items() if v is not None and v is not False),
        "op_determinism": args.deterministic,
        "what": "median seconds per training step inside one fit (callback), in-memory views",
        "cpu_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "settings": {name: {"backbone": SETTINGS[name][0], "mode": SETTINGS[name][1],
                            "jit_compile": SETTINGS[name][2], "policy": SETTINGS[name][3],
                            "batch": batches[name],
                            "median_step_ms": round(1000 * medians[name], 1),
                            "images_per_s": round(batches[name] / medians[name], 1),
                            "per_repeat_images_per_s": [round(batches[name] / s, 1)
                                                        for s in seconds[name]]}
                     for name in names},
    }
    reference = "ascl" if "ascl" in medians else names[0]
    results["speed_relative_to_" + reference] = {
        name: round(medians[reference] / medians[name], 3) for name in names
        if batches[name] == batches[reference]}
    print(json.dumps(results, indent=2))
    if args.json:
        from beam_jobs.atomic_json import write_json  # imports TensorFlow

        write_json(args.json, results, indent=2)


if __name__ == "__main__":
    main()
