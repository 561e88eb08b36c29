"""Benchmark: ASCL against MoCo on real CIFAR-10, on this CPU, with learning curves.

    python bench/cifar10_quality.py --data .data/cifar10-prepared --epochs 15

Prepare the data first with the project's own Beam job:
    mkdir -p .data/cifar10 && tar xzf ../shared/datasets/cifar10-jpg.tar.gz -C .data/cifar10
    ascl prepare --source folder:.data/cifar10 --output .data/cifar10-prepared

Four arms share ``configs/cifar10_small_cpu.yaml`` (small CNN, 32 px, batch 256,
M=4096, t1=0.1, t2=0.05), the number of epochs and the seed:
``moco``; ``ascl`` with the weak key view; ``ascl`` with a strong key view;
``ahcl``.  After every epoch each arm's kNN top-1 (k=200, t=0.1) on the full
10,000-image test split is recorded; at the end a linear probe and the
raw-pixel kNN baseline.  Writes ``bench/results/cifar10_quality.json`` and a
PNG of the learning curves.
"""

import argparse
import json
import os
import time

ARMS = {
    "moco": ["ascl.mode=moco"],
    "ascl_weak_key": ["ascl.mode=ascl", "data.key_view=weak"],
    "ascl_strong_key": ["ascl.mode=ascl", "data.key_view=strong"],
    "ahcl": ["ascl.mode=ahcl"],
}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for arm, info in results["arms"].items():
        epochs = [r["epoch"] for r in info["history"]]
        axis.plot(epochs, [100 * r["knn_top1"] for r in info["history"]], marker="o", label=arm)
    axis.axhline(100 * results["raw_pixel_knn"]["top1"], color="gray", linestyle="--",
                 label="raw-pixel kNN")
    axis.set_xlabel("epoch")
    axis.set_ylabel("kNN top-1 on CIFAR-10 test (%)")
    axis.set_title(f"CIFAR-10, small CNN, {results['epochs']} epochs on a 2-core CPU")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".data/cifar10-prepared")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-limit", type=int, default=0,
                        help="train on a fixed class-mixed sample of N train images")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--runs", default="runs/cifar10_quality")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--linear-epochs", type=int, default=30)
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.evaluate import linear_probe, raw_pixel_knn
    from pipeline.prepared_dataset import load_manifest
    from pipeline.run_dir import load_trained_model
    from pipeline.train import train

    manifest = load_manifest(args.data)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "cifar10_quality.json")
    results = {"command": "python bench/cifar10_quality.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "config": "configs/cifar10_small_cpu.yaml", "epochs": args.epochs,
        "train_limit": args.train_limit or manifest["splits"]["train"]["num_examples"],
        "test_examples": manifest["splits"]["test"]["num_examples"], "arms": {}}
    common = [f"data.dataset={args.data}", f"train.epochs={args.epochs}", "train.knn_every=1",
              "train.checkpoint_every=1000", "train.verbose=2", "train.seed=0",
              "data.validation_size=0",  # pre-train on all 50,000 as the reference does
              f"data.train_limit={args.train_limit}", f"evaluation.linear_epochs={args.linear_epochs}"]
    results["raw_pixel_knn"] = raw_pixel_knn(manifest, train_split="train", eval_split="test",
                                             k=200, temperature=0.1, batch_size=1000)
    print("raw-pixel kNN:", results["raw_pixel_knn"], flush=True)
    for arm in args.arms.split(","):
        config = load_config("configs/cifar10_small_cpu.yaml", common + ARMS[arm])
        run_dir = os.path.join(args.runs, arm)
        start = time.perf_counter()
        train(config, run_dir)
        seconds = time.perf_counter() - start
        with open(os.path.join(run_dir, "history.json")) as handle:
            history = json.load(handle)
        model, config, _ = load_trained_model(run_dir, "last")
        probe = linear_probe(model.backbone, manifest, train_split="train", eval_split="test",
                             epochs=config.evaluation.linear_epochs, lr=config.evaluation.linear_lr,
                             milestones=config.evaluation.linear_milestones, batch_size=256,
                             augment=False)
        results["arms"][arm] = {
            "overrides": ARMS[arm], "train_seconds": round(seconds, 1),
            "history": [{"epoch": r["epoch"], "knn_top1": r["test_knn_top1"], "loss": r["loss"],
                         "confidence": r["confidence"], "max_soft_label": r["max_soft_label"],
                         "contrastive_accuracy": r["contrastive_accuracy"]} for r in history],
            "final_knn_top1": history[-1]["test_knn_top1"], "linear_probe": probe}
        print(arm, "final kNN", history[-1]["test_knn_top1"], "linear", probe, flush=True)
        with open(results_path, "w") as handle:  # partial results survive an interruption
            json.dump(results, handle, indent=2)
    plot(results, os.path.join(args.out, "cifar10_quality.png"))
    print(json.dumps({arm: (info["final_knn_top1"], info["linear_probe"]["top1"])
                      for arm, info in results["arms"].items()}, indent=2))


if __name__ == "__main__":
    main()
