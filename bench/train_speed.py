"""Benchmark: the two-view input pipeline and the ASCL training step on this machine.

    python bench/train_speed.py --data .data/cifar10-prepared [--json bench/results/train_speed.json]

1. Input: view pairs per second of ``pipeline.data.pretrain_dataset`` on the
   CIFAR-10 shards at 32 px (decoded images cached, as in training), batch 256.
2. Training step: images per second of ``ASCLModel.train_step`` for ResNet-18
   (CIFAR stem, split BN 8, M=4096) on synthetic views already in memory, so
   only the step is timed; batch 64 and 256, modes ascl and moco, XLA off/on.
   Each setting is compiled and warmed up, then timed over ``--steps`` steps,
   ``--repeats`` times, alternating settings; medians are reported.
"""

import argparse
import itertools
import json
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from models import ASCLModel, build_backbone, projection_head
from pipeline import data
from pipeline.prepared_dataset import load_manifest


def input_pairs_per_second(manifest, batch_size, batches):
    dataset = data.pretrain_dataset(manifest, batch_size=batch_size, seed=0)
    iterator = iter(dataset)
    for _ in range(len(range(0, 50_000, batch_size)) + 5):  # fill the cache: one full pass
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def make_model(mode, jit):
    keras.utils.set_random_seed(0)
    backbone = build_backbone("resnet18", input_shape=(32, 32, 3), stem="cifar", norm="split",
                              bn_splits=8)
    model = ASCLModel(backbone, projection_head(512), memory_size=4096, mode=mode, seed=0,
                      weight_decay=5e-4)
    model.compile(optimizer=keras.optimizers.SGD(0.06, momentum=0.9), jit_compile=jit)
    return model


def step_images_per_second(model, batch_size, steps):
    rng = np.random.default_rng(0)
    views = tf.constant(rng.normal(size=(batch_size, 32, 32, 3)).astype("float32"))
    dataset = tf.data.Dataset.from_tensors({"strong_view": views, "weak_view": views}).repeat()
    model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)  # compile + warm up
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".data/cifar10-prepared")
    parser.add_argument("--input-batches", type=int, default=100)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--skip-input", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {"device": "cpu", "threads": tf.config.threading.get_inter_op_parallelism_threads()}

    if not args.skip_input:
        manifest = load_manifest(args.data)
        rates = [input_pairs_per_second(manifest, 256, args.input_batches)
                 for _ in range(args.repeats)]
        results["input_view_pairs_per_s"] = {"median": round(statistics.median(rates)),
                                             "runs": [round(r) for r in rates]}
        print("input pipeline view pairs/s:", results["input_view_pairs_per_s"], flush=True)

    settings = list(itertools.product([int(b) for b in args.batch_sizes.split(",")],
                                      ["ascl", "moco"], [False, True]))
    models = {}
    timings = {setting: [] for setting in settings}
    for _ in range(args.repeats):
        for batch, mode, jit in settings:
            key = (mode, jit)
            if key not in models:
                models[key] = make_model(mode, jit)
            timings[(batch, mode, jit)].append(step_images_per_second(models[key], batch,
                                                                      args.steps))
            print(f"batch {batch} {mode} xla={jit}: {timings[(batch, mode, jit)][-1]:.1f} img/s",
                  flush=True)
    results["train_images_per_s"] = [
        {"batch": batch, "mode": mode, "xla": jit,
         "median": round(statistics.median(values), 1), "runs": [round(v, 1) for v in values]}
        for (batch, mode, jit), values in timings.items()]
    for batch in {s[0] for s in settings}:
        for jit in (False, True):
            ascl = statistics.median(timings[(batch, "ascl", jit)])
            moco = statistics.median(timings[(batch, "moco", jit)])
            results.setdefault("ascl_over_moco_step_time", {})[f"batch{batch}_xla{jit}"] = round(
                moco / ascl, 3)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
