"""One small training problem run by two topologies that must agree: a process with two
logical devices under ``MirroredStrategy``, and two worker processes under
``MultiWorkerMirroredStrategy`` (``python -m tests.models.distributed_case OUT``).

Both train on the same global batches, each split the same way between the two replicas:
replica ``i`` gets rows ``[i * n, (i + 1) * n)`` of every global batch.
"""

import sys

import keras
import numpy as np
import tensorflow as tf

SHAPE = (8, 8, 3)
GLOBAL_BATCH = 8
STEPS = 6


def build_model(kind="ascl"):
    from models import ASCLModel, BYOLModel, build_backbone, projection_head

    keras.utils.set_random_seed(0)
    backbone = build_backbone("small_cnn", input_shape=SHAPE, norm="batch", widths=(8, 16))
    projector = projection_head(backbone.feature_dim, hidden_dims=(16,), output_dim=8)
    if kind == "byol":
        model = BYOLModel(backbone, projector, num_neighbors=3, seed=0, weight_decay=5e-4,
                          label_purity=True)
    else:
        model = ASCLModel(backbone, projector, memory_size=20, num_neighbors=3, seed=0,
                          weight_decay=5e-4, label_purity=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def global_batches():
    rng = np.random.default_rng(7)
    strong = rng.random((STEPS, GLOBAL_BATCH, *SHAPE), dtype=np.float32)
    weak = rng.random((STEPS, GLOBAL_BATCH, *SHAPE), dtype=np.float32)
    labels = rng.integers(0, 3, (STEPS, GLOBAL_BATCH))
    return strong, weak, labels


def dataset_fn(input_context):
    """Per-replica batches: every replica's slice of each global batch, in the order the
    strategy hands elements to its replicas (round robin over a worker's devices)."""
    strong, weak, labels = global_batches()
    replicas = input_context.num_replicas_in_sync
    n = GLOBAL_BATCH // replicas
    local = replicas // input_context.num_input_pipelines
    first = input_context.input_pipeline_id * local
    rows = [(t, r) for t in range(STEPS) for r in range(first, first + local)]
    pick = lambda array: np.stack([array[t, r * n:(r + 1) * n] for t, r in rows])  # noqa: E731
    return tf.data.Dataset.from_tensor_slices((pick(strong), pick(weak), pick(labels)))


KINDS = ("ascl", "byol")


def train(strategy, kind):
    """``(model, history)`` after ``STEPS`` steps of ``kind`` under ``strategy``."""
    with strategy.scope():
        model = build_model(kind)
    history = model.fit(strategy.distribute_datasets_from_function(dataset_fn),
                        steps_per_epoch=STEPS, epochs=1, verbose=0).history
    return model, history


def _local(weight, replica):
    """This process's copy of ``weight``, or replica ``replica``'s when it holds several."""
    copies = getattr(weight.value, "values", None)
    if replica is None or copies is None or len(copies) == 1:
        return keras.ops.convert_to_numpy(weight)
    return copies[replica].numpy()


def state(model, history, kind, replica=None):
    """Every weight in ``model.weights`` order (key encoder, queue and pointer included; paths
    repeat between the two encoders), replica ``replica``'s copy where replicas hold their own
    (batch-norm moving statistics), their paths, and the history, as NumPy arrays."""
    arrays = {f"{kind}/w{i}": _local(w, replica) for i, w in enumerate(model.weights)}
    arrays[f"{kind}/paths"] = np.array([w.path for w in model.weights])
    arrays.update({f"{kind}/history/{key}": np.array(value) for key, value in history.items()})
    return arrays


def main(out):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before anything else runs
    arrays = {}
    for kind in KINDS:
        arrays.update(state(*train(strategy, kind), kind))
    from models import ASCLModel, build_backbone, projection_head

    with strategy.scope():  # an unseeded model would draw its own permutations per worker
        backbone = build_backbone("small_cnn", input_shape=SHAPE, widths=(8, 16))
        try:
            ASCLModel(backbone, projection_head(16, output_dim=8), memory_size=20, seed=None)
            arrays["seedless_refused"] = np.array(False)
        except ValueError as error:
            arrays["seedless_refused"] = np.array("`seed` must be set" in str(error))
    arrays.update(upstream_bug_20585(strategy))
    np.savez(out, **arrays)


def upstream_bug_20585(strategy):
    """Whether Keras still fails across workers without each ``models.keras_workarounds``
    workaround (keras-team/keras#20585): the error of a one-step ``fit`` of a model with
    Keras's own behaviour put back, or "" where it trains."""
    from models import ASCLModel, build_backbone, keras_workarounds, projection_head

    class StockSymbolicBuild(ASCLModel):
        _maybe_symbolic_build = keras.Model._maybe_symbolic_build

    class StockLogs(ASCLModel):
        def _metric_logs(self):
            return {metric.name: metric.result() for metric in self.metrics}

    assert keras_workarounds.across_workers(strategy)
    errors = {}
    for name, kind in (("symbolic_build", StockSymbolicBuild), ("scalar_logs", StockLogs)):
        with strategy.scope():
            backbone = build_backbone("small_cnn", input_shape=SHAPE, norm="batch",
                                      widths=(8, 16))
            model = kind(backbone, projection_head(backbone.feature_dim, hidden_dims=(16,),
                                                   output_dim=8), memory_size=20, seed=0)
            model.compile(optimizer=keras.optimizers.SGD(0.1))
        try:
            model.fit(strategy.distribute_datasets_from_function(dataset_fn), steps_per_epoch=1,
                      epochs=1, verbose=0)
            errors[f"bug_20585/{name}"] = np.array("")
        except Exception as error:  # noqa: BLE001 - whatever it raises is the bug's
            errors[f"bug_20585/{name}"] = np.array(f"{type(error).__name__}: {error}"[:2000])
    return errors


if __name__ == "__main__":
    main(sys.argv[1])
