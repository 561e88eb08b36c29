"""Benchmark: the bfloat16 export against PyTorch on the same CPU, side by side.

    python bench/serving_vs_pytorch.py --torch-python /path/to/venv-with-torch/bin/python \\
        [--json bench/results/serving_vs_pytorch.json]

Issue 24 set its batch-1 target (5 ms) from PyTorch eager with bfloat16 autocast on one host;
absolute times move between hosts and sessions, so this measures the comparison itself:
ResNet-18 (CIFAR stem, 512 -> 2048 -> 128 projector, freshly initialised; speed does not
depend on the weights) exported as ``ascl export`` does in float32 and bfloat16, timed
through ``embed_pixels`` (uint8 pixels in, no decoding) and ``serving_default`` (PNG bytes),
and the same network in PyTorch, uint8 in, normalised in the timed call, the L2-normalised
128-d projection out (the export returns it beside the 512-d features), in four forms:

* ``eager_float32``: eager, ``inference_mode``, NCHW;
* ``eager_bfloat16_autocast``: eager with ``torch.autocast`` and channels_last, the issue's
  arm: autocast casts the float32 weights again on every call;
* ``eager_bfloat16_weights``: eager, the model cast to bfloat16 once, channels_last;
* ``frozen_bfloat16``: that model traced and ``torch.jit.freeze``-d (batch norm folded,
  weights constant), the closest counterpart of the bfloat16 export.

PyTorch is not a dependency of this project: it runs in another interpreter
(``--torch-python``, a virtual environment with ``torch`` and ``numpy``), as a worker that
this process drives over a pipe. The two alternate in ``--rounds`` rounds of
``calls / rounds`` calls per arm and batch size, so a slow phase of a shared machine hits
both; each waits while the other runs. Batch 1 and 32: latency p50 / p99.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # serving_latency, beside it

SIZES = (1, 32)


# ---------------------------------------------------------------------------- PyTorch side
def _torch_worker():
    """Reads ``calls`` per line on stdin, answers one JSON line of latencies per arm."""
    import copy

    import torch
    from torch import nn
    from torch.nn import functional

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                           nn.BatchNorm2d(cout))
                             if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            out = functional.relu(self.bn1(self.conv1(x)))
            return functional.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    def resnet18_cifar():
        layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 128)]
        return nn.Sequential(*layers).eval()

    torch.manual_seed(0)
    model = resnet18_cifar()
    weights_bfloat16 = copy.deepcopy(model).to(torch.bfloat16, memory_format=torch.channels_last)
    autocast_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    mean = torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1)
    std = torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1)
    rng = np.random.default_rng(0)
    images = {size: torch.from_numpy(rng.integers(0, 256, (size, 3, 32, 32), dtype=np.uint8))
              for size in SIZES}

    def standardised(batch, dtype=torch.float32):
        return ((batch.float() - mean) / std).to(dtype).contiguous(
            memory_format=torch.channels_last)

    with torch.inference_mode():
        frozen_bfloat16 = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(
            weights_bfloat16, standardised(images[1], torch.bfloat16))))

    def embed_eager_float32(batch):
        with torch.inference_mode():
            return functional.normalize(model((batch.float() - mean) / std), dim=1).numpy()

    def embed_eager_bfloat16_autocast(batch):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return functional.normalize(autocast_model(standardised(batch)).float(),
                                        dim=1).numpy()

    def embed_eager_bfloat16_weights(batch):
        with torch.inference_mode():
            return functional.normalize(
                weights_bfloat16(standardised(batch, torch.bfloat16)).float(), dim=1).numpy()

    def embed_frozen_bfloat16(batch):
        with torch.inference_mode():
            return functional.normalize(
                frozen_bfloat16(standardised(batch, torch.bfloat16)).float(), dim=1).numpy()

    arms = {"pytorch/eager_float32": embed_eager_float32,
            "pytorch/eager_bfloat16_autocast": embed_eager_bfloat16_autocast,
            "pytorch/eager_bfloat16_weights": embed_eager_bfloat16_weights,
            "pytorch/frozen_bfloat16": embed_frozen_bfloat16}
    for arm in arms.values():  # warm-up (a frozen module optimises on its first calls)
        for size in SIZES:
            for _ in range(5):
                arm(images[size])
    print(json.dumps({"version": torch.__version__, "threads": torch.get_num_threads()}),
          flush=True)
    for line in sys.stdin:
        calls = int(line)
        answer = {}
        for name, arm in arms.items():
            for size in SIZES:
                times = []
                for _ in range(calls):
                    start = time.perf_counter()
                    arm(images[size])
                    times.append(1000 * (time.perf_counter() - start))
                answer[f"{name}/{size}"] = times
        print(json.dumps(answer), flush=True)


# ---------------------------------------------------------------------------- TF side
def _tf_arms(folder):
    """The exports' timed calls by name, and the loaded SavedModels they need kept alive."""
    import tensorflow as tf
    from serving_latency import load_export

    rng = np.random.default_rng(0)
    pixels = {size: tf.constant(rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8))
              for size in SIZES}
    pngs = {size: tf.stack([tf.io.encode_png(image) for image in pixels[size]])
            for size in SIZES}
    arms, loaded_exports = {}, []
    for precision in ("float32", "bfloat16"):
        loaded, _ = load_export("resnet18", precision, folder)
        loaded_exports.append(loaded)
        signatures = loaded.signatures
        arms[f"tf_export/{precision}/embed_pixels"] = (
            lambda size, s=signatures["embed_pixels"]: s(images=pixels[size])["embedding"].numpy())
        if precision == "bfloat16":
            arms["tf_export/bfloat16/serving_default"] = (
                lambda size, s=signatures["serving_default"]:
                s(image_bytes=pngs[size])["embedding"].numpy())
    return arms, loaded_exports


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-python",
                        help="an interpreter with torch and numpy installed (required)")
    parser.add_argument("--calls", type=int, default=300,
                        help="calls per arm and batch size, over all rounds")
    parser.add_argument("--rounds", type=int, default=6,
                        help="alternations between TensorFlow and PyTorch")
    parser.add_argument("--json", default=None, help="where to write the results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _torch_worker()
    if not args.torch_python:
        parser.error("--torch-python is required: an interpreter with torch and numpy")
    per_round = max(1, args.calls // args.rounds)
    worker = subprocess.Popen([args.torch_python, os.path.abspath(__file__), "--worker"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with tempfile.TemporaryDirectory() as folder:
        try:
            torch_info = json.loads(worker.stdout.readline())
            arms, _loaded_exports = _tf_arms(folder)
            times = _alternate(arms, worker, per_round, args.rounds)
        finally:
            worker.stdin.close()
            worker.wait()
    import tensorflow as tf

    from pipeline.precision import cpu_flags

    results = {"command": "python bench/serving_vs_pytorch.py --torch-python PYTHON "
                          f"--calls {per_round * args.rounds} --rounds {args.rounds}",
               "torch": torch_info, "tensorflow": tf.__version__,
               "tf_threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                              "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
               "cpu_flags": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"}),
               "ms": {}}
    for key, values in sorted(times.items()):
        results["ms"][key] = {"p50": round(float(np.percentile(values, 50)), 2),
                              "p99": round(float(np.percentile(values, 99)), 2)}
    ms = results["ms"]
    results["ratios_p50"] = {
        f"batch{size}": {
            f"{ours.replace('/', '_')}_over_{theirs}": round(
                ms[f"tf_export/{ours}/{size}"]["p50"] / ms[f"pytorch/{theirs}/{size}"]["p50"], 3)
            for ours, theirs in (
                ("bfloat16/embed_pixels", "eager_bfloat16_autocast"),
                ("bfloat16/embed_pixels", "eager_bfloat16_weights"),
                ("bfloat16/embed_pixels", "frozen_bfloat16"),
                ("bfloat16/serving_default", "eager_bfloat16_autocast"),
                ("bfloat16/serving_default", "frozen_bfloat16"),
                ("float32/embed_pixels", "eager_float32"))}
        for size in SIZES}
    print(json.dumps(results, indent=2))
    if args.json:
        from beam_jobs.atomic_json import write_json

        write_json(args.json, results, indent=2)


def _alternate(arms, worker, per_round, rounds):
    """Latencies (ms) by ``arm/batch size``: each round times every export here, then asks
    the PyTorch worker for the same number of calls of each of its arms."""
    for arm in arms.values():  # warm-up
        for size in SIZES:
            for _ in range(5):
                arm(size)
    times = {}
    for _ in range(rounds):
        for name, arm in arms.items():
            for size in SIZES:
                for _ in range(per_round):
                    start = time.perf_counter()
                    arm(size)
                    times.setdefault(f"{name}/{size}", []).append(
                        1000 * (time.perf_counter() - start))
        worker.stdin.write(f"{per_round}\n")
        worker.stdin.flush()
        for key, values in json.loads(worker.stdout.readline()).items():
            times.setdefault(key, []).extend(values)
    return times


if __name__ == "__main__":
    main()
