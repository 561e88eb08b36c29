"""Keras callbacks for pre-training runs: kNN monitor, checkpoints, history, backup, views,
divergence."""

import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from pipeline import data, evaluate


class KNNMonitor(keras.callbacks.Callback):
    """Every ``every`` epochs (and at the last), kNN top-1 of the backbone's features.

    Two query sets against one bank (the training split without its
    validation hold-out):

    * ``val_knn_top1``, on the validation hold-out: the only number that
      chooses the ``best`` checkpoint (``BestCheckpoint`` watches it);
    * ``test_knn_top1``, on the test split: a curve to look at, never used
      to choose anything.

    Both go into the epoch's logs, so History, TensorBoard (``val_`` under the
    validation run) and the history file get them.
    """

    def __init__(self, manifest, *, bank, validation, test, every, epochs, k, temperature,
                 batch_size):
        super().__init__()
        self.manifest, self.bank, self.validation, self.test = manifest, bank, validation, test
        self.every, self.epochs, self.k, self.temperature = every, epochs, k, temperature
        self.batch_size = batch_size

    def _features(self, selection):
        return evaluate.embed(self.model.backbone, data.eval_dataset(
            self.manifest, selection, batch_size=self.batch_size))

    def on_epoch_end(self, epoch, logs=None):
        if not self.every or ((epoch + 1) % self.every and epoch + 1 != self.epochs):
            return
        bank = self._features(self.bank)
        num_classes = len(self.manifest["class_names"])
        score = lambda queries: evaluate.knn_accuracy(  # noqa: E731
            bank, self._features(queries), k=self.k, temperature=self.temperature,
            num_classes=num_classes)["top1"]
        results = {}
        if self.validation is not None:
            results["val_knn_top1"] = score(self.validation)
        if self.test is not None:
            results["test_knn_top1"] = score(self.test)
        if logs is not None:
            logs.update(results)
        print(f"\nepoch {epoch + 1}: kNN top-1 " + ", ".join(
            f"{value:.4f} on {'validation' if key.startswith('val') else 'test'}"
            for key, value in results.items()))


class BestCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint(monitor="val_knn_top1", mode="max", save_best_only=True)`` plus
    ``best.json`` (epoch, score, the split that chose it).

    Where the stock callback falls short: the kNN score exists only on the epochs the
    monitor runs, and the stock callback warns on every other epoch; and a resumed run
    must not forget its best so far, so it starts from the score in ``best.json`` (the
    chief's: every worker must start from the same best score, or they would save on
    different epochs).
    """

    MONITOR = "val_knn_top1"

    def __init__(self, run, *, split_description):
        previous = run.read_best()
        super().__init__(run.checkpoint_to_write("best"), monitor=self.MONITOR, mode="max",
                         save_best_only=True, save_weights_only=True,
                         initial_value_threshold=previous["knn_top1"] if previous else None)
        self.run, self.split_description = run, split_description

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.MONITOR not in logs:
            return
        before = self.best
        super().on_epoch_end(epoch, logs)
        if self.best != before:
            self.run.write_best(epoch=epoch + 1, knn_top1=float(logs[self.MONITOR]),
                                split=self.split_description)


class EpochCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` of the weights every ``every`` epochs of the run.

    Where the stock callback falls short: ``save_freq=N`` counts batches from the start of
    each ``fit`` call, so a resumed run would save on epochs shifted by where it resumed.
    """

    def __init__(self, path, every):
        super().__init__(path, save_weights_only=True, save_freq="epoch")
        self.every = every

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            super().on_epoch_end(epoch, logs)


class RunStats(keras.callbacks.Callback):
    """Puts the learning rate, the epoch's wall time and its images/s into each epoch's logs."""

    def __init__(self, images_per_epoch):
        super().__init__()
        self.images_per_epoch = images_per_epoch
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["learning_rate"] = float(np.asarray(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        if self._start is not None:
            seconds = time.perf_counter() - self._start
            logs["epoch_seconds"] = seconds
            logs["images_per_second"] = self.images_per_epoch / seconds


class HistoryFile(keras.callbacks.Callback):
    """``history.json``: one record per finished epoch, continuous across resumed runs.

    Records from an earlier, interrupted run are kept up to the epoch the
    resumed run starts from, and rewritten after every epoch.
    """

    def __init__(self, run):
        super().__init__()
        self.run = run
        self.records = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.records is None:
            self.records = [r for r in self.run.read_history() if r["epoch"] <= epoch]

    def on_epoch_end(self, epoch, logs=None):
        record = {"epoch": epoch + 1}
        record.update({key: float(value) for key, value in (logs or {}).items()})
        self.records.append(record)
        self.run.write_history(self.records)


class ViewImages(keras.callbacks.Callback):
    """Writes a few (strong, weak) pairs to TensorBoard when training starts."""

    def __init__(self, batch, log_dir, count, manifest):
        super().__init__()
        self.batch, self.log_dir, self.count = batch, log_dir, count
        self.mean, self.std = data.channel_statistics(manifest)

    def _pixels(self, views):
        return np.clip((views[: self.count] * self.std + self.mean) / 255.0, 0.0, 1.0)

    def on_train_begin(self, logs=None):
        if not self.count:
            return
        pairs = np.concatenate([self._pixels(self.batch["strong_view"]),
                                self._pixels(self.batch["weak_view"])], axis=2)
        writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        with writer.as_default():
            tf.summary.image("views/strong_left_weak_right", pairs, step=0,
                             max_outputs=self.count)
        writer.close()


class Diverged(RuntimeError):
    """Training diverged; raised out of ``fit`` by ``StopOnNaN``."""


class StopOnNaN(keras.callbacks.Callback):
    """Stops training at the first step whose loss is not finite, and at the end of an epoch
    whose weights are not all finite, by raising ``Diverged``.

    Raising, rather than setting ``stop_training`` as ``TerminateOnNaN`` does, is what keeps
    diverged weights out of every file: Keras runs every callback's ``on_epoch_end`` after
    ``stop_training``, so the backup, the epoch checkpoint and ``best`` would save the NaN
    weights (and a rerun would resume from them).  An exception ends ``fit`` on the spot, and
    the last good backup, checkpoints and ``best`` stay as they were.  The weights are checked
    too because the logged loss is computed before each step's update: a last step that
    makes the weights NaN leaves the epoch's loss finite.  First in the callback list, so
    that it runs before any callback that saves.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _diverged(self, what):
        return Diverged(
            f"training diverged: {what} of epoch {getattr(self, '_epoch', 0) + 1}; lower "
            f"optimizer.lr, raise ascl.t1, or use mixed_precision: none. The last checkpoint "
            f"and backup are kept.")

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            raise self._diverged(f"the loss became {loss} at step {batch}")

    def on_epoch_end(self, epoch, logs=None):
        bad = [w.path for w in self.model.weights
               if keras.backend.is_float_dtype(w.dtype)
               and not np.all(np.isfinite(keras.ops.convert_to_numpy(w)))]
        if bad:
            raise self._diverged(f"{len(bad)} weights ({bad[0]}, ...) are not finite at the "
                                 f"end")


class Backup(keras.callbacks.Callback):
    """Restores the run's backup when training starts and backs up after every epoch.

    ``BackupAndRestore`` restores from and saves to one folder; in a cluster every worker
    must restore the *chief's* backup, on storage they share, but only the chief may write
    there (``RunDir``: reads from ``path``, writes to ``write_path``).  And a kill in the
    middle of its save can leave weights and metadata of different epochs, or a half-written
    file, which it may restore, or copy over the good previous backup at its next save;
    ``RunDir.write_backup`` and ``readable_backup`` rule both out.

    Restoring sets the weights only: the trainer passes the epochs done to ``fit`` as
    ``initial_epoch`` (from the same ``readable_backup``) and skips their batches.
    """

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_train_begin(self, logs=None):
        weights, _ = self.run.readable_backup()
        if weights is None:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        if weights.endswith(".weights.h5"):
            self.model.load_weights(weights)
        else:  # the previous backup, *.bkp: Keras loads only files named *.weights.h5
            with tempfile.TemporaryDirectory() as folder:
                copy = os.path.join(folder, "previous.weights.h5")
                shutil.copyfile(weights, copy)
                self.model.load_weights(copy)

    def on_epoch_end(self, epoch, logs=None):
        self.run.write_backup(self.model, epoch + 1)
