"""Benchmark: the Beam preparation job against a plain single-process loop.

Both do the same work on every file of the CIFAR-10 JPEG tree (60,000 files):
read, decode and validate, encode PNG, build a tf.train.Example, frame it and
write it to a TFRecord file.  The loop writes one file per split and skips
sharding, sorting, statistics and the manifest, so it is a lower bound.

    python bench/prepare_speed.py --data .data/cifar10 [--runs 1]

Extract the data first (git-ignored):
    mkdir -p .data/cifar10 && tar xzf ../shared/datasets/cifar10-jpg.tar.gz -C .data/cifar10
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from beam_jobs.dataset_format import encode_example
from beam_jobs.images import InvalidImage, decode_image, encode_png, validate_pixels
from beam_jobs.prepare import run
from beam_jobs.sources import folder_item
from beam_jobs.tfrecord import encode_record


def plain_loop(root, output):
    writers, count = {}, 0
    for directory, _, files in os.walk(root):
        for name in sorted(files):
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                item = folder_item(path, root, handle.read(), 0.2)
            try:
                pixels = validate_pixels(decode_image(item["data"]), min_size=8)
            except InvalidImage:
                continue
            record = encode_example(png=encode_png(pixels), shape=pixels.shape, label=0,
                                    class_name=item["class_name"], example_id=item["id"],
                                    source_path=path, split=item["split"])
            split = item["split"]
            if split not in writers:
                writers[split] = open(os.path.join(output, f"{split}.tfrecord"), "wb")
            writers[split].write(encode_record(record))
            count += 1
    for writer in writers.values():
        writer.close()
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".data/cifar10")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--beam-args", default="",
                        help="extra Beam flags, e.g. '--direct_num_workers 2 "
                             "--direct_running_mode multi_processing'")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    root = os.path.abspath(args.data)
    results = {"plain_loop_s": [], "beam_s": []}
    for _ in range(args.runs):
        # alternate the two so drifting machine load hits both alike
        scratch = tempfile.mkdtemp()
        start = time.perf_counter()
        count = plain_loop(root, scratch)
        results["plain_loop_s"].append(time.perf_counter() - start)
        shutil.rmtree(scratch)
        scratch = tempfile.mkdtemp()
        start = time.perf_counter()
        manifest = run(["--source", f"folder:{root}", "--output", os.path.join(scratch, "out"),
                        *args.beam_args.split()])  # default shard counts: 16 per split
        results["beam_s"].append(time.perf_counter() - start)
        shutil.rmtree(scratch)
        assert manifest["num_inputs"] == count + manifest["dead_letters"]["count"]
    loop, beam = statistics.median(results["plain_loop_s"]), statistics.median(results["beam_s"])
    summary = {"files": count, "runs": args.runs, "beam_args": args.beam_args,
               "plain_loop_median_s": round(loop, 1), "beam_median_s": round(beam, 1),
               "plain_loop_images_per_s": round(count / loop),
               "beam_images_per_s": round(count / beam),
               "beam_over_loop_time_ratio": round(beam / loop, 2), **results}
    print(json.dumps(summary, indent=2))
    if args.json:
        from beam_jobs.atomic_json import write_json  # imports TensorFlow

        write_json(args.json, summary, indent=2)


if __name__ == "__main__":
    main()
