"""A training run's directory as the later commands read it: its model and its checkpoints.

``ascl evaluate``, ``ascl export`` and the kNN monitor's bookkeeping all need
the model a run's config describes and the weights of one of its
checkpoints; this module is where they get them, so that none of them has to
import the trainer.

Checkpoints by name: ``last`` (the final weights) and ``best`` (the epoch with
the highest kNN top-1 on the validation hold-out of the training split;
``checkpoints/best.json`` records the epoch and the split that chose it).
"""

import json
import os

import yaml

from models import ASCLModel, BYOLModel, build_backbone, prediction_head, projection_head
from pipeline.config import ConfigError, from_dict
from pipeline.prepared_dataset import load_manifest

BEST_INFO = "best.json"


def build_model(config, manifest, steps_per_epoch=None):
    """The model a config describes (``ASCLModel`` for ``ascl.framework`` moco, ``BYOLModel``
    for byol), for the dataset's image shape, in the current strategy scope.

    ``steps_per_epoch`` sets the run's length for a momentum schedule; a model built to
    evaluate or export needs none."""
    m, a = config.model, config.ascl
    schedule = dict(momentum_schedule=a.momentum_schedule,
                    momentum_steps=config.train.epochs * steps_per_epoch
                    if steps_per_epoch else None)
    backbone = build_backbone(m.backbone, input_shape=tuple(manifest["image_shape"]), stem=m.stem,
                              norm=m.norm, bn_splits=m.bn_splits, widths=m.cnn_widths)
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


def checkpoint_path(run_dir, checkpoint):
    """The weights file of ``best``, ``last`` or a path; a clear error when it does not exist."""
    if checkpoint not in ("best", "last"):
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist (pass "
                                    f"--checkpoint last, best or the path of a weights file)")
        return checkpoint
    path = os.path.join(run_dir, "checkpoints", f"{checkpoint}.weights.h5")
    if not os.path.exists(path):
        if checkpoint == "best":
            raise FileNotFoundError(
                f"{run_dir} has no best checkpoint: `best` is chosen by kNN on the validation "
                f"hold-out of the training split, and this run had none (data.validation_size "
                f"0 or train.knn_every 0) or has not reached a kNN evaluation yet; use "
                f"--checkpoint last")
        raise FileNotFoundError(f"checkpoint {path} does not exist (run `ascl train` to the end "
                                f"first, or pass --checkpoint best or a weights path)")
    return path


def checkpoint_info(run_dir, checkpoint):
    """What a report says about the weights it used: which checkpoint, its epoch, what chose it."""
    info = {"name": checkpoint, "path": checkpoint_path(run_dir, checkpoint)}
    if checkpoint == "best":
        with open(os.path.join(run_dir, "checkpoints", BEST_INFO)) as handle:
            best = json.load(handle)
        # runs from before the validation hold-out chose `best` on the evaluation split
        split = best.get("split", "the evaluation split (a run made before validation "
                                  "hold-outs existed)")
        info.update(epoch=best["epoch"], selected_by=f"highest kNN top-1 on {split}",
                    selection_knn_top1=best["knn_top1"])
    elif checkpoint == "last":
        summary_path = os.path.join(run_dir, "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as handle:
                info["epoch"] = json.load(handle)["epochs"]
        info["selected_by"] = "none: the weights after the last epoch"
    else:
        info["selected_by"] = "given by path"
    return info


def _upgrade_legacy(raw):
    """Reads the config of a run made by an earlier version: ``data.blur`` was
    ``auto|on|off`` (``auto``: on from 64 px; blur does not affect evaluation or export,
    so it is read as off) and ``evaluation.linear_milestones`` were epochs, not fractions."""
    data_section = raw.get("data") or {}
    if data_section.get("blur") == "auto":
        data_section["blur"] = False
    evaluation = raw.get("evaluation") or {}
    milestones = evaluation.get("linear_milestones")
    epochs = evaluation.get("linear_epochs", 100)
    if milestones and epochs and all(isinstance(m, int) and m >= 1 for m in milestones):
        evaluation["linear_milestones"] = [m / epochs for m in milestones if m < epochs]
    return raw


def load_run_config(run_dir):
    """The validated ``Config`` a run was trained with (``RUN/config.yaml``)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a training run: {path} does not exist")
    with open(path) as handle:
        raw = yaml.safe_load(handle) or {}
    try:
        return from_dict(_upgrade_legacy(raw))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def load_trained_model(run_dir, checkpoint="last"):
    """``(model, config, manifest)`` of a run, weights from ``best``, ``last`` or a path."""
    config = load_run_config(run_dir)
    manifest = load_manifest(config.data.dataset)
    path = checkpoint_path(run_dir, checkpoint)
    model = build_model(config, manifest)
    model.load_weights(path)
    return model, config, manifest
