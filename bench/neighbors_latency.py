"""Benchmark: the exported ``neighbors`` search at gallery sizes up to a million.

    python bench/neighbors_latency.py [--sizes 50000,100000,200000,500000,1000000]
        [--dims 128,512] [--json bench/results/neighbors_latency.json]

For every gallery size N and width F, a synthetic gallery (N unit vectors drawn
around 2,000 random centres, so that neighbours are not all equally far) is
exported twice, as ``ascl export --gallery`` writes it, with ``float32`` and
with ``bfloat16`` storage, behind a small CNN whose embeddings are F wide
(the search does not depend on the encoder's weights).  Per export: export
time and size on disk.  Then one fresh process that does not import the project
loads both exports (resident memory after each load) and times
``neighbors_of_embedding`` on unit-norm queries (gallery rows plus noise),
alternating float32 and bfloat16 calls: batch 1 and batch 32, p50 and p99 of
``--calls`` calls after warm-up, the result read back with ``.numpy()``.
Recall@10 of the bfloat16 export against the float32 one is measured on 1,000
queries.  Results are appended per (N, F) to the JSON, so an interrupted run
resumes with the next size.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

MANIFEST = {"image_shape": [32, 32, 3], "class_names": [str(i) for i in range(10)],
            "train_statistics": {"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7]}}

# Run in a clean interpreter: loading and calling, as a TF Serving process would.
TIMING_SCRIPT = r"""
import json, resource, sys, time
import numpy as np, tensorflow as tf

def rss_mb():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

paths, calls = json.loads(sys.argv[1]), int(sys.argv[2])
queries = np.load(sys.argv[3])
result, signatures = {}, {}
for storage, path in paths.items():
    before = rss_mb()
    start = time.perf_counter()
    signatures[storage] = tf.saved_model.load(path).signatures["neighbors_of_embedding"]
    result[storage] = {"load_seconds": round(time.perf_counter() - start, 2),
                       "rss_after_load_mb": round(rss_mb(), 1),
                       "rss_growth_on_load_mb": round(rss_mb() - before, 1)}
ids = {s: fn(embedding=tf.constant(queries[:1000]))["ids"].numpy() for s, fn in signatures.items()}
if "bfloat16" in ids:
    result["bfloat16"]["recall_at_10_vs_float32"] = float(np.mean(
        [len(set(a) & set(b)) / a.size for a, b in zip(ids["float32"], ids["bfloat16"])]))
for size in (1, 32):
    latencies = {s: [] for s in signatures}
    for index in range(calls + 5):
        batch = tf.constant(np.take(queries, np.arange(index * size, (index + 1) * size) % 1000,
                                    axis=0))
        for storage, fn in signatures.items():  # alternating, side by side
            start = time.perf_counter()
            fn(embedding=batch)["ids"].numpy()
            if index >= 5:
                latencies[storage].append(1000 * (time.perf_counter() - start))
    for storage, values in latencies.items():
        result[storage].update({f"batch{size}_p50_ms": round(float(np.percentile(values, 50)), 2),
                                f"batch{size}_p99_ms": round(float(np.percentile(values, 99)), 2)})
for storage in result:
    result[storage]["peak_rss_mb_both_loaded"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print(json.dumps(result))
"""


def synthetic_gallery(size, dim, seed=0):
    from pipeline.gallery import Gallery, normalized

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, dim), dtype=np.float32)
    embeddings = centres[rng.integers(0, 2000, size)]
    embeddings += 0.6 * rng.standard_normal((size, dim), dtype=np.float32)
    ids = np.array([f"img{i:07d}".encode() for i in range(size)], object)
    return Gallery(normalized(embeddings), ids, (np.arange(size) % 10).astype(np.int64),
                   np.array([f"synthetic/{i}.png".encode() for i in range(size)], object))


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def measure(size, dim, calls, workdir):
    from models import build_backbone, projection_head
    from pipeline.export import write_export
    from pipeline.gallery import GalleryIndex

    gallery = synthetic_gallery(size, dim)
    backbone = build_backbone("small_cnn", input_shape=(32, 32, 3), norm="split",
                              widths=(16, 32, dim))
    projector = projection_head(backbone.feature_dim)
    row, paths = {"size": size, "dim": dim}, {}
    for storage in ("float32", "bfloat16"):
        path = os.path.join(workdir, f"{size}_{dim}_{storage}")
        start = time.perf_counter()
        write_export(backbone, projector, MANIFEST, path,
                     gallery=GalleryIndex(gallery, 10, storage), gallery_info={"size": size})
        row[storage] = {"export_seconds": round(time.perf_counter() - start, 1),
                        "export_mb": round(folder_bytes(path) / 2**20, 1),
                        "graph_mb": round(os.path.getsize(os.path.join(path, "saved_model.pb"))
                                          / 2**20, 2)}
        paths[storage] = path
    rng = np.random.default_rng(1)
    queries = gallery.embeddings[rng.integers(0, size, 1000)]
    queries = queries + 0.3 * rng.standard_normal(queries.shape, dtype=np.float32) / np.sqrt(dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    del gallery
    query_path = os.path.join(workdir, "queries.npy")
    np.save(query_path, queries.astype(np.float32))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", TIMING_SCRIPT, json.dumps(paths), str(calls),
                           query_path], capture_output=True, text=True, env=env, cwd=workdir)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    for storage, values in json.loads(done.stdout.strip().splitlines()[-1]).items():
        row[storage].update(values)
    for path in paths.values():
        shutil.rmtree(path)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50000,100000,200000,500000,1000000")
    parser.add_argument("--dims", default="128,512")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--json", default="bench/results/neighbors_latency.json")
    args = parser.parse_args()
    results = {"command": "python bench/neighbors_latency.py " + " ".join(sys.argv[1:]),
               "rows": []}
    if os.path.exists(args.json):
        with open(args.json) as handle:
            results = json.load(handle)
    done = {(r["size"], r["dim"]) for r in results["rows"]}
    workdir = tempfile.mkdtemp(prefix="neighbors_latency-")
    try:
        for dim in (int(d) for d in args.dims.split(",")):
            for size in (int(s) for s in args.sizes.split(",")):
                if (size, dim) in done:
                    continue
                row = measure(size, dim, args.calls, workdir)
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
                from beam_jobs.atomic_json import write_json  # imports TensorFlow

                write_json(args.json, results, indent=1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
