"""Callbacks: the kNN monitor chooses `best` on the validation hold-out only."""

import json
import os

import numpy as np

from pipeline import callbacks, splits


class _Model:
    """Stands in for ASCLModel: a backbone to embed with and weights to save."""

    def __init__(self):
        self.backbone = object()
        self.saved = []

    def save_weights(self, path):
        self.saved.append(path)
        open(path, "w").close()


def test_best_follows_validation_even_when_test_disagrees(digits16, tmp_path, monkeypatch):
    validation = splits.Selection("train", holdout=144, part="holdout")
    test = splits.Selection("test")
    bank = splits.Selection("train", holdout=144, part="rest")
    # scripted accuracies: validation peaks at epoch 2, test at epoch 1
    scripted = {validation: [0.5, 0.7, 0.6], test: [0.9, 0.1, 0.2]}
    epoch = {"now": 0}
    monkeypatch.setattr(callbacks.evaluate, "embed", lambda backbone, dataset: dataset)
    monkeypatch.setattr(callbacks.data, "eval_dataset",
                        lambda manifest, selection, batch_size: selection)
    monkeypatch.setattr(callbacks.evaluate, "knn_accuracy", lambda bank_, queries, **kw: {
        "top1": scripted[queries][epoch["now"]]})
    monitor = callbacks.KNNMonitor(
        digits16, bank=bank, validation=validation, test=test, every=1, epochs=3, k=20,
        temperature=0.1, batch_size=64, best_path=str(tmp_path / "best.weights.h5"))
    monitor.set_model(_Model())
    history = []
    for epoch["now"] in range(3):
        logs = {}
        monitor.on_epoch_end(epoch["now"], logs)
        history.append(logs)
    assert [h["val_knn_top1"] for h in history] == [0.5, 0.7, 0.6]
    assert [h["test_knn_top1"] for h in history] == [0.9, 0.1, 0.2]
    best = json.load(open(tmp_path / "best.json"))
    assert best["epoch"] == 2 and best["knn_top1"] == 0.7
    assert best["split"] == "validation: 144 examples held out of train"
    assert len(monitor.model.saved) == 2  # epochs 1 and 2 improved; 3 did not


def test_without_validation_nothing_is_chosen(digits16, tmp_path, monkeypatch):
    monkeypatch.setattr(callbacks.evaluate, "embed", lambda backbone, dataset: dataset)
    monkeypatch.setattr(callbacks.data, "eval_dataset",
                        lambda manifest, selection, batch_size: selection)
    monkeypatch.setattr(callbacks.evaluate, "knn_accuracy",
                        lambda bank, queries, **kw: {"top1": 0.5})
    monitor = callbacks.KNNMonitor(
        digits16, bank=splits.Selection("train"), validation=None, test=splits.Selection("test"),
        every=1, epochs=1, k=20, temperature=0.1, batch_size=64,
        best_path=str(tmp_path / "best.weights.h5"))
    monitor.set_model(_Model())
    logs = {}
    monitor.on_epoch_end(0, logs)
    assert logs == {"test_knn_top1": 0.5}
    assert not os.path.exists(tmp_path / "best.json") and not monitor.model.saved
    assert np.isinf(monitor.best)
