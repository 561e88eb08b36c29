"""Benchmark: latency and throughput of the exported ``serving_default`` signature.

    python bench/serving_latency.py [--json bench/results/serving_latency.json]

Exports ResNet-18 (CIFAR stem, 32 px) and the small CNN exactly as
``ascl export`` does (weights are freshly initialised: speed does not depend
on them), loads each SavedModel with ``tf.saved_model.load`` and times
``serving_default`` on PNG bytes: batch 1 and batch 32 (latency p50, p99 over
``--calls`` calls after warm-up, and images/s at the p50), and batch 256 (images/s,
median of ``--repeats``).  A call's latency includes decoding the PNGs in the graph
and reading the result back (``.numpy()``), as a client of an in-process model sees it.
"""

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import tensorflow as tf

from models import build_backbone, projection_head
from pipeline.export import write_export

MANIFEST = {"image_shape": [32, 32, 3], "class_names": [str(i) for i in range(10)],
            "train_statistics": {"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7]}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pngs = [tf.io.encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).numpy()
            for _ in range(256)]
    results = {}
    for name in ("resnet18", "small_cnn"):
        backbone = build_backbone(name, input_shape=(32, 32, 3), norm="split")
        path = write_export(backbone, projection_head(backbone.feature_dim), MANIFEST,
                            tempfile.mkdtemp() + "/1")
        serve = tf.saved_model.load(path).signatures["serving_default"]
        timings = {}
        for size in (1, 32):
            request = tf.constant(pngs[:size])
            for _ in range(20):
                serve(image_bytes=request)
            latencies = []
            for _ in range(args.calls):
                start = time.perf_counter()
                serve(image_bytes=request)["embedding"].numpy()
                latencies.append(1000 * (time.perf_counter() - start))
            p50 = float(np.percentile(latencies, 50))
            timings.update({f"batch{size}_p50_ms": round(p50, 2),
                            f"batch{size}_p99_ms": round(float(np.percentile(latencies, 99)), 2),
                            f"batch{size}_images_per_s_at_p50": round(1000 * size / p50, 1)})
        batch = tf.constant(pngs)
        serve(image_bytes=batch)
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            serve(image_bytes=batch)["embedding"].numpy()
            rates.append(256 / (time.perf_counter() - start))
        results[name] = {**timings, "batch256_images_per_s": round(statistics.median(rates), 1)}
        print(name, results[name], flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
