"""A training run's folder: the one owner of its paths, and of its reads and writes.

A run folder holds::

    RUN/config.yaml           the resolved configuration (every key, so a resume keeps it)
    RUN/config_changes.jsonl  what a resume was allowed to change, and by what
    RUN/checkpoints/          epoch_NNNN.weights.h5 every train.checkpoint_every epochs,
                              last.weights.h5, best.weights.h5 + best.json (the epoch with
                              the highest kNN top-1 on the validation hold-out, never on test)
    RUN/backup/               latest.weights.h5 + training_metadata.json and the previous
                              pair (*.bkp): rerunning the same command resumes from them
    RUN/tensorboard/          scalars, augmented views, the embedding projector
    RUN/history.json          one record per epoch, continuous across resumes
    RUN/summary.json          written when the run finishes
    RUN/evaluation.json       written by ``ascl evaluate``

Every JSON file is written whole or not at all (``beam_jobs.atomic_json``), so a kill never
leaves a truncated ``best.json`` or summary behind.  In a cluster every worker reads the
chief's folder (``path``) and writes into its own (``write_path``: the chief's own folder,
or a temporary one for any other worker, as Keras's multi-worker guide has them do).

``ascl evaluate``, ``ascl export`` and the trainer all get a run's model and checkpoints
here, so that none of them has to import the trainer.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

import tensorflow as tf
import yaml

from beam_jobs.atomic_json import read_json, write_json
from beam_jobs.dataset_format import load_manifest
from beam_jobs.errors import InputError, MissingInput
from models import ASCLModel, BYOLModel, build_backbone, prediction_head, projection_head
from models.catalog import CatalogError
from pipeline.config import ConfigError, dump_config, from_dict


def build_model(config, manifest, steps_per_epoch=None, *, initial_weights=False):
    """The model a config describes (``ASCLModel`` for ``ascl.framework`` moco, ``BYOLModel``
    for byol), for the dataset's image shape, in the current strategy scope.

    ``steps_per_epoch`` sets the run's length for a momentum schedule; a model built to
    evaluate or export needs none."""
    m, a = config.model, config.ascl
    schedule = dict(momentum_schedule=a.momentum_schedule,
                    momentum_steps=config.train.epochs * steps_per_epoch
                    if steps_per_epoch else None)
    try:
        backbone = build_backbone(
            m.backbone, input_shape=tuple(manifest["image_shape"]), stem=m.stem, norm=m.norm,
            bn_splits=m.bn_splits, widths=m.cnn_widths, args=m.backbone_args,
            pretrained=m.pretrained, preset=m.preset,
            # pretrained weights only to start training: a trained run's checkpoint replaces them
            load_weights=initial_weights)
    except CatalogError as err:  # a user's choice of network the catalogue cannot serve
        raise ConfigError(f"model.backbone {m.backbone}: {err}") from err
    projector = projection_head(backbone.feature_dim, hidden_dims=tuple(m.projector_hidden),
                                output_dim=m.projector_dim, norm=m.projector_norm,
                                bn_splits=m.bn_splits)
    if a.framework == "byol":
        predictor = prediction_head(m.projector_dim, hidden_dims=tuple(m.predictor_hidden),
                                    norm=m.predictor_norm, bn_splits=m.bn_splits)
        return BYOLModel(backbone, projector, predictor, momentum=a.momentum, t2=a.t2,
                         num_neighbors=a.num_neighbors, mode=a.mode, symmetric=a.symmetric,
                         seed=config.train.seed, **schedule,
                         weight_decay=config.optimizer.weight_decay,
                         label_purity=a.mode == "ascl")  # plain BYOL has no neighbour mass
    return ASCLModel(backbone, projector, memory_size=a.memory_size, momentum=a.momentum,
                     t1=a.t1, t2=a.t2, num_neighbors=a.num_neighbors, mode=a.mode,
                     shuffle_keys=a.shuffle_keys, seed=config.train.seed, **schedule,
                     weight_decay=config.optimizer.weight_decay,
                     label_purity=a.mode != "moco")  # moco targets put no mass on the queue


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunDir:
    """The paths of one run folder and every read and write of its files.

    Args:
      path: the run folder, which every process reads (the chief's, in a cluster).
      write_path: where this process writes (default ``path``; see ``for_process``).
    """

    CHECKPOINTS, BACKUP, TENSORBOARD = "checkpoints", "backup", "tensorboard"

    def __init__(self, path, write_path=None):
        self.path = path
        self.write_path = write_path or path

    @classmethod
    @contextlib.contextmanager
    def for_process(cls, path, chief):
        """A ``RunDir`` whose writes go to ``path`` for the chief, and for any other worker
        to a temporary folder removed afterwards (every worker still runs every save, so
        that the workers' steps stay in lock-step)."""
        if chief:
            yield cls(path)
            return
        own = tempfile.mkdtemp(prefix="ascl-worker-")
        try:
            yield cls(path, own)
        finally:
            shutil.rmtree(own, ignore_errors=True)

    def _read(self, *parts):
        return os.path.join(self.path, *parts)

    def _write(self, *parts):
        return os.path.join(self.write_path, *parts)

    def make_folders(self):
        for name in (self.CHECKPOINTS, self.BACKUP, self.TENSORBOARD):
            os.makedirs(self._write(name), exist_ok=True)

    # ------------------------------------------------------------------ configuration
    @property
    def config_path(self):
        return self._read("config.yaml")

    def has_config(self):
        """Whether a run was started here (its config is the first file a run writes)."""
        return os.path.exists(self.config_path)

    def read_config(self):
        """The validated ``Config`` the run was trained with."""
        if not self.has_config():
            raise MissingInput(f"{self.path} is not a training run: {self.config_path} "
                               f"does not exist")
        with open(self.config_path) as handle:
            raw = yaml.safe_load(handle) or {}
        try:
            return from_dict(raw)
        except ConfigError as error:
            raise ConfigError(f"{self.config_path}: {error}") from error

    def write_config(self, config):
        dump_config(config, self._write("config.yaml"))

    def record_config_change(self, record):
        """Appends one resume's changes to ``config_changes.jsonl`` (the chief's only)."""
        with open(self._write("config_changes.jsonl"), "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ history, summary
    @property
    def history_path(self):
        """This process's ``history.json`` (the one it writes)."""
        return self._write("history.json")

    def read_history(self):
        """This process's epoch records, ``[]`` before the first epoch ends."""
        return read_json(self.history_path) if os.path.exists(self.history_path) else []

    def write_history(self, records):
        write_json(self.history_path, records)

    def read_summary(self):
        """The finished run's summary, or None while it has not finished."""
        path = self._read("summary.json")
        return read_json(path) if os.path.exists(path) else None

    def write_summary(self, summary):
        write_json(self._write("summary.json"), summary, indent=2)

    @property
    def evaluation_path(self):
        return self._read("evaluation.json")

    # ------------------------------------------------------------------ checkpoints
    @property
    def tensorboard(self):
        return self._write(self.TENSORBOARD)

    def checkpoint_to_write(self, name):
        """Where this process saves checkpoint ``name`` (``last``, ``best``,
        ``epoch_{epoch:04d}``)."""
        return self._write(self.CHECKPOINTS, f"{name}.weights.h5")

    def checkpoint(self, checkpoint):
        """The weights file of ``best``, ``last`` or a path; a clear error when it does not
        exist."""
        if checkpoint not in ("best", "last"):
            if not os.path.exists(checkpoint):
                raise MissingInput(f"checkpoint {checkpoint} does not exist (pass "
                                   f"--checkpoint last, best or the path of a weights file)")
            if not checkpoint.endswith(".weights.h5"):
                raise InputError(f"checkpoint {checkpoint} is not a Keras weights file "
                                 f"(*.weights.h5, as `ascl train` writes them)")
            return checkpoint
        path = self._read(self.CHECKPOINTS, f"{checkpoint}.weights.h5")
        if not os.path.exists(path):
            if checkpoint == "best":
                raise MissingInput(
                    f"{self.path} has no best checkpoint: `best` is chosen by kNN on the "
                    f"validation hold-out of the training split, and this run had none "
                    f"(data.validation_size 0 or train.knn_every 0) or has not reached a kNN "
                    f"evaluation yet; use --checkpoint last")
            raise MissingInput(f"checkpoint {path} does not exist (run `ascl train` to "
                                    f"the end first, or pass --checkpoint best or a weights "
                                    f"path)")
        return path

    def read_best(self):
        """``{"epoch", "knn_top1", "split"}`` of the run's ``best`` so far (the chief's), or
        None before the first kNN evaluation."""
        path = self._read(self.CHECKPOINTS, "best.json")
        return read_json(path) if os.path.exists(path) else None

    def write_best(self, *, epoch, knn_top1, split):
        write_json(self._write(self.CHECKPOINTS, "best.json"),
                   {"epoch": epoch, "knn_top1": knn_top1, "split": split}, indent=None)

    def checkpoint_info(self, checkpoint):
        """What a report says about the weights it used: which checkpoint, its epoch, and
        what chose it."""
        info = {"name": checkpoint, "path": self.checkpoint(checkpoint)}
        if checkpoint == "best":
            best = self.read_best()
            if best is None or "split" not in best:
                raise MissingInput(f"{self.path} has best.weights.h5 but no whole "
                                   f"checkpoints/best.json recording what chose it; use "
                                   f"--checkpoint last, or the weights path")
            info.update(epoch=best["epoch"], selected_by=f"highest kNN top-1 on {best['split']}",
                        selection_knn_top1=best["knn_top1"])
        elif checkpoint == "last":
            summary = self.read_summary()
            if summary is not None:
                info["epoch"] = summary["epochs"]
            info["selected_by"] = "none: the weights after the last epoch"
        else:
            info["selected_by"] = "given by path"
        return info

    # ------------------------------------------------------------------ backups
    def _backup_pair(self, folder, suffix=""):
        return (os.path.join(folder, self.BACKUP, "latest.weights.h5" + suffix),
                os.path.join(folder, self.BACKUP, "training_metadata.json" + suffix))

    @staticmethod
    def _backup_epoch(weights, metadata):
        """The epoch of a consistent backup pair, or None when either file is missing,
        damaged, or from another save than its partner (the metadata records the weights'
        sha256)."""
        if not (os.path.exists(weights) and os.path.exists(metadata)):
            return None
        try:
            info = read_json(metadata)
            epoch, digest = int(info["epoch"]), info["weights_sha256"]
        except (OSError, tf.errors.OpError, ValueError, KeyError, TypeError):
            return None
        return epoch if _sha256(weights) == digest else None

    def readable_backup(self):
        """``(weights path or None, epochs done)`` of the chief's backup a resumed run
        restores: the latest pair when it is whole and consistent, else the previous one
        (``*.bkp``), else none.  The one policy for the trainer (to skip the epochs and
        batches already trained) and for the backup callback (to load them)."""
        for suffix in ("", ".bkp"):
            weights, metadata = self._backup_pair(self.path, suffix)
            epoch = self._backup_epoch(weights, metadata)
            if epoch is not None:
                return weights, epoch
        return None, 0

    def write_backup(self, model, epochs_done):
        """Backs up ``model``'s weights after ``epochs_done`` epochs, so that a kill at any
        moment leaves a consistent pair to restore: every file is written to a temporary name
        and renamed into place, and only a consistent latest pair becomes the previous one."""
        latest = self._backup_pair(self.write_path)
        os.makedirs(os.path.dirname(latest[0]), exist_ok=True)
        if self._backup_epoch(*latest) is not None:
            for path, previous in zip(latest, self._backup_pair(self.write_path, ".bkp")):
                shutil.copyfile(path, previous + ".tmp")
                os.replace(previous + ".tmp", previous)
        saving = os.path.join(os.path.dirname(latest[0]), "saving.weights.h5")
        model.save_weights(saving, overwrite=True)
        digest = _sha256(saving)
        os.replace(saving, latest[0])
        write_json(latest[1], {"epoch": epochs_done, "weights_sha256": digest}, indent=None)


def load_trained_model(run_dir, checkpoint="last"):
    """``(model, config, manifest)`` of a run, weights from ``best``, ``last`` or a path."""
    run = RunDir(run_dir)
    config = run.read_config()
    manifest = load_manifest(config.data.dataset)
    path = run.checkpoint(checkpoint)
    model = build_model(config, manifest)
    try:
        model.load_weights(path)
    except ValueError as error:  # Keras: another model's weights, or not a weights file
        raise InputError(f"checkpoint {path} does not fit the model of {run_dir}: "
                         f"{error}") from error
    return model, config, manifest
