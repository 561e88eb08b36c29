#!/usr/bin/env bash
# GPU run: ResNet-18 ASCL on CIFAR-10, reference recipe at batch 512, mixed precision + XLA.
#
#   bash bench/gpu_cifar10.sh [EPOCHS]        (default 40; sized for about 10 minutes on one H100)
#
# Needs the project installed with a GPU build of TensorFlow 2.21 (`make test` installs the
# CPU-capable wheel, which uses CUDA when the machine has it). Prepares the data with the
# project's Beam job, trains, and prints per evaluated epoch: epoch seconds, images/s and kNN
# top-1. Results go to $OUT when set (the device tool's output folder), else bench/results/gpu.
set -euo pipefail
EPOCHS=${1:-40}
RESULTS=${OUT:-bench/results/gpu}
WORK=${WORK:-/tmp/ascl_gpu_cifar10}
TAR=${CIFAR_TAR:-../shared/datasets/cifar10-jpg.tar.gz}
PY=${PYTHON:-python3}
mkdir -p "$WORK" "$RESULTS"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RESULTS/gpu.txt" || true

if [ ! -d "$WORK/cifar10/train" ]; then
  mkdir -p "$WORK/cifar10" && tar xzf "$TAR" -C "$WORK/cifar10"
fi
$PY -m beam_jobs.prepare --source "folder:$WORK/cifar10" --output "$WORK/prepared" --overwrite \
    --direct_num_workers "$(nproc)" --direct_running_mode multi_processing
echo "data prepared after $(( $(date +%s) - start )) s"

$PY -m pipeline.cli train --config configs/cifar10_resnet18.yaml --run-dir "$WORK/run" \
    --set data.dataset="$WORK/prepared" --set optimizer.batch_size=512 \
    --set train.knn_every=5 --set train.checkpoint_every=1000 --set train.verbose=2 \
    --mixed-precision mixed_bfloat16 --jit-compile on --epochs "$EPOCHS" \
    | tee "$RESULTS/train.log"

$PY - "$WORK/run/history.json" "$RESULTS" <<'PYEOF'
import json, sys
history = json.load(open(sys.argv[1]))
print(f"{'epoch':>5} {'seconds':>8} {'images/s':>9} {'kNN top-1':>9}")
for r in history:
    knn = f"{r['test_knn_top1']:.4f}" if "test_knn_top1" in r else ""
    print(f"{r['epoch']:>5} {r['epoch_seconds']:>8.2f} {r['images_per_second']:>9.0f} {knn:>9}")
json.dump(history, open(f"{sys.argv[2]}/history.json", "w"), indent=1)
PYEOF
echo "total $(( $(date +%s) - start )) s"
