"""Benchmark: ASCL against MoCo on real CIFAR-10 with the faithful recipe, several seeds.

    python bench/cifar10_quality.py --data .data/cifar10-prepared [--parts a] [--dry-run]

Prepare the data first with the project's own Beam job:
    mkdir -p .data/cifar10 && tar xzf ../shared/datasets/cifar10-jpg.tar.gz -C .data/cifar10
    ascl prepare --source folder:.data/cifar10 --output .data/cifar10-prepared

Every (part, arm, seed) is its own training run (``RUNS/<part>/<arm>-seed<N>``) with its
own result file (``OUT/cifar10_quality/<part>-<arm>-seed<N>.json``), so the benchmark spans
as many sittings as it needs: rerunning skips finished runs and resumes an interrupted one
from its last epoch (the run's backup).  After each run the summary
(``OUT/cifar10_quality.json``, a ``summary`` keyed by arm) and the plot are rewritten from
every result file present.

Parts, in priority order (issue 10):

* ``a``: 20 epochs, ``configs/cifar10_small_cpu.yaml`` (small CNN, the reference's data
  order, augmentations, lr 0.03 at batch 256 with 5 warm-up epochs then cosine, M=4096,
  t1=0.1, t2=0.05, K=5) pre-trained on all 50,000 training images
  (``data.validation_size=0``, as the reference); arms ``moco``, ``ascl`` (weak key view),
  ``ascl_strong_key``, ``ahcl``, ``hard``, and the BYOL form ``byol`` and ``ascl_byol``
  (``ascl.framework=byol``: predictor, in-batch neighbours, same optimiser and schedule);
  seeds 0-2 for moco and ascl, seed 0 otherwise;
* ``b``: the same for 60 epochs, moco and ascl, seed 0;
* ``c``: a stronger encoder, the CIFAR ResNet-20 of He et al. (16/32/64 channels, 0.27 M
  parameters) in place of the small CNN, 20 epochs, moco and ascl, seed 0.
* ``d``: the BYOL diagnosis (issue 22): plain BYOL on part a's recipe (the reference's),
  20 epochs, seed 0, then one change at a time: batch norm in the projector's hidden
  layer, lr x4 and x2, the symmetric loss, BYOL's cosine EMA schedule (0.99 -> 1).  It
  chooses a recipe, so it pre-trains on 45,000 images and chooses on the kNN of the 5,000
  held out (``val_knn_top1``); the test curve is logged beside it, as everywhere.  Its
  plot's lower panel is the collapse monitor (``projection_spread``: ~1 spread out, 0
  collapsed) instead of purity.
* ``e``: after issue 22, a diagnosis of the BYOL form's soft labels (not a default): with
  the project recipe on part d's holdout, ``ascl_byol`` with today's K=5 and with K=1
  (about a fifth of the neighbour mass), seed 0, against part d's ``byol_bn_lr_x8`` (plain
  BYOL, the same recipe and holdout).

Every arm shares every setting but the ones it names.  kNN top-1 (k=200, t=0.1) on the
10,000 test images after every epoch is a curve, never used to choose anything: each run
reports its last epoch.  The linear probe is the config's (30 epochs on centre-view
features, lr 10 at batch 256, drops at 60%/80%).  For every arm but moco the history has
``soft_label_purity`` per epoch: the share of each target row's queue mass on keys of the
query's class, measured on the training stream (labels never enter the loss).
"""

import argparse
import json
import os
import statistics
import sys
import time

ARMS = {
    "moco": ["ascl.mode=moco"],
    "ascl": ["ascl.mode=ascl", "data.key_view=weak"],
    "ascl_strong_key": ["ascl.mode=ascl", "data.key_view=strong"],
    "ahcl": ["ascl.mode=ahcl"],
    "hard": ["ascl.mode=hard"],
    # the BYOL form: its defaults (ascl.byol_recipe project, pipeline.config.BYOL_RECIPES),
    # and the reference's recipe, which the first part a rows measured (issue 11)
    "byol": ["ascl.framework=byol", "ascl.mode=byol"],
    "ascl_byol": ["ascl.framework=byol", "ascl.mode=ascl"],
    "byol_reference_recipe": ["ascl.framework=byol", "ascl.mode=byol",
                              "ascl.byol_recipe=reference"],
    "ascl_byol_reference_recipe": ["ascl.framework=byol", "ascl.mode=ascl",
                                   "ascl.byol_recipe=reference"],
    # issue 14: the same run as ascl seed 0 under mixed_bfloat16 (quality within 0.5 points?)
    "ascl_bf16": ["ascl.mode=ascl", "train.mixed_precision=mixed_bfloat16"],
    # part d, the BYOL diagnosis: plain BYOL, the reference's recipe, one change at a time
    **{name: ["ascl.framework=byol", "ascl.mode=byol", "ascl.byol_recipe=reference", *change]
       for name, change in {
           "byol_reference": [],
           "byol_projector_bn": ["model.projector_norm=batch"],
           "byol_lr_x4": ["optimizer.lr=0.12"],
           "byol_symmetric": ["ascl.symmetric=true"],
           "byol_lr_x2": ["optimizer.lr=0.06"],
           "byol_cosine_ema": ["ascl.momentum_schedule=cosine"],
           # the two changes that helped alone, together
           "byol_bn_lr_x4": ["model.projector_norm=batch", "optimizer.lr=0.12"],
           # the learning rate was still rising at x4: one step further, with BN
           "byol_bn_lr_x8": ["model.projector_norm=batch", "optimizer.lr=0.24"],
           "byol_bn_lr_x16": ["model.projector_norm=batch", "optimizer.lr=0.48"]}.items()},
    # part e, after issue 22 (a diagnosis, not a default): the BYOL form's soft labels with
    # less neighbour mass (K=1) beside today's K=5, both on the project recipe, on validation
    "ascl_byol_k5": ["ascl.framework=byol", "ascl.mode=ascl"],
    "ascl_byol_k1": ["ascl.framework=byol", "ascl.mode=ascl", "ascl.num_neighbors=1"],
}
PARTS = {
    "a": {"epochs": 20, "runs": [("moco", 0), ("ascl", 0), ("moco", 1), ("ascl", 1),
                                 ("moco", 2), ("ascl", 2), ("byol_reference_recipe", 0),
                                 ("ascl_byol_reference_recipe", 0), ("ascl_bf16", 0),
                                 ("ascl_strong_key", 0), ("ahcl", 0), ("hard", 0),
                                 ("byol", 0), ("ascl_byol", 0), ("byol", 1), ("ascl_byol", 1),
                                 ("byol", 2), ("ascl_byol", 2)]},
    "b": {"epochs": 60, "runs": [("moco", 0), ("ascl", 0)]},
    "c": {"epochs": 20, "runs": [("moco", 0), ("ascl", 0)],
          "overrides": ["model.backbone=resnet20"]},
    # part d chooses a recipe, so it holds 5,000 training images out and chooses on their
    # kNN (val_knn_top1), never on the test curve it also logs
    "d": {"epochs": 20, "runs": [("byol_reference", 0), ("byol_projector_bn", 0),
                                 ("byol_lr_x4", 0), ("byol_symmetric", 0), ("byol_lr_x2", 0),
                                 ("byol_cosine_ema", 0), ("byol_bn_lr_x4", 0),
                                 ("byol_bn_lr_x8", 0), ("byol_bn_lr_x16", 0)],
          "validation_size": 5000},
    # part e: does the BYOL form lose to plain BYOL through how much of each target row goes
    # to other images? Plain BYOL on this holdout and recipe is part d's byol_bn_lr_x8.
    "e": {"epochs": 20, "runs": [("ascl_byol_k5", 0), ("ascl_byol_k1", 0)],
          "validation_size": 5000},
}
CONFIG = "configs/cifar10_small_cpu.yaml"


def run_name(part, arm, seed):
    return f"{part}-{arm}-seed{seed}"


def overrides(args, part, arm, seed):
    validation = PARTS[part].get("validation_size", 0)
    return [f"data.dataset={args.data}", f"train.epochs={PARTS[part]['epochs']}",
            f"train.seed={seed}", f"data.validation_size={validation}", "train.knn_every=1",
            "train.checkpoint_every=1000", "train.verbose=2",
            "train.mixed_precision=none",  # every recorded run is float32 (auto may pick bf16)
            *PARTS[part].get("overrides", []), *ARMS[arm]]


def train_one(args, part, arm, seed, result_path):
    from beam_jobs.dataset_format import load_manifest
    from pipeline.config import load_config
    from pipeline.evaluate import linear_probe
    from pipeline.run_dir import load_trained_model
    from pipeline.train import train

    run_dir = os.path.join(args.runs, part, f"{arm}-seed{seed}")
    config = load_config(CONFIG, overrides(args, part, arm, seed))
    start = time.perf_counter()
    train(config, run_dir)
    seconds = time.perf_counter() - start
    with open(os.path.join(run_dir, "history.json")) as handle:
        history = json.load(handle)
    model, config, _ = load_trained_model(run_dir, "last")
    e = config.evaluation
    probe = linear_probe(model.backbone, load_manifest(args.data), train_split="train",
                         eval_split="test", epochs=e.linear_epochs, lr=e.linear_lr,
                         milestones=e.linear_milestones, batch_size=e.linear_batch_size,
                         augment=e.linear_augment, seed=seed)
    keys = ("loss", "confidence", "max_soft_label", "contrastive_accuracy", "soft_label_purity",
            "projection_spread", "learning_rate", "epoch_seconds")
    result = {"part": part, "arm": arm, "seed": seed, "config": CONFIG,
              "overrides": overrides(args, part, arm, seed),
              "seconds_this_sitting": round(seconds, 1),
              "train_seconds": round(sum(r.get("epoch_seconds", 0.0) for r in history), 1),
              "history": [{"epoch": r["epoch"], "knn_top1": r["test_knn_top1"],
                           **({"val_knn_top1": r["val_knn_top1"]} if "val_knn_top1" in r else {}),
                           **{k: r[k] for k in keys if k in r}} for r in history],
              "knn_top1_final": history[-1]["test_knn_top1"], "linear_probe": probe,
              **({"val_knn_top1_final": history[-1]["val_knn_top1"]}
                 if "val_knn_top1" in history[-1] else {})}
    os.makedirs(os.path.dirname(result_path), exist_ok=True)
    _dump_json(result, result_path)
    return result


def _dump_json(value, path):
    from beam_jobs.atomic_json import write_json  # TensorFlow: imported when needed

    write_json(path, value, indent=1)


def _mean_std(values):
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def load_results(results_dir):
    """Every finished run's result file, in file-name order."""
    results = []
    for name in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        if name.endswith(".json"):
            with open(os.path.join(results_dir, name)) as handle:
                results.append(json.load(handle))
    return results


def summarize(results):
    """The summary of finished runs (``load_results``): per arm (and part) lists per seed,
    mean, std."""
    summary = {}
    for result in results:
        key = result["arm"] if result["part"] == "a" else f"{result['arm']}_{result['part']}"
        summary.setdefault(key, []).append(result)
    out = {}
    for key, runs in sorted(summary.items()):
        runs.sort(key=lambda r: r["seed"])
        finals = [r["knn_top1_final"] for r in runs]
        epochs = min(len(r["history"]) for r in runs)
        per_epoch = [[r["history"][i]["knn_top1"] for r in runs] for i in range(epochs)]
        mean, std = _mean_std(finals)
        out[key] = {
            "part": runs[0]["part"], "arm": runs[0]["arm"], "seeds": [r["seed"] for r in runs],
            "knn_top1_final": finals, "knn_top1_mean": mean, "knn_top1_std": std,
            "per_epoch_mean": [statistics.fmean(v) for v in per_epoch],
            "per_epoch_std": [_mean_std(v)[1] for v in per_epoch],
            "per_epoch_min": [min(v) for v in per_epoch],
            "per_epoch_max": [max(v) for v in per_epoch],
            "linear_final": [r["linear_probe"]["top1"] for r in runs],
            **({"val_knn_top1_final": [r["val_knn_top1_final"] for r in runs]}
               if all("val_knn_top1_final" in r for r in runs) else {}),
            **({"soft_label_purity_per_epoch_mean": [
                statistics.fmean(r["history"][i]["soft_label_purity"] for r in runs)
                for i in range(epochs)]}
               if all("soft_label_purity" in h for r in runs for h in r["history"]) else {}),
            **({"projection_spread_per_epoch_mean": [
                statistics.fmean(r["history"][i]["projection_spread"] for r in runs)
                for i in range(epochs)]}
               if all("projection_spread" in h for r in runs for h in r["history"]) else {}),
            "train_seconds": [r["train_seconds"] for r in runs],
        }
    return out


def seconds_per_run(results):
    """Per finished run: ``train_seconds``, its training epochs' seconds over all sittings
    (from the per-epoch times in its history; no kNN monitor, no probe), and
    ``last_sitting_seconds``, the wall time of the ``train`` call in the sitting that finished
    it (kNN monitor included; earlier sittings of a resumed run and the linear probe not)."""
    return {run_name(r["part"], r["arm"], r["seed"]): {
        "train_seconds": r["train_seconds"], "last_sitting_seconds": r["seconds_this_sitting"]}
        for r in results}


PART_TITLES = {"a": "small CNN, 20 epochs", "b": "small CNN, 60 epochs",
               "c": "ResNet-20, 20 epochs", "d": "BYOL diagnosis, small CNN, 20 epochs",
               "e": "BYOL form's neighbour mass, small CNN, 20 epochs"}
SPREAD_PARTS = ("d",)  # parts whose lower panel is the collapse monitor


def plot(summary, raw_pixel, path):
    """One column per part.  Top: mean kNN curve per arm, min-max band across seeds.
    Bottom: soft-label purity per epoch (mean over seeds) of the arms that measure it, the
    share of each target row's queue mass on keys of the query's class (chance: 0.1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    parts = sorted({info["part"] for info in summary.values()})
    arms = sorted({info["arm"] for info in summary.values()})
    palette = plt.get_cmap("tab10")
    colour = {arm: palette(index % 10) for index, arm in enumerate(arms)}  # same in every part
    columns = max(len(parts), 1)
    figure, axes = plt.subplots(2, columns, figsize=(6.2 * columns, 8.4), squeeze=False,
                                sharex="col", gridspec_kw={"height_ratios": [3, 2]})
    for column, part in enumerate(parts):
        knn_axis, purity_axis = axes[0][column], axes[1][column]
        for _arm, info in summary.items():
            if info["part"] != part:
                continue
            epochs = range(1, len(info["per_epoch_mean"]) + 1)
            seeds = len(info["seeds"])
            label = f"{info['arm']} ({seeds} seed{'s' if seeds > 1 else ''})"
            knn_axis.plot(epochs, [100 * v for v in info["per_epoch_mean"]], label=label,
                          color=colour[info["arm"]])
            if seeds > 1:
                knn_axis.fill_between(epochs, [100 * v for v in info["per_epoch_min"]],
                                      [100 * v for v in info["per_epoch_max"]], alpha=0.2,
                                      color=colour[info["arm"]])
            purity = info.get("projection_spread_per_epoch_mean" if part in SPREAD_PARTS
                              else "soft_label_purity_per_epoch_mean")
            if purity:
                purity_axis.plot(range(1, len(purity) + 1), purity, label=label,
                                 color=colour[info["arm"]])
        if raw_pixel is not None:
            knn_axis.axhline(100 * raw_pixel, color="gray", linestyle="--", label="raw-pixel kNN")
        knn_axis.set_ylabel("kNN top-1 on CIFAR-10 test (%)")
        knn_axis.set_title(f"part {part}: {PART_TITLES.get(part, part)}")
        spread = part in SPREAD_PARTS
        if spread:
            purity_axis.axhline(1.0, color="gray", linestyle="--",
                                label="random unit vectors (1)")
        else:
            purity_axis.axhline(0.1, color="gray", linestyle="--", label="chance (10 classes)")
        if not purity_axis.get_lines()[:-1]:  # only the reference line
            purity_axis.text(0.5, 0.6, "no finished arm of this part measures "
                             + ("the spread" if spread else "purity"),
                             transform=purity_axis.transAxes, ha="center", fontsize=9)
        purity_axis.set_xlabel("epoch")
        purity_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        purity_axis.set_ylabel("projection spread (collapse monitor)" if spread
                               else "soft-label purity (training stream)")
        for axis in (knn_axis, purity_axis):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    figure.suptitle("CIFAR-10 on a 2-core CPU: kNN mean over seeds with min-max band; "
                    "purity mean over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_summary(args, results_dir, base, command=None):
    """Writes cifar10_quality.json and the plot; ``command`` is the benchmark's command line
    to record (default: this process's)."""
    results = load_results(results_dir)
    summary = summarize(results)
    order = {}
    if os.path.exists(os.path.join(args.out, "data_order.json")):
        with open(os.path.join(args.out, "data_order.json")) as handle:
            order = {run["label"]: run for run in json.load(handle)["runs"]}
    full = order.get("faithful_order_full_split", {})
    report = {
        "command": command or "python bench/cifar10_quality.py " + " ".join(sys.argv[1:]),
        "config": CONFIG, "parts": {p: v["epochs"] for p, v in PARTS.items()},
        "raw_pixel_knn": base,
        "largest_class_share": {
            "per_256_batch_mean": full.get("mean_largest_class_share_per_batch"),
            "iid_per_256_batch_mean": full.get("iid_mean_largest_class_share_per_batch"),
            "max_in_4096_window": full.get("max_largest_class_share_per_window"),
            "measured_by": "bench/data_order.py --label faithful_order_full_split "
                           "--set data.validation_size=0"},
        "seconds_per_run": seconds_per_run(results),
        "summary": summary,
    }
    _dump_json(report, os.path.join(args.out, "cifar10_quality.json"))
    plot_path = os.path.join(args.out, "cifar10_quality.png")
    plot(summary, (base or {}).get("top1"), plot_path + ".tmp.png")
    os.replace(plot_path + ".tmp.png", plot_path)


def markdown_table(summary, epochs=(1, 5, 10, 20)):
    """README table: kNN top-1 mean +- std over seeds at some epochs, and the linear probe."""
    def cell(values, std=None):
        mean = 100 * statistics.fmean(values) if std is None else 100 * values
        if std is None:
            std = 100 * statistics.stdev(values) if len(values) > 1 else None
        else:
            std = 100 * std
        return f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")

    header = ("| part | arm | seeds | " + " | ".join(f"kNN ep {e}" for e in epochs)
              + " | kNN last | linear |")
    lines = [header, "|" + "---|" * (5 + len(epochs))]
    for _key, info in sorted(summary.items(), key=lambda item: (item[1]["part"], item[1]["arm"])):
        seeds = len(info["seeds"])
        per_epoch = []
        for epoch in epochs:
            if epoch <= len(info["per_epoch_mean"]):
                per_epoch.append(cell(info["per_epoch_mean"][epoch - 1],
                                      info["per_epoch_std"][epoch - 1] if seeds > 1 else None)
                                 if seeds > 1 else f"{100 * info['per_epoch_mean'][epoch - 1]:.1f}")
            else:
                per_epoch.append("")
        lines.append(f"| {info['part']} | {info['arm']} | {seeds} | " + " | ".join(per_epoch)
                     + f" | {cell(info['knn_top1_final'])} | {cell(info['linear_final'])} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".data/cifar10-prepared")
    parser.add_argument("--parts", default="a", help="comma-separated parts to run: a, b, c, d, e")
    parser.add_argument("--runs", default="runs/cifar10_quality")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--max-runs", type=int, default=0,
                        help="stop after this many runs in this sitting (0: all)")
    parser.add_argument("--dry-run", action="store_true", help="list the plan and exit")
    parser.add_argument("--table", action="store_true",
                        help="print the README table of the finished runs and exit")
    parser.add_argument("--summarize", action="store_true",
                        help="rewrite cifar10_quality.json and the plot from the finished runs "
                             "and exit (the raw-pixel baseline must have been computed)")
    args = parser.parse_args()
    if args.table and args.summarize:
        parser.error("--table and --summarize are separate actions: pass one")
    results_dir = os.path.join(args.out, "cifar10_quality")
    if args.table:
        print(markdown_table(summarize(load_results(results_dir))))
        return
    if args.summarize:
        if not load_results(results_dir):
            parser.error(f"no finished runs in {results_dir}: nothing to summarize")
        base, command = None, None
        base_path = os.path.join(args.out, "cifar10_raw_pixel_knn.json")
        if os.path.exists(base_path):
            with open(base_path) as handle:
                base = json.load(handle)
        else:
            print(f"warning: {base_path} is missing; the summary has no raw-pixel baseline")
        report_path = os.path.join(args.out, "cifar10_quality.json")
        if os.path.exists(report_path):
            with open(report_path) as handle:
                command = json.load(handle).get("command")  # the command that ran the runs
        write_summary(args, results_dir, base, command)
        return

    plan = [(part, arm, seed) for part in args.parts.split(",") for arm, seed in
            PARTS[part]["runs"]]
    todo = [item for item in plan if not os.path.exists(
        os.path.join(results_dir, run_name(*item) + ".json"))]
    print(f"{len(plan)} runs planned, {len(plan) - len(todo)} finished, {len(todo)} to go",
          flush=True)
    if args.dry_run:
        for item in todo:
            print("  to do:", run_name(*item))
        return

    from beam_jobs.dataset_format import load_manifest
    from pipeline.evaluate import raw_pixel_knn

    base_path = os.path.join(args.out, "cifar10_raw_pixel_knn.json")
    if os.path.exists(base_path):
        with open(base_path) as handle:
            base = json.load(handle)
    else:
        base = raw_pixel_knn(load_manifest(args.data), train_split="train", eval_split="test",
                             k=200, temperature=0.1, batch_size=1000)
        os.makedirs(results_dir, exist_ok=True)
        _dump_json(base, base_path)
    seconds_per_epoch = []
    for done, (part, arm, seed) in enumerate(todo[:args.max_runs or None]):
        start = time.perf_counter()
        result = train_one(args, part, arm, seed,
                           os.path.join(results_dir, run_name(part, arm, seed) + ".json"))
        elapsed = time.perf_counter() - start
        seconds_per_epoch.append(elapsed / PARTS[part]["epochs"])
        left = sum(PARTS[p]["epochs"] for p, _, _ in todo[done + 1:])
        print(f"[{run_name(part, arm, seed)}] kNN {result['knn_top1_final']:.4f}, linear "
              f"{result['linear_probe']['top1']:.4f}, {elapsed / 60:.1f} min this sitting; "
              f"about {left * statistics.fmean(seconds_per_epoch) / 3600:.1f} h for the "
              f"{len(todo) - done - 1} runs left", flush=True)
        write_summary(args, results_dir, base)
    write_summary(args, results_dir, base)


if __name__ == "__main__":
    main()
