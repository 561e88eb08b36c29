"""Benchmark: similar-image retrieval on CIFAR-10 through the exported ``neighbors`` signature.

    python bench/cifar10_retrieval.py --data .data/cifar10-prepared [--arms moco,ascl]

Queries are the 10,000 test images; the gallery is the 50,000 training images.
For each arm (the quality benchmark's part a seed-0 encoders: small CNN, 20
epochs, ``bench/cifar10_quality.py``'s settings; trained here first when
``RUNS/a/ARM-seed0`` has not finished, resuming if interrupted), the normal
flow is run end to end: export version 1, ``ascl embed`` both splits with it,
export version 2 with the train split as gallery (k 100), then query
``neighbors_of_embedding`` with the test embeddings (and ``neighbors`` on the
raw bytes of a sample of test images, which must give the same neighbours).

Metrics, by class label: precision@10 (the share of the 10 neighbours of the
query's class) and mAP@100 (per query, the sum of precision@i over the ranks
i <= 100 that hold an image of the query's class, divided by min(100, images of
that class in the gallery), i.e. by 100 here; averaged over queries).  The
raw-pixel baseline is the same exact cosine search on the normalised pixels, in
NumPy.  Results: ``OUT/cifar10_retrieval.json`` (an arm
at a time, so a rerun skips finished arms) and a contact sheet of one query
(``OUT/cifar10_search_sheet.png``, drawn by ``ascl search --sheet``).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cifar10_quality  # noqa: E402  (the benchmark whose encoders are searched)


def retrieval_metrics(neighbor_labels, query_labels, gallery_labels, precision_at=10,
                      map_at=100):
    """``(precision@precision_at, mAP@map_at)`` of ``neighbor_labels [Q, >= map_at]``.

    AP@k of a query: the sum of precision@i over the ranks i <= k that hold an image of its
    class, divided by min(k, images of its class in the gallery), so that a list with fewer
    relevant images scores lower (dividing by the relevant images found instead, as some
    hashing papers do, would give one hit at rank 1 a perfect 1.0)."""
    query_labels = np.asarray(query_labels)
    relevant = np.asarray(neighbor_labels)[:, :map_at] == query_labels[:, None]
    precision = relevant[:, :precision_at].mean()
    hits = np.cumsum(relevant, axis=1)
    precision_at_rank = hits / np.arange(1, relevant.shape[1] + 1)
    in_gallery = np.array([np.sum(np.asarray(gallery_labels) == label) for label in
                           query_labels])
    average = (precision_at_rank * relevant).sum(axis=1) / np.maximum(
        np.minimum(map_at, in_gallery), 1)
    return float(precision), float(average.mean())


def train_encoder(args, arm):
    from pipeline.config import load_config
    from pipeline.train import train

    run_dir = os.path.join(args.runs, "a", f"{arm}-seed0")
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        settings = [o for o in cifar10_quality.overrides(args, "a", arm, 0)
                    if not o.startswith("train.knn_every")]
        # the kNN monitor only at the last epoch (it does not change the training)
        train(load_config(cifar10_quality.CONFIG, settings + ["train.knn_every=20"]), run_dir)
    return run_dir


def encoder_retrieval(args, arm, work):
    import tensorflow as tf

    from beam_jobs.embed import run as embed
    from pipeline.export import export_run
    from pipeline.gallery import read_gallery

    run_dir = train_encoder(args, arm)
    with open(os.path.join(run_dir, "history.json")) as handle:
        knn = json.load(handle)[-1]["test_knn_top1"]
    base = os.path.join(work, "saved_models")
    start = time.perf_counter()
    plain = export_run(run_dir, name=f"cifar10_{arm}", base_dir=base)
    embedded = {}
    for split in ("train", "test"):
        embedded[split] = os.path.join(work, f"{arm}_{split}_embeddings")
        embed(["--model", plain, "--input", args.data, "--split", split, "--output",
               embedded[split], "--projector-samples", "0", "--overwrite"])
    embed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    searchable = export_run(run_dir, name=f"cifar10_{arm}", base_dir=base,
                            gallery=embedded["train"], k=100)
    export_seconds = time.perf_counter() - start
    queries = read_gallery(embedded["test"])  # the test embeddings, in id order
    signatures = tf.saved_model.load(searchable).signatures
    labels, ids = [], []
    for begin in range(0, len(queries), 500):
        out = signatures["neighbors_of_embedding"](
            embedding=tf.constant(queries.embeddings[begin:begin + 500]))
        labels.append(out["labels"].numpy())
        ids.append(out["ids"].numpy())
    labels, ids = np.concatenate(labels), np.concatenate(ids)
    gallery_labels = read_gallery(embedded["train"]).labels
    precision, mean_ap = retrieval_metrics(labels, queries.labels, gallery_labels)
    # the bytes path (what `ascl search` and TF Serving's clients call) agrees on a sample
    from pipeline.prepared_dataset import read_split

    sample = list(read_split(args.data, "test", with_ids=True).take(50).as_numpy_iterator())
    position = {i: n for n, i in enumerate(queries.ids.tolist())}
    by_bytes = signatures["neighbors"](image_bytes=tf.constant(
        [tf.io.encode_png(image).numpy() for image, _, _ in sample]))["ids"].numpy()
    agree = float(np.mean([(by_bytes[n, :10] == ids[position[i], :10]).all()
                           for n, (_, _, i) in enumerate(sample)]))
    return {"arm": arm, "run_dir": run_dir, "export": searchable, "test_knn_top1": knn,
            "precision_at_10": precision, "map_at_100": mean_ap,
            "bytes_path_agrees_on_50_queries": agree,
            "export_and_embed_seconds": round(embed_seconds, 1),
            "export_with_gallery_seconds": round(export_seconds, 1)}


def raw_pixel_retrieval(args):
    from beam_jobs.dataset_format import load_manifest
    from pipeline import data
    from pipeline.evaluate import embed, flatten_pixels
    from pipeline.gallery import brute_force_search

    manifest = load_manifest(args.data)
    train, train_labels = embed(flatten_pixels, data.eval_dataset(manifest, "train",
                                                                  batch_size=1000))
    test, test_labels = embed(flatten_pixels, data.eval_dataset(manifest, "test",
                                                                batch_size=1000))
    labels = []
    for begin in range(0, len(test), 1000):
        order, _ = brute_force_search(test[begin:begin + 1000], train, 100)
        labels.append(train_labels[order])
    precision, mean_ap = retrieval_metrics(np.concatenate(labels), test_labels, train_labels)
    return {"arm": "raw_pixels", "precision_at_10": precision, "map_at_100": mean_ap}


def contact_sheet(args, export, out):
    """One test image's neighbours, drawn through the CLI (the sheet in the README)."""
    from pipeline.cli import main

    query = os.path.join(".data", "cifar10", "test", "cat", "0001.jpg")
    if os.path.exists(query):
        main(["search", "--model", export, "--image", query, "--k", "8", "--sheet", out])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".data/cifar10-prepared")
    parser.add_argument("--arms", default="moco,ascl")
    parser.add_argument("--runs", default="runs/cifar10_quality")
    parser.add_argument("--work", default="runs/cifar10_retrieval")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    path = os.path.join(args.out, "cifar10_retrieval.json")
    report = {"command": "python bench/cifar10_retrieval.py [--arms ...] (each arm records "
                         "the command that measured it)",
              "queries": "test split (10,000)", "gallery": "train split (50,000)",
              "metrics": "precision@10 and mAP@100 by class label", "results": {}}
    if os.path.exists(path):
        with open(path) as handle:
            report = json.load(handle)

    def save():
        from beam_jobs.atomic_json import write_json  # imports TensorFlow

        write_json(path, report, indent=1)

    if "raw_pixels" not in report["results"]:
        report["results"]["raw_pixels"] = raw_pixel_retrieval(args)
        save()
    for arm in args.arms.split(","):
        if arm in report["results"]:
            continue
        report["results"][arm] = {
            **encoder_retrieval(args, arm, args.work),
            "command": "python bench/cifar10_retrieval.py " + " ".join(sys.argv[1:])}
        print(json.dumps(report["results"][arm]), flush=True)
        save()
        if arm == "moco" or not os.path.exists(os.path.join(args.out,
                                                            "cifar10_search_sheet.png")):
            contact_sheet(args, report["results"][arm]["export"],
                          os.path.join(args.out, "cifar10_search_sheet.png"))


if __name__ == "__main__":
    main()
