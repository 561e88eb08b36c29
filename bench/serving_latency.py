"""Benchmark: latency and throughput of the exported ``serving_default`` signature.

    python bench/serving_latency.py [--precisions float32,bfloat16] [--models resnet18,small_cnn]
                                    [--json bench/results/serving_latency.json]

Exports ResNet-18 (CIFAR stem, 32 px) and the small CNN exactly as ``ascl export``
does, in each precision (``--precision``: float32, or bfloat16 under Keras's
``bfloat16`` policy with batch norm folded, as ``pipeline.export.in_precision`` makes it;
weights are freshly initialised: speed does not depend on them), loads each SavedModel with
``tf.saved_model.load`` and times ``serving_default`` on PNG bytes: batch 1 and batch
32 (latency p50, p99 over ``--calls`` calls after warm-up, and images/s at the p50),
and batch 256 (images/s,
median of ``--repeats``).  The exports are timed alternately, in ``--rounds`` rounds
of ``calls / rounds`` calls each, so a slow phase of a shared machine hits every
export alike.  A call's latency includes decoding the PNGs in the graph and reading
the result back (``.numpy()``), as a client of an in-process model sees it.  Each export's
size on disk is recorded too (``export_megabytes``: ``saved_model.pb`` and the variables).
Ratios are of the same model's bfloat16 export to its float32 one.

To see bfloat16 without the CPU's bfloat16 instructions (oneDNN then emulates it), run
it again with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` in the environment.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from models import build_backbone, projection_head
from pipeline.export import in_precision, write_export
from pipeline.precision import cpu_flags

MANIFEST = {"image_shape": [32, 32, 3], "class_names": [str(i) for i in range(10)],
            "train_statistics": {"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7]}}


def load_export(name, precision, folder):
    """``(loaded SavedModel, megabytes on disk)`` of model ``name`` exported as ``ascl
    export --precision precision`` does, under ``folder`` (also used by
    ``serving_vs_pytorch.py``)."""
    keras.utils.set_random_seed(0)
    backbone = build_backbone(name, input_shape=(32, 32, 3), norm="split")
    projector = projection_head(backbone.feature_dim)
    backbone, projector = in_precision(backbone, projector, precision)
    path = write_export(backbone, projector, MANIFEST, os.path.join(folder, name, precision, "1"))
    return tf.saved_model.load(path), _megabytes(path)


def _megabytes(path):
    """The SavedModel's size on disk (``saved_model.pb`` + ``variables/``), in MB."""
    files = [os.path.join(path, "saved_model.pb")] + [
        os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(path, "variables"))
        for name in names]
    return round(sum(os.path.getsize(name) for name in files) / 1e6, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--models", default="resnet18,small_cnn")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pngs = [tf.io.encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).numpy()
            for _ in range(256)]
    requests = {size: tf.constant(pngs[:size]) for size in (1, 32, 256)}
    names = [(model, precision) for model in args.models.split(",")
             for precision in args.precisions.split(",")]
    folder = tempfile.TemporaryDirectory()  # removed when the process ends
    exports = {name: load_export(*name, folder.name) for name in names}
    serves = {name: loaded.signatures["serving_default"]
              for name, (loaded, _) in exports.items()}
    latencies = {name: {1: [], 32: []} for name in names}
    rates = {name: [] for name in names}
    for serve in serves.values():  # warm up every export before any timing
        for size in (1, 32, 256):
            for _ in range(5):
                serve(image_bytes=requests[size])
    per_round = max(1, args.calls // args.rounds)
    for _ in range(args.rounds):
        for name, serve in serves.items():
            for size in (1, 32):
                for _ in range(per_round):
                    start = time.perf_counter()
                    serve(image_bytes=requests[size])["embedding"].numpy()
                    latencies[name][size].append(1000 * (time.perf_counter() - start))
    for _ in range(args.repeats):
        for name, serve in serves.items():
            start = time.perf_counter()
            serve(image_bytes=requests[256])["embedding"].numpy()
            rates[name].append(256 / (time.perf_counter() - start))

    results = {"command": "python bench/serving_latency.py " + " ".join(
                   f"--{k} {v}" for k, v in vars(args).items() if k != "json"),
               "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(not set)"),
               "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                                  "amx_tile"}), "exports": {}}
    for name in names:
        row = {}
        for size in (1, 32):
            p50 = float(np.percentile(latencies[name][size], 50))
            row.update({f"batch{size}_p50_ms": round(p50, 2),
                        f"batch{size}_p99_ms": round(float(np.percentile(
                            latencies[name][size], 99)), 2),
                        f"batch{size}_images_per_s_at_p50": round(1000 * size / p50, 1)})
        row["batch256_images_per_s"] = round(statistics.median(rates[name]), 1)
        row["export_megabytes"] = exports[name][1]
        results["exports"]["/".join(name)] = row
        print("/".join(name), row, flush=True)
    for model in args.models.split(","):
        f32, bf16 = (results["exports"].get(f"{model}/{p}") for p in ("float32", "bfloat16"))
        if f32 and bf16:
            results.setdefault("bfloat16_over_float32", {})[model] = {
                "batch1_p50_speedup": round(f32["batch1_p50_ms"] / bf16["batch1_p50_ms"], 3),
                "batch32_throughput": round(bf16["batch32_images_per_s_at_p50"]
                                            / f32["batch32_images_per_s_at_p50"], 3),
                "batch256_throughput": round(bf16["batch256_images_per_s"]
                                             / f32["batch256_images_per_s"], 3)}
    print(json.dumps(results, indent=2))
    if args.json:
        from beam_jobs.atomic_json import write_json  # imports TensorFlow

        write_json(args.json, results, indent=2)


if __name__ == "__main__":
    main()
