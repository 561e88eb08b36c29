"""Callbacks: the kNN monitor's two curves, and `best` chosen on the validation hold-out only."""

import json
import os

import keras
import numpy as np
import pytest

from pipeline import callbacks, splits
from pipeline.run_dir import RunDir

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
    run = RunDir(str(tmp_path))
    run.make_folders()
    tmp_path = tmp_path / "checkpoints"
    best = callbacks.BestCheckpoint(run, split_description=VALIDATION.description)
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
    resumed = callbacks.BestCheckpoint(run, split_description=VALIDATION.description)
    resumed.set_model(monitor.model)
    resumed.on_epoch_end(3, {"val_knn_top1": 0.65})
    assert json.load(open(tmp_path / "best.json"))["epoch"] == 2
    resumed.on_epoch_end(4, {"val_knn_top1": 0.8})
    assert json.load(open(tmp_path / "best.json"))["epoch"] == 5


def test_epochs_without_a_score_are_skipped_quietly(tmp_path, recwarn):
    run = RunDir(str(tmp_path))
    run.make_folders()
    best = callbacks.BestCheckpoint(run, split_description="v")
    best.set_model(_tiny_model())
    best.on_epoch_end(0, {"loss": 1.0})
    assert os.listdir(tmp_path / "checkpoints") == []
    assert not [w for w in recwarn if "val_knn_top1" in str(w.message)]


def test_without_validation_only_the_test_curve_is_logged(digits16, monkeypatch):
    epoch = {"now": 0}
    monitor = _scripted_monitor(digits16, monkeypatch, {TEST: [0.5]}, epoch, validation=None)
    logs = {}
    monitor.on_epoch_end(0, logs)
    assert logs == {"test_knn_top1": 0.5}
    assert np.isfinite(logs["test_knn_top1"])


def _dense_model(value):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.set_weights([np.full((2, 1), value, np.float32), np.zeros(1, np.float32)])
    return model


def _restore(run_path, write_path=None):
    model = _dense_model(0.0)
    callback = callbacks.Backup(RunDir(run_path, write_path))
    callback.set_model(model)
    callback.on_train_begin()
    return model, callback


def _saved(run_path, values):
    """A run folder after the callback backed up epochs 1, 2, ... with these weight values."""
    model = _dense_model(0.0)
    callback = callbacks.Backup(RunDir(run_path))
    callback.set_model(model)
    for epoch, value in enumerate(values):
        model.set_weights([np.full((2, 1), value, np.float32), np.zeros(1, np.float32)])
        callback.on_epoch_end(epoch)
    return callback


def _restored(run_path):
    """The weight restored and the epochs done that the trainer resumes after."""
    model, callback = _restore(run_path)
    return model.get_weights()[0][0, 0], callback.run.readable_backup()[1]


@pytest.mark.parametrize("kill", ["half-written latest weights", "latest weights missing",
                                  "latest metadata emptied", "weights of the next save"])
def test_a_kill_in_mid_save_restores_the_previous_backup(tmp_path, kill):
    run_path = str(tmp_path / "run")
    folder = os.path.join(run_path, "backup")
    _saved(run_path, [2.0, 3.0])
    assert _restored(run_path) == (3.0, 2)
    weights, metadata = (os.path.join(folder, name)
                         for name in ("latest.weights.h5", "training_metadata.json"))
    if kill == "half-written latest weights":
        with open(weights, "r+b") as handle:
            handle.truncate(os.path.getsize(weights) // 2)
    elif kill == "latest weights missing":
        os.remove(weights)
    elif kill == "latest metadata emptied":
        open(metadata, "w").close()
    else:  # the next epoch's weights are in place, its metadata is not yet
        _dense_model(4.0).save_weights(str(tmp_path / "next.weights.h5"))
        os.replace(str(tmp_path / "next.weights.h5"), weights)
    assert _restored(run_path) == (2.0, 1)


def test_a_damaged_latest_backup_never_becomes_the_previous_one(tmp_path):
    run_path = str(tmp_path / "run")
    folder = os.path.join(run_path, "backup")
    callback = _saved(run_path, [2.0, 3.0])
    with open(os.path.join(folder, "latest.weights.h5"), "wb") as handle:
        handle.write(b"half-written")
    callback.model.set_weights([np.full((2, 1), 4.0, np.float32), np.zeros(1, np.float32)])
    callback.on_epoch_end(2)  # the stock callback would now copy the damaged file to .bkp
    assert _restored(run_path) == (4.0, 3)
    os.remove(os.path.join(folder, "latest.weights.h5"))
    assert _restored(run_path) == (2.0, 1)  # the good previous backup survived


def test_a_worker_restores_the_chiefs_backup_and_writes_only_its_own(tmp_path):
    chief, own = str(tmp_path / "run"), str(tmp_path / "worker")
    _saved(chief, [1.0, 2.0, 3.0, 5.0])
    before = {name: open(os.path.join(chief, "backup", name), "rb").read()
              for name in os.listdir(os.path.join(chief, "backup"))}
    model, callback = _restore(chief, own)
    assert model.get_weights()[0][0, 0] == 5.0 and callback.run.readable_backup()[1] == 4
    callback.on_epoch_end(4)
    assert {name: open(os.path.join(chief, "backup", name), "rb").read()
            for name in os.listdir(os.path.join(chief, "backup"))} == before
    assert json.load(open(os.path.join(chief, "backup", "training_metadata.json")))["epoch"] == 4
    assert json.load(open(os.path.join(own, "backup", "training_metadata.json")))["epoch"] == 5


def test_epoch_checkpoints_follow_the_run_not_the_fit_call(tmp_path):
    model = _dense_model(1.0)
    x, y = np.zeros((6, 2), np.float32), np.zeros((6, 1), np.float32)
    checkpoint = callbacks.EpochCheckpoint(str(tmp_path / "epoch_{epoch:04d}.weights.h5"), every=4)
    # a resumed run: epochs 3..9 of the run, 2 steps each (the stock save_freq=8 batches
    # would save after epochs 6 and 10 of the run)
    model.fit(x, y, batch_size=3, initial_epoch=2, epochs=9, callbacks=[checkpoint], verbose=0)
    assert sorted(os.listdir(tmp_path)) == ["epoch_0004.weights.h5", "epoch_0008.weights.h5"]
