"""Benchmark: how class-mixed are the training batches and the queue's windows?

    python bench/data_order.py --data .data/cifar10-prepared [--epochs 2]

Reads the training stream exactly as ``ascl train`` does with
``configs/cifar10_small_cpu.yaml`` (``pipeline.data.pretrain_dataset``, batch
256, the trainer's training selection and shuffle settings), and reports:

* the mean share of the most common class per 256-image batch, against the
  same figure for batches drawn i.i.d. (a fresh random permutation of the
  same labels), which is what the reference's ``shuffle=True`` loader gives;
* the largest share of one class in any 4,096-image window at a step
  boundary (the contents of a queue of M=4096 after each step), across epochs.

Only labels are used.  Adds an entry named ``--label`` to
``bench/results/data_order.json``.
"""

import argparse
import json
import os
import time

import numpy as np


def largest_share(labels, num_classes):
    return np.bincount(labels, minlength=num_classes).max() / len(labels)


def measure(labels, *, batch, window, num_classes, seed=0, trials=2000):
    """Batch and window statistics of a label stream, and the i.i.d. batch reference."""
    batches = labels[: len(labels) // batch * batch].reshape(-1, batch)
    batch_shares = [largest_share(b, num_classes) for b in batches]
    window_shares = [largest_share(labels[end - window:end], num_classes)
                     for end in range(window, len(labels) + 1, batch)]
    rng = np.random.default_rng(seed)
    iid = [largest_share(rng.permutation(labels)[:batch], num_classes) for _ in range(trials)]
    iid_windows = [largest_share(rng.permutation(labels)[:window], num_classes)
                   for _ in range(trials)]
    return {"mean_largest_class_share_per_batch": float(np.mean(batch_shares)),
            "iid_mean_largest_class_share_per_batch": float(np.mean(iid)),
            "batch_difference_from_iid": float(np.mean(batch_shares) - np.mean(iid)),
            "max_largest_class_share_per_window": float(np.max(window_shares)),
            "mean_largest_class_share_per_window": float(np.mean(window_shares)),
            "iid_mean_largest_class_share_per_window": float(np.mean(iid_windows)),
            "batches": len(batch_shares), "windows": len(window_shares)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".data/cifar10-prepared")
    parser.add_argument("--config", default="configs/cifar10_small_cpu.yaml")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--out", default="bench/results/data_order.json")
    parser.add_argument("--label", default="faithful order")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, as for ascl train")
    args = parser.parse_args()

    from beam_jobs.dataset_format import load_manifest
    from pipeline import data
    from pipeline.config import load_config
    from pipeline.train import training_selections

    config = load_config(args.config, [f"data.dataset={args.data}", *args.set])
    manifest = load_manifest(args.data)
    selection, _ = training_selections(config, manifest)
    batch = config.optimizer.batch_size
    steps = selection.count(manifest) // batch
    start = time.perf_counter()
    iterator = iter(data.pretrain_dataset(
        manifest, batch_size=batch, seed=config.train.seed, split=selection,
        blur=config.data.blur, crop_scale=(config.data.crop_min_scale, 1.0),
        shuffle_buffer=config.data.shuffle_buffer, cache=config.data.cache))
    labels = np.concatenate([next(iterator)["label"].numpy() for _ in range(steps * args.epochs)])
    seconds = time.perf_counter() - start
    result = {
        "label": args.label, "data": args.data, "config": args.config,
        "training_selection": selection.description, "batch_size": batch,
        "window": args.window, "epochs": args.epochs, "read_seconds": round(seconds, 1),
        **measure(labels, batch=batch, window=args.window,
                  num_classes=len(manifest["class_names"])),
        "command": "python bench/data_order.py " + " ".join(
            f"--{k.replace('_', '-')} {v!r}" if " " in str(v) else f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()),
    }
    print(json.dumps(result, indent=2))
    write_result(args.out, result)


def write_result(path, result):
    """Adds (or replaces) this label's entry in the results file."""
    runs = {}
    if os.path.exists(path):
        with open(path) as handle:
            runs = {run["label"]: run for run in json.load(handle)["runs"]}
    runs[result["label"]] = result
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from beam_jobs.atomic_json import write_json  # imports TensorFlow

    write_json(path, {"runs": list(runs.values())}, indent=2)


if __name__ == "__main__":
    main()
