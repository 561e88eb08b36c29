"""Benchmark: does a bfloat16 export embed like the float32 one, on CIFAR-10?

    python bench/bf16_fidelity.py --run-dir runs/retrieval/a/ascl-seed0 \
        [--data .data/cifar10-prepared] [--json bench/results/bf16_fidelity.json]

Exports the run's ``last`` weights twice (``ascl export --precision float32`` and
``--precision bfloat16``), embeds the 50,000 training and 10,000 test images through
each export's ``embed_pixels`` signature (the served graph after decoding), and
reports the cosine between the two exports' embeddings of every test image (min,
mean, 0.1th percentile) and kNN top-1 (k=200, t=0.1, the training split as the bank)
with each export's embeddings.  Results: ``--json`` (``bench/results/bf16_fidelity.json``).
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "bf16_fidelity.json")


def embed(signature, manifest, split, batch=500):
    from pipeline.prepared_dataset import read_split

    features, labels = [], []
    for images, batch_labels in read_split(manifest, split).batch(batch):
        features.append(signature(images=images)["embedding"].numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(features), np.concatenate(labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--data", default=".data/cifar10-prepared")
    parser.add_argument("--json", default=RESULTS)
    args = parser.parse_args()

    from beam_jobs.dataset_format import load_manifest
    from pipeline.evaluate import knn_accuracy
    from pipeline.export import export_run

    manifest = load_manifest(args.data)
    base = tempfile.mkdtemp(prefix="bf16-fidelity-")
    embeddings = {}
    for precision in ("float32", "bfloat16"):
        path = export_run(args.run_dir, name=f"fidelity_{precision}", base_dir=base,
                          precision=precision)
        signature = tf.saved_model.load(path).signatures["embed_pixels"]
        embeddings[precision] = {split: embed(signature, manifest, split)
                                 for split in ("train", "test")}
    test32, test16 = embeddings["float32"]["test"][0], embeddings["bfloat16"]["test"][0]
    cosine = np.sum(test32 * test16, axis=1)
    knn = {precision: knn_accuracy(values["train"], values["test"], k=200, temperature=0.1,
                                   num_classes=len(manifest["class_names"]))["top1"]
           for precision, values in embeddings.items()}
    results = {"command": "python bench/bf16_fidelity.py " + " ".join(sys.argv[1:]),
               "bfloat16_export": "batch norm folded (models.batch_norm_folding)",
               "run_dir": args.run_dir, "test_images": int(len(cosine)),
               "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
               "cosine_p0.1": float(np.percentile(cosine, 0.1)),
               "knn_top1_float32": knn["float32"], "knn_top1_bfloat16": knn["bfloat16"],
               "knn_difference_points": round(100 * (knn["bfloat16"] - knn["float32"]), 2)}
    print(json.dumps(results, indent=1))
    from beam_jobs.atomic_json import write_json  # imports TensorFlow

    write_json(args.json, results, indent=1)


if __name__ == "__main__":
    main()
