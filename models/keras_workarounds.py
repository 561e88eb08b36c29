"""Workarounds for Keras bugs that the models hit, in one place.

Each names the upstream bug it works around and has a test that fails once Keras fixes it
(``tests/models/test_multi_worker.py``, ``tests/models/test_keras_workarounds.py``), so that
the workaround gets deleted instead of lingering.

keras-team/keras#20585 (open in Keras 3.15 and 3.16.dev): under ``MultiWorkerMirroredStrategy``
across worker processes, Keras's TensorFlow trainer averages values across replicas with
``strategy.reduce("MEAN", value, axis=0)``, which fails there on structured values and on
scalars.  It hits ``fit`` twice:

* at the start, ``_maybe_symbolic_build`` draws a batch and reduces it only to trace the
  model symbolically: ``BuildsOnlyTheOptimizer`` skips that (these models' variables exist
  from construction);
* at every step, the logs are reduced: ``reducible_logs`` hands them over as 1-vectors,
  whose mean over replicas is the scalar a single-worker strategy logs.

keras-team/keras#23553 (open in Keras 3.15): an ``ExportArchive`` that ``track``s a layer
saves each of its weights twice in the SavedModel, as the tracked Keras variable and as the
tf.Variable its endpoints capture (different objects, so the checkpoint keeps both): twice
the size on disk and in a server's memory.  ``untracked_export_archive`` is the archive the
serving export uses, tracking nothing.
"""

import keras
import tensorflow as tf


def across_workers(strategy):
    """Whether ``strategy`` spans several worker processes: the case the bug is about."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(tasks) for job, tasks in cluster.items() if job in ("chief", "worker")) > 1


class BuildsOnlyTheOptimizer:
    """A ``keras.Model`` mix-in: ``fit`` builds the optimiser and skips Keras's symbolic
    build, which fails across workers (keras-team/keras#20585), so ``fit`` can start on a
    cluster.  Only for models whose variables all exist once they are constructed."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        del iterator, data_batch
        with self.distribute_strategy.scope():
            if self.optimizer is not None and not self.optimizer.built:
                self.optimizer.build(self.trainable_variables)
        self._post_build()


def reducible_logs(results, strategy):
    """``{name: scalar}`` logs as Keras can reduce them under ``strategy``: 1-vectors across
    workers (keras-team/keras#20585), unchanged everywhere else."""
    if not across_workers(strategy):
        return results
    return {name: tf.reshape(value, [1]) for name, value in results.items()}


def untracked_export_archive():
    """A ``keras.export.ExportArchive`` to add endpoints to without ``track``ing any layer:
    it saves the variables its endpoints capture, each once (tracking would save them twice,
    keras-team/keras#23553).  Endpoints over Keras layers need nothing else; the revived
    SavedModel's ``variables`` list is empty (its checkpoint holds them)."""
    return keras.export.ExportArchive()
