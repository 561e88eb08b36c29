"""Benchmark: view pairs per second of the training input, blur on and off, side by side.

    python bench/input_speed.py --data .data/cifar10-prepared --repeats 3

``pipeline.data.pretrain_dataset`` at batch 256 on the full train split (decoded
images cached, whole-split shuffle, strong + weak view per image), alternating
the two settings; each measurement times ``--batches`` batches after a warm-up
pass over the cache.  Prints medians and writes ``bench/results/input_speed.json``.
"""

import argparse
import json
import statistics
import time


def pairs_per_second(manifest, *, blur, batch_size, batches):
    from pipeline import data

    iterator = iter(data.pretrain_dataset(manifest, batch_size=batch_size, seed=0, blur=blur))
    for _ in range(manifest["splits"]["train"]["num_examples"] // batch_size):  # fill the cache
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".data/cifar10-prepared")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench/results/input_speed.json")
    args = parser.parse_args()

    from beam_jobs.dataset_format import load_manifest

    manifest = load_manifest(args.data)
    runs = {"blur_on": [], "blur_off": []}
    for _ in range(args.repeats):
        for name, blur in (("blur_on", True), ("blur_off", False)):
            runs[name].append(pairs_per_second(manifest, blur=blur, batch_size=args.batch_size,
                                               batches=args.batches))
    result = {"command": f"python bench/input_speed.py --data {args.data} --batch-size "
                         f"{args.batch_size} --batches {args.batches} --repeats {args.repeats}",
              "runs": runs, "median_pairs_per_second": {k: statistics.median(v)
                                                        for k, v in runs.items()}}
    print(json.dumps(result, indent=2))
    from beam_jobs.atomic_json import write_json  # imports TensorFlow

    write_json(args.json, result, indent=2)


if __name__ == "__main__":
    main()
