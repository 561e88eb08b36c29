"""Benchmark: what the soft-label purity metric adds to a training step.

    python bench/purity_metric_cost.py [--repeats 3]

``ascl train`` feeds labels, so its step also computes ``soft_label_purity`` (the share of
each target row's queue mass on keys of the query's class); ``bench/epoch_speed.py``'s
step-only measurement feeds no labels.  This times that metric alone, as the step runs it
(``MomentumEncoderModel._purity`` under ``tf.function``), at batch 256 and queue 4,096 with
10 classes and some unlabelled queue slots, median milliseconds per call.
"""

import argparse
import statistics
import time

import tensorflow as tf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from models.momentum_encoder import MomentumEncoderModel

    mass = tf.nn.softmax(5.0 * tf.random.stateless_normal([args.batch, args.queue], [0, 0])) * 0.7
    labels = tf.random.stateless_uniform([args.batch], [0, 1], 0, 10, tf.int64)
    queue_labels = tf.concat([tf.fill([100], tf.constant(-1, tf.int64)),
                              tf.random.stateless_uniform([args.queue - 100], [0, 2], 0, 10,
                                                          tf.int64)], 0)
    purity = tf.function(MomentumEncoderModel._purity)
    purity(mass, labels, queue_labels)  # trace
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.calls):
            result = purity(mass, labels, queue_labels)
        result[0].numpy()
        times.append((time.perf_counter() - start) / args.calls * 1e3)
    print(f"purity metric: median {statistics.median(times):.2f} ms a step "
          f"({', '.join(f'{t:.2f}' for t in times)}), batch {args.batch}, queue {args.queue}")


if __name__ == "__main__":
    main()
