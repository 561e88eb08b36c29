"""Keras callbacks for pre-training runs: kNN monitor, history file, views, divergence."""

import hashlib
import json
import os
import shutil
import tempfile
import time

import h5py
import keras
import numpy as np
import tensorflow as tf

from pipeline import data, evaluate
from pipeline.run_dir import BEST_INFO


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
    must not forget its best so far, so it starts from the score in ``best.json``.
    """

    MONITOR = "val_knn_top1"

    def __init__(self, path, *, split_description, restore_dir=None):
        """``restore_dir``: where a resumed run's ``best.json`` is (the chief's
        checkpoints folder when this worker writes elsewhere); ``path``'s folder by default.
        Every worker must start from the same best score, or they would save on different
        epochs."""
        self.info_path = os.path.join(os.path.dirname(path), BEST_INFO)
        previous_path = os.path.join(restore_dir or os.path.dirname(path), BEST_INFO)
        previous = None
        if os.path.exists(previous_path):
            with open(previous_path) as handle:
                previous = json.load(handle)["knn_top1"]
        super().__init__(path, monitor=self.MONITOR, mode="max", save_best_only=True,
                         save_weights_only=True, initial_value_threshold=previous)
        self.split_description = split_description

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.MONITOR not in logs:
            return
        before = self.best
        super().on_epoch_end(epoch, logs)
        if self.best != before:
            with open(self.info_path, "w") as handle:
                json.dump({"epoch": epoch + 1, "knn_top1": float(logs[self.MONITOR]),
                           "split": self.split_description}, handle)


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

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.records = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.records is None:
            records = []
            if os.path.exists(self.path):
                with open(self.path) as handle:
                    records = json.load(handle)
            self.records = [r for r in records if r["epoch"] <= epoch]

    def on_epoch_end(self, epoch, logs=None):
        record = {"epoch": epoch + 1}
        record.update({key: float(value) for key, value in (logs or {}).items()})
        self.records.append(record)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(self.records, handle, indent=1)
        os.replace(tmp, self.path)


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


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """``TerminateOnNaN`` that remembers where and why, so the run can fail with a clear message."""

    def __init__(self):
        super().__init__()
        self.message = None

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.message = (
                f"training diverged: the loss became {loss} at step {batch} of epoch "
                f"{getattr(self, '_epoch', 0) + 1}; lower optimizer.lr, raise ascl.t1, or use "
                f"mixed_precision: none. The last checkpoint and backup are kept.")
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


class UnlessDiverged(keras.callbacks.Callback):
    """Runs ``callback`` as it is, except its end-of-step and end-of-epoch hooks once the NaN
    guard has fired.

    When ``StopOnNaN`` stops training, Keras still runs every callback's ``on_epoch_end``:
    ``BackupAndRestore`` would back up the NaN weights as the next epoch (a rerun would
    resume from them), ``ModelCheckpoint`` could write them as an epoch checkpoint or as
    ``best``, and the kNN monitor would score them.  Wrapped, they leave the last good
    state as it is.
    """

    def __init__(self, callback, nan_guard):
        super().__init__()
        self.callback, self.nan_guard = callback, nan_guard

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)

    def on_train_begin(self, logs=None):
        self.callback.on_train_begin(logs)

    def on_train_end(self, logs=None):
        self.callback.on_train_end(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.callback.on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self.callback.on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        if not self.nan_guard.message:
            self.callback.on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if not self.nan_guard.message:
            self.callback.on_epoch_end(epoch, logs)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _backup_epoch(weights, metadata):
    """The epoch of a consistent backup pair, or None when either file is missing, damaged
    or from another save than its partner.

    Pairs written by ``ClusterBackupAndRestore`` carry the weights' sha256 in their
    metadata; pairs of the stock callback (no digest) must at least read back in full.
    """
    if not (os.path.exists(weights) and os.path.exists(metadata)):
        return None
    try:
        with open(metadata) as handle:
            info = json.load(handle)
        epoch = int(info["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if "weights_sha256" in info:
        return epoch if _sha256(weights) == info["weights_sha256"] else None
    try:
        with h5py.File(weights, "r") as handle:
            handle.visititems(lambda _, item: item[()] if isinstance(item, h5py.Dataset)
                              else None)
    except (OSError, KeyError, ValueError, RuntimeError):
        return None
    return epoch


def _backup_paths(backup_dir, suffix=""):
    return (os.path.join(backup_dir, "latest.weights.h5" + suffix),
            os.path.join(backup_dir, "training_metadata.json" + suffix))


def readable_backup(backup_dir):
    """``(weights path or None, epochs done)`` of the backup a resumed run restores: the
    latest pair when it is whole and consistent, else the previous one (``*.bkp``), else
    none.  The one policy for the trainer (to skip the batches already trained on) and for
    ``ClusterBackupAndRestore`` (to load them)."""
    for suffix in ("", ".bkp"):
        weights, metadata = _backup_paths(backup_dir, suffix)
        epoch = _backup_epoch(weights, metadata)
        if epoch is not None:
            return weights, epoch
    return None, 0


def _replace_with_copy(source, target):
    shutil.copyfile(source, target + ".tmp")
    os.replace(target + ".tmp", target)


class ClusterBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` for runs that may span several workers and be killed any time.

    Where the stock callback falls short:

    * it restores from and saves to one folder.  In a cluster every worker must restore
      the *chief's* backup (``restore_dir``, on storage they share) but only the chief may
      write there; other workers save to their own ``backup_dir``, as Keras's multi-worker
      guide has them do.  Restoring never writes.
    * a kill in the middle of a save can leave weights and metadata of different epochs, or
      a half-written file, which the stock callback may restore, or copy over the good
      previous backup at its next save.  Here every file is written to a temporary name and
      renamed into place, the metadata records the weights' sha256, restoring takes the
      newest *consistent* pair (``readable_backup``), and only a consistent latest pair
      becomes the previous one.

    Keeps two backups and never deletes them.
    """

    def __init__(self, backup_dir, *, restore_dir=None):
        super().__init__(backup_dir, double_checkpoint=True, delete_checkpoint=False)
        self.restore_dir = restore_dir or backup_dir

    def on_train_begin(self, logs=None):
        weights, epoch = readable_backup(self.restore_dir)
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
        self.model._initial_epoch = epoch  # what the stock callback sets

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        latest = _backup_paths(self.backup_dir)
        if _backup_epoch(*latest) is not None:
            for path, previous in zip(latest, _backup_paths(self.backup_dir, ".bkp")):
                _replace_with_copy(path, previous)
        saving = os.path.join(self.backup_dir, "saving.weights.h5")
        self.model.save_weights(saving, overwrite=True)
        digest = _sha256(saving)
        os.replace(saving, self._weights_path)
        with open(self._training_metadata_path + ".tmp", "w") as handle:
            json.dump({"epoch": self._current_epoch, "batch": self._last_batch_seen,
                       "weights_sha256": digest}, handle)
        os.replace(self._training_metadata_path + ".tmp", self._training_metadata_path)
