"""``ascl train``: pre-train an ASCL encoder on a prepared dataset with ``model.fit``.

A run directory holds everything a run makes::

    RUN/config.yaml           the resolved configuration
    RUN/checkpoints/          epoch_NNNN.weights.h5 every train.checkpoint_every epochs,
                              last.weights.h5, best.weights.h5 (+ best.json) by kNN top-1
                              on the validation hold-out (never on the test split)
    RUN/backup/               BackupAndRestore state: rerunning the same command resumes here
    RUN/tensorboard/          scalars (every metric, learning rate, kNN), augmented views
    RUN/history.json          one record per epoch, continuous across resumes
    RUN/summary.json          written when the run finishes

Nothing is created before the configuration and the dataset have been checked.
"""

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from pipeline import callbacks as run_callbacks
from pipeline import data, splits
from pipeline.config import ConfigError, dump_config
from pipeline.precision import resolve_mixed_precision
from pipeline.prepared_dataset import load_manifest
from pipeline.run_dir import build_model, load_run_config

class TrainingError(RuntimeError):
    """Training could not finish (divergence, incompatible resume); the message says why."""


def resolve_strategy(name):
    """``auto``: MirroredStrategy over the visible GPUs when there are several, else default.

    ``multi_worker`` must be created before anything initialises TensorFlow's context (any
    op, device listing or dataset), which is why ``train`` resolves the strategy first.
    """
    if name == "auto":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as error:
            if "program startup" not in str(error):
                raise
            raise TrainingError(
                "train.strategy multi_worker must be created before TensorFlow runs anything "
                "in this process; from Python, create "
                "tf.distribute.MultiWorkerMirroredStrategy() at the start of the program and "
                "pass it as train(config, run_dir, strategy=...) (the `ascl train` command "
                "does this itself)") from error
    raise ConfigError(f"train.strategy must be auto, default, mirrored or multi_worker, "
                      f"received {name!r}")


def learning_rate(config, steps_per_epoch):
    """Linear warm-up to the (batch-scaled) base LR, then cosine decay to 0 at the last step."""
    o = config.optimizer
    base = o.lr * (o.batch_size / o.reference_batch_size if o.lr_scaling == "linear" else 1.0)
    total = steps_per_epoch * config.train.epochs
    warmup = min(int(round(o.warmup_epochs * steps_per_epoch)), total - 1)
    if warmup:
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=total - warmup, warmup_target=base, warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(base, decay_steps=total)


def training_selections(config, manifest):
    """``(train, validation)`` ``Selection``s: what pre-training reads and the hold-out
    that chooses ``best`` (None when ``data.validation_size`` is 0)."""
    d = config.data
    try:
        holdout = splits.holdout_count(d.validation_size,
                                       manifest["splits"][d.train_split]["num_examples"])
    except ValueError as error:
        raise ConfigError(str(error)) from error
    train = splits.Selection(d.train_split, holdout=holdout, part="rest", limit=d.train_limit)
    validation = (splits.Selection(d.train_split, holdout=holdout, part="holdout",
                                   limit=d.eval_limit) if holdout else None)
    return train, validation


def _check_dataset(config, manifest, replicas=1):
    for key, split in (("data.train_split", config.data.train_split),
                       ("data.eval_split", config.data.eval_split)):
        if split not in manifest["splits"]:
            raise ConfigError(f"{key} is {split!r} but the dataset at {config.data.dataset} has "
                              f"splits {sorted(manifest['splits'])}")
    data.channel_statistics(manifest)  # a dataset without a train split fails here, clearly
    train_selection, validation = training_selections(config, manifest)
    available = train_selection.count(manifest)
    steps = available // config.optimizer.batch_size
    if steps < 1:
        raise ConfigError(f"optimizer.batch_size {config.optimizer.batch_size} is larger than the "
                          f"{available} training images ({train_selection.description})")
    batch = config.optimizer.batch_size
    if batch % replicas:
        raise ConfigError(f"optimizer.batch_size ({batch}) must be a multiple of the "
                          f"{replicas} replicas of the distribution strategy")
    m = config.model
    split_norms = [key for key, norm in (("model.norm", m.norm),
                                         ("model.projector_norm", m.projector_norm),
                                         ("model.predictor_norm", m.predictor_norm))
                   if norm == "split" and (key != "model.predictor_norm"
                                           or config.ascl.framework == "byol")]
    if split_norms and (batch // replicas) % m.bn_splits:
        raise ConfigError(f"model.bn_splits ({m.bn_splits}) must divide the batch each replica "
                          f"normalises ({', '.join(split_norms)}: split), "
                          f"optimizer.batch_size / replicas = {batch} / {replicas} = "
                          f"{batch // replicas}")
    return steps, train_selection, validation


def _flatten(config_dict):
    return {f"{section}.{key}": value for section, values in config_dict.items()
            for key, value in (values or {}).items()}


# Keys a resumed run may change freely: they alter what is printed, not what is computed.
_PRESENTATION_KEYS = {"train.verbose"}


def _resolve_precision(config, run_dir, strategy=None):
    """``config`` with ``train.mixed_precision: auto`` made concrete (``pipeline.precision``):
    the value of the run being resumed, else this machine's choice, which is logged and, as
    part of ``config.yaml``, recorded for a later resume elsewhere."""
    t = config.train
    if t.mixed_precision != "auto":
        return config
    recorded = (load_run_config(run_dir).train.mixed_precision
                if os.path.exists(os.path.join(run_dir, "config.yaml")) else None)
    policy, reason = resolve_mixed_precision(
        t.mixed_precision, recorded,
        across_workers=isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy))
    print(f"train.mixed_precision auto -> {policy}: {reason}", flush=True)
    return dataclasses.replace(config, train=dataclasses.replace(t, mixed_precision=policy))


def _check_resume(config, run_dir, allow_config_change):
    """Compares ``config`` with the run's recorded one; returns ``{key: [old, new]}``.

    A resumed run continues the recorded schedule, data order and optimiser state, so any
    change except a larger ``train.epochs`` (the schedule is stretched to the new end) is
    refused unless ``allow_config_change``.  The recorded config is read as ``ascl
    evaluate`` reads it, so settings added since the run was made compare as their defaults.
    """
    if not os.path.exists(os.path.join(run_dir, "config.yaml")):
        return {}
    previous = _flatten(load_run_config(run_dir).to_dict())
    current = _flatten(config.to_dict())
    changes = {key: [previous.get(key), current.get(key)] for key in sorted(set(previous)
               | set(current)) if previous.get(key) != current.get(key)
               and key not in _PRESENTATION_KEYS}
    refused = {key: change for key, change in changes.items()
               if not (key == "train.epochs" and (change[0] or 0) <= change[1])}
    if refused and not allow_config_change:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise TrainingError(
            f"{run_dir} holds a run with another configuration ({listed}). Resuming continues "
            f"its schedule, data order and optimiser state, so only a larger train.epochs may "
            f"change; use a new --run-dir, restore the settings, or pass --allow-config-change")
    return changes


def _record_config_change(run_dir, changes, allowed):
    """Appends what changed on resume to ``RUN/config_changes.jsonl``."""
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "changes": changes, "allowed_by": allowed}
    with open(os.path.join(run_dir, "config_changes.jsonl"), "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


def _best_score(checkpoints_dir):
    path = os.path.join(checkpoints_dir, "best.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)["knn_top1"]


def _jit(setting):
    return {"auto": "auto", "on": True, "off": False}[setting]


def is_chief(strategy):
    """Whether this process writes the run's files: TF's own answer (``should_checkpoint``),
    true for every single-process strategy and for the chief of a multi-worker cluster."""
    return strategy.extended.should_checkpoint


@contextlib.contextmanager
def _write_dir(run_dir, chief):
    """The chief writes into ``run_dir``; any other worker into a temporary folder that is
    removed afterwards, as Keras's multi-worker guide has them do (every worker still runs
    every save, so that the workers' steps stay in lock-step)."""
    if chief:
        yield run_dir
        return
    path = tempfile.mkdtemp(prefix="ascl-worker-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def train(config, run_dir, *, strategy=None, extra_callbacks=(), allow_config_change=False):
    """Pre-trains (or resumes) the run in ``run_dir``; returns the summary dict.

    Resuming with a changed configuration is refused (``_check_resume``) unless
    ``allow_config_change``; an accepted change is recorded in ``config_changes.jsonl``.

    In a multi-worker cluster every worker calls this with the same ``run_dir`` (storage they
    share): only the chief writes there (config, history, summary, TensorBoard, checkpoints,
    backups); every worker resumes from the chief's backup.
    """
    t = config.train
    # First: a multi-worker strategy must exist before TensorFlow's context does.
    strategy = strategy or resolve_strategy(t.strategy)
    config = _resolve_precision(config, run_dir, strategy)
    manifest = load_manifest(config.data.dataset)
    steps_per_epoch, train_selection, validation = _check_dataset(
        config, manifest, strategy.num_replicas_in_sync)
    changes = _check_resume(config, run_dir, allow_config_change)
    chief = is_chief(strategy)
    policy = keras.mixed_precision.global_policy()
    try:
        with _write_dir(run_dir, chief) as write_dir:
            return _train(config, run_dir, write_dir, chief, strategy, manifest,
                          steps_per_epoch, train_selection, validation, changes,
                          extra_callbacks, allow_config_change)
    finally:
        # train.mixed_precision is this run's setting, not the process's: evaluation and
        # anything else built afterwards in the same process (`ascl demo`) get the caller's.
        keras.mixed_precision.set_global_policy(policy)


def _train(config, run_dir, write_dir, chief, strategy, manifest, steps_per_epoch,
           train_selection, validation, changes, extra_callbacks, allow_config_change):
    t = config.train
    keras.utils.set_random_seed(t.seed)
    if t.deterministic:
        # Seeds alone fix what is drawn; this also fixes how kernels reduce (and refuses
        # ops with no deterministic kernel). TensorFlow has no public way to turn it off.
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(
        "float32" if t.mixed_precision == "none" else t.mixed_precision)

    names = ("checkpoints", "backup", "tensorboard")
    paths = {name: os.path.join(write_dir, name) for name in names}
    for path in paths.values():
        os.makedirs(path, exist_ok=True)
    if changes and chief:
        _record_config_change(run_dir, changes, "--allow-config-change" if allow_config_change
                              and any(key != "train.epochs" for key in changes)
                              else "a larger train.epochs")
    dump_config(config, os.path.join(write_dir, "config.yaml"))

    # Every worker resumes from the chief's backup, and so skips the same batches.
    chief_backup = os.path.join(run_dir, "backup")
    _, done_epochs = run_callbacks.readable_backup(chief_backup)

    def dataset_fn(input_context=None, skip_steps=done_epochs * steps_per_epoch):
        return data.pretrain_dataset(
            manifest, batch_size=config.optimizer.batch_size, seed=t.seed,
            split=train_selection, input_context=input_context,
            strong_key=config.data.key_view == "strong", blur=config.data.blur,
            crop_scale=(config.data.crop_min_scale, 1.0), flip=config.data.flip,
            shuffle_buffer=config.data.shuffle_buffer, cache=config.data.cache,
            skip_steps=skip_steps)

    if strategy.num_replicas_in_sync > 1:
        dataset = strategy.distribute_datasets_from_function(dataset_fn)
    else:
        dataset = dataset_fn()
    with strategy.scope():
        model = build_model(config, manifest, steps_per_epoch)
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate(config, steps_per_epoch),
                                           momentum=config.optimizer.momentum),
            jit_compile=_jit(t.jit_compile), steps_per_execution=t.steps_per_execution)

    nan_guard = run_callbacks.StopOnNaN()
    limit = config.data.eval_limit
    knn_monitor = run_callbacks.KNNMonitor(
        manifest, bank=splits.Selection(config.data.train_split, holdout=train_selection.holdout,
                                        part="rest" if validation else "all", limit=limit),
        validation=validation, test=splits.Selection(config.data.eval_split, limit=limit),
        every=t.knn_every, epochs=t.epochs, k=config.evaluation.knn_k,
        temperature=config.evaluation.knn_temperature, batch_size=config.evaluation.batch_size)
    best_checkpoint = (run_callbacks.BestCheckpoint(
        os.path.join(paths["checkpoints"], "best.weights.h5"),
        split_description=validation.description,
        restore_dir=os.path.join(run_dir, "checkpoints")) if validation else None)
    guard = lambda callback: run_callbacks.UnlessDiverged(callback, nan_guard)  # noqa: E731
    callback_list = [
        nan_guard,
        # before the kNN monitor, so that epoch time is training time only
        run_callbacks.RunStats(steps_per_epoch * config.optimizer.batch_size),
        guard(knn_monitor),
        *([guard(best_checkpoint)] if best_checkpoint else []),  # after the monitor: its score
        guard(run_callbacks.EpochCheckpoint(
            os.path.join(paths["checkpoints"], "epoch_{epoch:04d}.weights.h5"),
            every=t.checkpoint_every)),
        run_callbacks.HistoryFile(os.path.join(write_dir, "history.json")),
        keras.callbacks.TensorBoard(paths["tensorboard"], update_freq="epoch"),
        # Last: an epoch is backed up only once everything above has recorded it, so a
        # kill in between makes the resumed run redo (and re-record) that epoch instead of
        # skipping its history record.
        guard(run_callbacks.ClusterBackupAndRestore(paths["backup"], restore_dir=chief_backup)),
        *extra_callbacks,
    ]
    if t.view_images:
        preview = next(iter(dataset_fn(skip_steps=0).take(1)))
        callback_list.append(run_callbacks.ViewImages(
            {k: v.numpy() for k, v in preview.items()}, paths["tensorboard"], t.view_images,
            manifest))

    model.fit(dataset, epochs=t.epochs, steps_per_epoch=steps_per_epoch, callbacks=callback_list,
              shuffle=False,  # tf.data already shuffles; silences Keras's warning
              verbose=t.verbose)
    if nan_guard.message:
        raise TrainingError(nan_guard.message)
    model.save_weights(os.path.join(paths["checkpoints"], "last.weights.h5"))
    with open(os.path.join(write_dir, "history.json")) as handle:
        history = json.load(handle)
    checkpoints = os.path.join(run_dir, "checkpoints")  # the chief's, for every worker
    summary = {
        "run_dir": run_dir, "epochs": t.epochs, "replicas": strategy.num_replicas_in_sync,
        "chief": chief, "final": history[-1] if history else None,
        "trained_on": train_selection.description,
        "best_val_knn_top1": _best_score(paths["checkpoints"]),
        "checkpoints": {"last": os.path.join(checkpoints, "last.weights.h5"),
                        **({"best": os.path.join(checkpoints, "best.weights.h5")}
                           if os.path.exists(os.path.join(paths["checkpoints"],
                                                          "best.weights.h5")) else {})},
    }
    if chief:
        with open(os.path.join(run_dir, "summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
    return summary
