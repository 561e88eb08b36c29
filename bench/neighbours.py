"""Picture: what the encoders consider similar — nearest training images of fixed test images.

    python bench/neighbours.py --runs runs/cifar10_quality/a/moco-seed0
                                      runs/cifar10_quality/a/ascl-seed0

For 8 fixed test images (a class-mixed, hash-chosen sample, the same for every encoder),
each encoder's 8 nearest training images by cosine similarity of backbone features (the
kNN monitor's features), side by side; a neighbour of another class than its query gets a
red frame.  Writes ``bench/results/cifar10_neighbours.png`` and the same grid to each
run's TensorBoard (``RUN/tensorboard/neighbours``).
"""

import argparse
import os

import numpy as np


def nearest(run_dir, queries, count):
    """``(train_indices [Q, count], model_name)`` of a run's final encoder."""
    from pipeline import data
    from pipeline.evaluate import embed
    from pipeline.run_dir import load_trained_model

    model, config, manifest = load_trained_model(run_dir, "last")
    bank, _ = embed(model.backbone, data.eval_dataset(manifest, "train", batch_size=500))
    query_features, _ = embed(model.backbone, data.eval_dataset(manifest, queries,
                                                                batch_size=500))
    order = np.argsort(-(query_features @ bank.T), axis=1, kind="stable")[:, :count]
    return order, manifest, f"{config.ascl.mode} (seed {config.train.seed})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run directories to compare")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--neighbours", type=int, default=8)
    parser.add_argument("--out", default="bench/results/cifar10_neighbours.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf

    from pipeline import splits
    from pipeline.prepared_dataset import read_split

    columns = 1 + len(args.runs) * (args.neighbours + 1)
    figure, axes = plt.subplots(args.queries, columns, figsize=(columns * 0.9, args.queries * 0.95))
    queries = splits.Selection("test", limit=args.queries)
    train_images = None
    for r, run_dir in enumerate(args.runs):
        order, manifest, name = nearest(run_dir, queries, args.neighbours)
        if train_images is None:
            train = list(read_split(manifest, "train").as_numpy_iterator())
            train_images = np.stack([image for image, _ in train])
            train_labels = np.array([label for _, label in train])
            query_set = list(zip(*_selected(manifest, queries)))
            for q, (image, label) in enumerate(query_set):
                axes[q, 0].imshow(image)
                axes[q, 0].set_title(manifest["class_names"][label], fontsize=6)
        wrong = 0
        for q in range(args.queries):
            column0 = 1 + r * (args.neighbours + 1)
            axes[q, column0].axis("off")
            for n, index in enumerate(order[q]):
                axis = axes[q, column0 + 1 + n]
                axis.imshow(train_images[index])
                if train_labels[index] != query_set[q][1]:
                    wrong += 1
                    for spine in axis.spines.values():
                        spine.set_edgecolor("red")
                        spine.set_linewidth(2.5)
        axes[0, 1 + r * (args.neighbours + 1) + 1].set_title(
            f"{name}: {wrong}/{args.queries * args.neighbours} of another class", fontsize=7,
            loc="left")
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout(pad=0.2)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    figure.savefig(args.out, dpi=110)
    picture = tf.io.decode_png(tf.io.read_file(args.out), channels=3)[None]
    for run_dir in args.runs:
        writer = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard", "neighbours"))
        with writer.as_default():
            tf.summary.image("nearest_training_images", picture, step=0)
        writer.close()
    print(f"wrote {args.out}")


def _selected(manifest, selection):
    from pipeline import data

    images, _, _ = data._images(manifest, selection)
    pairs = list(images.as_numpy_iterator())
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


if __name__ == "__main__":
    main()
