"""``ascl train``: pre-train an ASCL encoder on a prepared dataset with ``model.fit``.

``train`` reads as its steps: plan (the validated dataset and the selections it trains and
chooses on), build (strategy, precision policy, model), callbacks (in one order, each with
why), ``fit``, summary.  What a run folder holds, and every read and write of it, is
``pipeline.run_dir.RunDir``'s.  Nothing is created before the configuration and the dataset
have been checked.
"""

import dataclasses
import datetime
import os
import re
import typing

import keras
import tensorflow as tf

from beam_jobs.dataset_format import load_manifest
from pipeline import callbacks as run_callbacks
from pipeline import data, splits
from pipeline.config import ConfigError, choices_of
from pipeline.precision import resolve_mixed_precision
from pipeline.run_dir import RunDir, build_model


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
    raise ConfigError(f"train.strategy must be one of {choices_of('train.strategy')}, "
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


class Plan(typing.NamedTuple):
    """What a run trains on, decided once the dataset has been checked against the config."""

    manifest: dict
    steps_per_epoch: int
    train: splits.Selection        # what pre-training reads
    validation: typing.Optional[splits.Selection]  # the hold-out that chooses `best`, or None


def _check_splits(config, manifest):
    """Refuses a dataset without the splits the config names."""
    for key, split in (("data.train_split", config.data.train_split),
                       ("data.eval_split", config.data.eval_split)):
        if split not in manifest["splits"]:
            raise ConfigError(f"{key} is {split!r} but the dataset at {config.data.dataset} has "
                              f"splits {sorted(manifest['splits'])}")
    data.channel_statistics(manifest)  # a dataset without a train split fails here, clearly


def _check_batch(config, replicas):
    """Refuses a global batch that the replicas, or split batch norm in each, cannot divide."""
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


def plan(config, replicas=1):
    """The run's ``Plan``: the dataset's manifest, checked against ``config``, and the
    selections and steps it gives."""
    manifest = load_manifest(config.data.dataset)
    _check_splits(config, manifest)
    train_selection, validation = training_selections(config, manifest)
    available = train_selection.count(manifest)
    steps = available // config.optimizer.batch_size
    if steps < 1:
        raise ConfigError(f"optimizer.batch_size {config.optimizer.batch_size} is larger than the "
                          f"{available} training images ({train_selection.description})")
    _check_batch(config, replicas)
    return Plan(manifest, steps, train_selection, validation)


def _flatten(config_dict):
    return {f"{section}.{key}": value for section, values in config_dict.items()
            for key, value in (values or {}).items()}


# Keys a resumed run may change freely: they alter what is printed, not what is computed.
_PRESENTATION_KEYS = {"train.verbose"}


def _resolve_precision(config, run, strategy=None):
    """``config`` with ``train.mixed_precision: auto`` made concrete (``pipeline.precision``):
    the value of the run being resumed, else this machine's choice, which is logged and, as
    part of ``config.yaml``, recorded for a later resume elsewhere."""
    t = config.train
    if t.mixed_precision != "auto":
        return config
    recorded = run.read_config().train.mixed_precision if run.has_config() else None
    policy, reason = resolve_mixed_precision(
        t.mixed_precision, recorded,
        across_workers=isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy))
    print(f"train.mixed_precision auto -> {policy}: {reason}", flush=True)
    return dataclasses.replace(config, train=dataclasses.replace(t, mixed_precision=policy))


def _check_resume(config, run, allow_config_change):
    """Compares ``config`` with the run's recorded one; returns ``{key: [old, new]}``.

    A resumed run continues the recorded schedule, data order and optimiser state, so any
    change except a larger ``train.epochs`` (the schedule is stretched to the new end) is
    refused unless ``allow_config_change``.  The recorded config is read as ``ascl
    evaluate`` reads it, so settings added since the run was made compare as their defaults.
    """
    if not run.has_config():
        return {}
    previous = _flatten(run.read_config().to_dict())
    current = _flatten(config.to_dict())
    changes = {key: [previous.get(key), current.get(key)] for key in sorted(set(previous)
               | set(current)) if previous.get(key) != current.get(key)
               and key not in _PRESENTATION_KEYS}
    refused = {key: change for key, change in changes.items()
               if not (key == "train.epochs" and (change[0] or 0) <= change[1])}
    if refused and not allow_config_change:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise TrainingError(
            f"{run.path} holds a run with another configuration ({listed}). Resuming continues "
            f"its schedule, data order and optimiser state, so only a larger train.epochs may "
            f"change; use a new --run-dir, restore the settings, or pass --allow-config-change")
    return changes


def _config_change_record(changes, allow_config_change):
    """What ``config_changes.jsonl`` records of an accepted resume: when, what, and what
    allowed it."""
    allowed = ("--allow-config-change" if allow_config_change
               and any(key != "train.epochs" for key in changes) else "a larger train.epochs")
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "changes": changes, "allowed_by": allowed}


def _jit(setting):
    return {"auto": "auto", "on": True, "off": False}[setting]


# What a collective raises when a peer is gone or restarted: the classes TensorFlow's own
# multi-worker health check treats as a peer's failure.
PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.AbortedError,
                 tf.errors.DeadlineExceededError, tf.errors.FailedPreconditionError)

_TASK = r"/job:\w+/replica:\d+/task:\d+"


def lost_worker_message(error, run):
    """What a surviving worker says when a collective fails because a peer is gone (a broken
    connection at once, or TensorFlow's health check after missed heartbeats): which task
    stopped when TensorFlow names it, what the run keeps, and how to resume."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message)
    # the heartbeat check lists every lost task, one per line, after "unhealthy"; a broken
    # connection names the peer it was reading from ("remote target ...")
    _, found, after = text.partition("unhealthy")
    lost = (re.findall(rf"^\s*({_TASK})\s*$", after, flags=re.MULTILINE) if found
            else re.findall(rf"remote target ({_TASK})", text))
    # a graph's error opens with "Graph execution error:" and the Python frames of the op
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line[:1].isspace()
             and not re.match(r"Graph execution error|Detected at node|\d+ root error", line)]
    reason = lines[0][:300].rstrip(" :") if lines else type(error).__name__
    try:
        _, epochs_done = run.readable_backup()
        kept = (f"keeps the chief's last backup, after epoch {epochs_done}," if epochs_done
                else "has no backup yet (it restarts from epoch 1)")
    except (OSError, tf.errors.OpError) as unreadable:  # shared storage lost with the peer
        kept = f"has a backup that cannot be read now ({unreadable})"
    what = (f"a worker of the cluster stopped ({', '.join(sorted(set(lost)))})" if lost else
            "a collective operation failed, most likely because a worker of the cluster "
            "stopped or restarted")
    return (f"{what}; TensorFlow said: {reason}. The run {kept} in {run.path}: start every "
            f"worker again with the same command to resume")


def is_chief(strategy):
    """Whether this process writes the run's files: TF's own answer (``should_checkpoint``),
    true for every single-process strategy and for the chief of a multi-worker cluster."""
    return strategy.extended.should_checkpoint


def train(config, run_dir, *, strategy=None, extra_callbacks=(), allow_config_change=False):
    """Pre-trains (or resumes) the run in ``run_dir``; returns the summary dict.

    Resuming with a changed configuration is refused (``_check_resume``) unless
    ``allow_config_change``; an accepted change is recorded in ``config_changes.jsonl``.

    In a multi-worker cluster every worker calls this with the same ``run_dir`` (storage they
    share): only the chief writes there (config, history, summary, TensorBoard, checkpoints,
    backups); every worker resumes from the chief's backup.
    """
    # First: a multi-worker strategy must exist before TensorFlow's context does.
    strategy = strategy or resolve_strategy(config.train.strategy)
    config = _resolve_precision(config, RunDir(run_dir), strategy)
    run_plan = plan(config, strategy.num_replicas_in_sync)
    changes = _check_resume(config, RunDir(run_dir), allow_config_change)
    chief = is_chief(strategy)
    policy = keras.mixed_precision.global_policy()
    try:
        with RunDir.for_process(run_dir, chief) as run:
            run.make_folders()
            if changes and chief:
                run.record_config_change(_config_change_record(changes, allow_config_change))
            run.write_config(config)
            _, done_epochs = run.readable_backup()  # every worker skips the same batches
            dataset_fn = _input_fn(config, run_plan, done_epochs)
            model = _build(config, run_plan, strategy)
            callbacks = _callbacks(config, run_plan, run, dataset_fn, extra_callbacks)
            try:
                model.fit(strategy.distribute_datasets_from_function(dataset_fn)
                          if strategy.num_replicas_in_sync > 1 else dataset_fn(),
                          initial_epoch=done_epochs, epochs=config.train.epochs,
                          steps_per_epoch=run_plan.steps_per_epoch, callbacks=callbacks,
                          shuffle=False,  # tf.data already shuffles; silences Keras's warning
                          verbose=config.train.verbose)
            except run_callbacks.Diverged as error:
                _flush_tensorboard(callbacks)
                raise TrainingError(str(error)) from None
            except PEER_FAILURES as error:
                if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
                    raise
                _flush_tensorboard(callbacks)
                raise TrainingError(lost_worker_message(error, run)) from None
            model.save_weights(run.checkpoint_to_write("last"))
            return _summary(config, run_plan, run, strategy, chief)
    finally:
        # train.mixed_precision is this run's setting, not the process's: evaluation and
        # anything else built afterwards in the same process (`ascl demo`) get the caller's.
        keras.mixed_precision.set_global_policy(policy)


def _flush_tensorboard(callbacks):
    """When ``fit`` ends on an error: writes out what TensorBoard holds of the epochs before,
    so that it shows what ``history.json`` records."""
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.TensorBoard):
            callback.on_train_end()


def _input_fn(config, run_plan, done_epochs):
    """The training input function (for ``distribute_datasets_from_function`` under several
    replicas), starting after the batches of the ``done_epochs`` a resumed run has trained."""
    d = config.data

    def dataset_fn(input_context=None, skip_steps=done_epochs * run_plan.steps_per_epoch):
        return data.pretrain_dataset(
            run_plan.manifest, batch_size=config.optimizer.batch_size, seed=config.train.seed,
            split=run_plan.train, input_context=input_context, strong_key=d.key_view == "strong",
            blur=d.blur, crop_scale=(d.crop_min_scale, 1.0), flip=d.flip,
            shuffle_buffer=d.shuffle_buffer, cache=d.cache, skip_steps=skip_steps)

    return dataset_fn


def _build(config, run_plan, strategy):
    """Seeds, precision policy and the compiled model, in the strategy's scope."""
    t = config.train
    keras.utils.set_random_seed(t.seed)
    if t.deterministic:
        # Seeds alone fix what is drawn; this also fixes how kernels reduce (and refuses
        # ops with no deterministic kernel). TensorFlow has no public way to turn it off.
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(
        "float32" if t.mixed_precision == "none" else t.mixed_precision)
    with strategy.scope():
        model = build_model(config, run_plan.manifest, run_plan.steps_per_epoch,
                            initial_weights=True)
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate(config, run_plan.steps_per_epoch),
                                           momentum=config.optimizer.momentum),
            jit_compile=_jit(t.jit_compile), steps_per_execution=t.steps_per_execution)
    return model


def _callbacks(config, run_plan, run, dataset_fn, extra_callbacks):
    """The run's callbacks, in the order Keras calls them at each epoch's end."""
    t, d, e = config.train, config.data, config.evaluation
    validation = run_plan.validation
    callbacks = [
        # First: it raises at the first non-finite loss, before any other callback of that
        # step or epoch runs, so that no diverged weights reach a file.
        run_callbacks.StopOnNaN(),
        # Before the kNN monitor, so that the epoch's time is training time only.
        run_callbacks.RunStats(run_plan.steps_per_epoch * config.optimizer.batch_size),
        run_callbacks.KNNMonitor(
            run_plan.manifest, bank=splits.Selection(d.train_split, holdout=run_plan.train.holdout,
                                                     part="rest" if validation else "all",
                                                     limit=d.eval_limit),
            validation=validation, test=splits.Selection(d.eval_split, limit=d.eval_limit),
            every=t.knn_every, epochs=t.epochs, k=e.knn_k, temperature=e.knn_temperature,
            batch_size=e.batch_size),
        # After the monitor: it saves on the monitor's score.
        *([run_callbacks.BestCheckpoint(run, split_description=validation.description)]
          if validation else []),
        run_callbacks.EpochCheckpoint(run.checkpoint_to_write("epoch_{epoch:04d}"),
                                      every=t.checkpoint_every),
        # After every callback that adds to the epoch's logs.
        run_callbacks.HistoryFile(run),
        keras.callbacks.TensorBoard(run.tensorboard, update_freq="epoch"),
        # Last: an epoch is backed up only once everything above has recorded it, so a
        # kill in between makes the resumed run redo (and re-record) that epoch instead of
        # skipping its history record.
        run_callbacks.Backup(run),
        *extra_callbacks,
    ]
    if t.view_images:
        preview = next(iter(dataset_fn(skip_steps=0).take(1)))
        callbacks.append(run_callbacks.ViewImages(
            {k: v.numpy() for k, v in preview.items()}, run.tensorboard, t.view_images,
            run_plan.manifest))
    return callbacks


def _summary(config, run_plan, run, strategy, chief):
    """The finished run's summary, written by the chief (``summary.json``) and returned."""
    history = run.read_history()
    best = RunDir(run.write_path).read_best()  # this process's own record of its saves
    checkpoints = os.path.join(run.path, RunDir.CHECKPOINTS)  # the chief's, for every worker
    summary = {
        "run_dir": run.path, "epochs": config.train.epochs,
        "replicas": strategy.num_replicas_in_sync, "chief": chief,
        "final": history[-1] if history else None,
        "trained_on": run_plan.train.description,
        "best_val_knn_top1": best["knn_top1"] if best else None,
        "checkpoints": {"last": os.path.join(checkpoints, "last.weights.h5"),
                        **({"best": os.path.join(checkpoints, "best.weights.h5")}
                           if os.path.exists(run.checkpoint_to_write("best")) else {})},
    }
    if chief:
        run.write_summary(summary)
    return summary
