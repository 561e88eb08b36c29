"""Callbacks: the kNN monitor's two curves, and `best` chosen on the validation hold-out only."""

import json
import os

import keras
import numpy as np

from pipeline import callbacks, splits

VALIDATION = splits.Selection("train", holdout=144, part="holdout")
TEST = splits.Selection("test")
BANK = splits.Selection("train", holdout=144, part="rest")


def _tiny_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.backbone = model
    return model


def _scripted_monitor(digits16, monkeypatch, scripted, epoch, validation=VALIDATION):
    monkeypatch.setattr(callbacks.evaluate, "embed", lambda backbone, dataset: dataset)
    monkeypatch.setattr(callbacks.data, "eval_dataset",
                        lambda manifest, selection, batch_size: selection)
    monkeypatch.setattr(callbacks.evaluate, "knn_accuracy", lambda bank_, queries, **kw: {
        "top1": scripted[queries][epoch["now"]]})
    monitor = callbacks.KNNMonitor(digits16, bank=BANK, validation=validation, test=TEST,
                                   every=1, epochs=3, k=20, temperature=0.1, batch_size=64)
    monitor.set_model(_tiny_model())
    return monitor


def test_monitor_logs_validation_and_test_curves(digits16, monkeypatch):
    epoch = {"now": 0}
    monitor = _scripted_monitor(digits16, monkeypatch,
                                {VALIDATION: [0.5, 0.7], TEST: [0.9, 0.1]}, epoch)
    logs = []
    for epoch["now"] in range(2):
        logs.append({})
        monitor.on_epoch_end(epoch["now"], logs[-1])
    assert logs == [{"val_knn_top1": 0.5, "test_knn_top1": 0.9},
                    {"val_knn_top1": 0.7, "test_knn_top1": 0.1}]


def test_best_follows_validation_even_when_test_disagrees(digits16, tmp_path, monkeypatch):
    # scripted accuracies: validation peaks at epoch 2, test at epoch 1
    epoch = {"now": 0}
    monitor = _scripted_monitor(digits16, monkeypatch,
                                {VALIDATION: [0.5, 0.7, 0.6], TEST: [0.9, 0.1, 0.2]}, epoch)
    best = callbacks.BestCheckpoint(str(tmp_path / "best.weights.h5"),
                                    split_description=VALIDATION.description)
    best.set_model(monitor.model)
    saved_at = []
    for epoch["now"] in range(3):
        logs = {}
        monitor.on_epoch_end(epoch["now"], logs)
        before = os.path.getmtime(tmp_path / "best.weights.h5") if saved_at else None
        best.on_epoch_end(epoch["now"], logs)
        if os.path.exists(tmp_path / "best.weights.h5") and (
                before is None or os.path.getmtime(tmp_path / "best.weights.h5") != before):
            saved_at.append(epoch["now"] + 1)
    info = json.load(open(tmp_path / "best.json"))
    assert info == {"epoch": 2, "knn_top1": 0.7,
                    "split": "validation: 144 examples held out of train"}
    # a resumed run starts from the recorded best: a lower score does not replace it
    resumed = callbacks.BestCheckpoint(str(tmp_path / "best.weights.h5"),
                                       split_description=VALIDATION.description)
    resumed.set_model(monitor.model)
    resumed.on_epoch_end(3, {"val_knn_top1": 0.65})
    assert json.load(open(tmp_path / "best.json"))["epoch"] == 2
    resumed.on_epoch_end(4, {"val_knn_top1": 0.8})
    assert json.load(open(tmp_path / "best.json"))["epoch"] == 5


def test_epochs_without_a_score_are_skipped_quietly(tmp_path, recwarn):
    best = callbacks.BestCheckpoint(str(tmp_path / "best.weights.h5"), split_description="v")
    best.set_model(_tiny_model())
    best.on_epoch_end(0, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "best.weights.h5")
    assert not [w for w in recwarn if "val_knn_top1" in str(w.message)]


def test_without_validation_only_the_test_curve_is_logged(digits16, monkeypatch):
    epoch = {"now": 0}
    monitor = _scripted_monitor(digits16, monkeypatch, {TEST: [0.5]}, epoch, validation=None)
    logs = {}
    monitor.on_epoch_end(0, logs)
    assert logs == {"test_knn_top1": 0.5}
    assert np.isfinite(logs["test_knn_top1"])
