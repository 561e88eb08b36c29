"""`ascl train`: run directory, callbacks, resume after interruption, failures, evaluation."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from pipeline.config import ConfigError
from pipeline.evaluate import evaluate_run
from pipeline.train import TrainingError, build_model, train
from tests import small_runs

SMALL = small_runs.SMALL
_config = small_runs.small_config


@pytest.fixture(scope="module")
def trained_run(digits16, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run") / "run")
    summary = train(_config(digits16, "train.epochs=2"), run_dir)
    return run_dir, summary


def test_run_directory_holds_config_checkpoints_logs_and_history(trained_run):
    run_dir, summary = trained_run
    for path in ("config.yaml", "summary.json", "history.json", "checkpoints/epoch_0001.weights.h5",
                 "checkpoints/epoch_0002.weights.h5", "checkpoints/last.weights.h5",
                 "checkpoints/best.weights.h5", "checkpoints/best.json"):
        assert os.path.exists(os.path.join(run_dir, path)), path
    history = json.load(open(os.path.join(run_dir, "history.json")))
    assert [r["epoch"] for r in history] == [1, 2]
    for key in ("loss", "confidence", "max_soft_label", "contrastive_accuracy", "learning_rate",
                "val_knn_top1", "test_knn_top1", "epoch_seconds", "images_per_second",
                "soft_label_purity", "projection_spread"):
        assert all(np.isfinite(r[key]) for r in history), key
    assert history[1]["learning_rate"] < history[0]["learning_rate"]  # cosine decay
    events = [f for _, _, files in os.walk(os.path.join(run_dir, "tensorboard")) for f in files
              if f.startswith("events.out")]
    assert events
    # `best` is chosen on the validation hold-out, never on the test split
    best = json.load(open(os.path.join(run_dir, "checkpoints", "best.json")))
    assert summary["best_val_knn_top1"] == max(r["val_knn_top1"] for r in history)
    assert best["knn_top1"] == summary["best_val_knn_top1"] and "validation" in best["split"]
    assert summary["trained_on"].startswith("train without its ")
    assert summary["trained_on"].endswith("-example validation hold-out (limited to 512)")


def test_tensorboard_gets_scalars_and_view_images(trained_run):
    import tensorflow as tf

    run_dir, _ = trained_run
    tags = set()
    for root, _, files in os.walk(os.path.join(run_dir, "tensorboard")):
        for name in files:
            if name.startswith("events.out"):
                for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                    tags.update(value.tag for value in event.summary.value)
    assert {"epoch_loss", "epoch_confidence", "epoch_learning_rate", "epoch_knn_top1",
            "epoch_test_knn_top1"} <= tags
    assert any(tag.startswith("views/") for tag in tags)


def test_evaluation_report_and_projector(trained_run):
    run_dir, _ = trained_run
    report = evaluate_run(run_dir)
    assert set(report) >= {"knn", "raw_pixel_knn", "linear_probe", "projector"}
    assert report["checkpoint"]["name"] == "last" and report["checkpoint"]["epoch"] == 2
    assert report["checkpoint"]["selected_by"].startswith("none")
    assert report["knn"]["k"] == 20
    assert report["raw_pixel_knn"]["top1"] > 0.9
    saved = json.load(open(os.path.join(run_dir, "evaluation.json")))
    assert saved["knn"] == report["knn"]
    projector = os.path.join(run_dir, "tensorboard", "projector")
    assert os.path.exists(os.path.join(projector, "projector_config.pbtxt"))
    assert len(open(os.path.join(projector, "metadata.tsv")).read().splitlines()) == 51
    best = evaluate_run(run_dir, checkpoint="best", linear=False,
                        output=os.path.join(run_dir, "best.json"))
    assert best["checkpoint"]["name"] == "best"
    assert best["checkpoint"]["selected_by"].startswith("highest kNN top-1 on validation")
    assert best["checkpoint"]["epoch"] in (1, 2)


def test_reference_schedule_warms_up_for_5_epochs_then_cosine_per_step():
    from pipeline.config import load_config
    from pipeline.train import learning_rate

    config = load_config("configs/cifar10_resnet18.yaml")  # 200 epochs
    schedule = learning_rate(config, steps_per_epoch=100)
    lr = lambda step: float(schedule(step))  # noqa: E731
    warmup, total = 500, 20000
    assert lr(0) == 0.0
    assert lr(250) == pytest.approx(0.015) and lr(500) == pytest.approx(0.03)
    assert lr(260) > lr(250)  # per iteration, not per epoch
    assert lr(warmup + (total - warmup) // 2) == pytest.approx(0.015, rel=1e-3)
    assert lr(total) == pytest.approx(0.0, abs=1e-9)
    assert lr(warmup + 100) < lr(warmup + 99)
    doubled = load_config("configs/cifar10_resnet18.yaml", ["optimizer.batch_size=512"])
    assert float(learning_rate(doubled, steps_per_epoch=100)(500)) == pytest.approx(0.06)


class _StopAfter(keras.callbacks.Callback):
    """Simulates an interruption: training stops after ``epochs`` epochs."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            self.model.stop_training = True


class _StateAtStart(keras.callbacks.Callback):
    """Records the model's state once the backup has been restored."""

    def on_train_begin(self, logs=None):
        self.queue = self.model.queue.numpy()
        self.pointer = int(self.model.queue_pointer.numpy())
        self.key = [w.numpy() for w in self.model.key_encoder.weights]
        self.iterations = int(self.model.optimizer.iterations.numpy())


def test_resume_keeps_queue_key_encoder_schedule_and_history(digits16, tmp_path):
    config = _config(digits16, "train.epochs=3", "train.knn_every=0", "train.view_images=0")
    run_dir = str(tmp_path / "run")
    train(config, run_dir, extra_callbacks=[_StopAfter(2)])
    interrupted = build_model(config, digits16)
    interrupted.load_weights(os.path.join(run_dir, "checkpoints", "epoch_0002.weights.h5"))

    state = _StateAtStart()
    train(config, run_dir, extra_callbacks=[state])
    steps = 512 // 64
    assert state.iterations == 2 * steps
    np.testing.assert_array_equal(state.queue, interrupted.queue.numpy())
    assert state.pointer == int(interrupted.queue_pointer.numpy()) == (2 * steps * 64) % 256
    for restored, saved in zip(state.key, interrupted.key_encoder.weights):
        np.testing.assert_array_equal(restored, saved.numpy())

    resumed = json.load(open(os.path.join(run_dir, "history.json")))
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    uninterrupted_dir = str(tmp_path / "straight")
    train(config, uninterrupted_dir)
    straight = json.load(open(os.path.join(uninterrupted_dir, "history.json")))
    assert [r["learning_rate"] for r in resumed] == pytest.approx(
        [r["learning_rate"] for r in straight], rel=1e-6)
    # the resumed run continued the data order and augmentation seeds: it saw the same
    # batches in epoch 3 as the uninterrupted run, so it ends with the same weights
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-5)
    finals = []
    for directory in (run_dir, uninterrupted_dir):
        model = build_model(config, digits16)
        model.load_weights(os.path.join(directory, "checkpoints", "last.weights.h5"))
        finals.append(model)
    for a, b in zip(finals[0].query_encoder.weights, finals[1].query_encoder.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    np.testing.assert_allclose(finals[0].queue.numpy(), finals[1].queue.numpy(), atol=1e-5)


def test_killed_run_resumes_to_the_configured_epochs(digits16, tmp_path):
    run_dir = str(tmp_path / "run")
    command = [sys.executable, "-m", "pipeline.cli", "train", "--config",
               "configs/digits_small.yaml", "--run-dir", run_dir,
               "--set", f"data.dataset={digits16['directory']}", "--epochs", "25",
               *[arg for item in SMALL for arg in ("--set", item)],
               "--set", "train.knn_every=0", "--set", "train.view_images=0"]
    history_path = os.path.join(run_dir, "history.json")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(history_path) and len(json.load(open(history_path))) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(json.load(open(history_path)))
    assert 2 <= done_before < 25, "the run must be killed mid-way for this test to mean anything"
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    history = json.load(open(history_path))
    assert [r["epoch"] for r in history] == list(range(1, 26))
    assert json.load(open(os.path.join(run_dir, "summary.json")))["epochs"] == 25


def test_training_under_two_replicas(digits16, tmp_path, two_replicas):
    summary = train(_config(digits16, "train.epochs=1", "train.view_images=0"),
                    str(tmp_path / "run"), strategy=two_replicas)
    assert summary["replicas"] == 2 and np.isfinite(summary["final"]["loss"])


def test_divergence_fails_with_a_clear_message(digits16, tmp_path):
    config = _config(digits16, "train.epochs=2", "optimizer.lr=1.0e30", "train.knn_every=0",
                     "model.norm=none", "optimizer.weight_decay=0")
    with pytest.raises(TrainingError, match="training diverged"):
        train(config, str(tmp_path / "run"))


def test_bad_config_or_dataset_fails_before_writing_anything(digits16, tmp_path):
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "pipeline.cli", "train", "--config", "configs/digits_small.yaml",
           "--run-dir", str(run_dir)]
    missing = subprocess.run(cli + ["--set", f"data.dataset={tmp_path / 'nothing'}"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "is not a prepared dataset" in missing.stderr
    typo = subprocess.run(cli + ["--set", f"data.dataset={digits16['directory']}",
                                 "--set", "ascl.tempreature=0.1"], capture_output=True, text=True)
    assert typo.returncode == 2 and "unknown key ascl.tempreature" in typo.stderr
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="model.bn_splits .* must divide"):
        train(_config(digits16, "optimizer.batch_size=66"), str(run_dir))
    assert not run_dir.exists()


def test_a_bfloat16_run_leaves_float32_behind_and_evaluates_in_the_same_process(digits16,
                                                                             tmp_path):
    """`ascl demo` trains and then evaluates in one process: the run's mixed_bfloat16 must
    not leak into the linear probe (bfloat16 logits broke its top-k metric)."""
    run_dir = str(tmp_path / "run")
    train(_config(digits16, "train.epochs=1", "train.knn_every=0", "train.view_images=0",
                  "train.mixed_precision=mixed_bfloat16"), run_dir)
    assert keras.mixed_precision.global_policy().name == "float32"
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # and even under a bf16 policy
    report = evaluate_run(run_dir, checkpoint="last")
    # (two probe epochs at lr 10 on one-epoch features swing between 0.08 and 0.4: the
    # point here is that the probe runs at all; kNN shows the encoder)
    assert 0.0 <= report["linear_probe"]["top1"] <= 1.0 and report["knn"]["top1"] > 0.5


def test_split_bn_is_checked_against_the_per_replica_batch(digits16, tmp_path, two_replicas):
    # 64 is divisible by bn_splits 64, but each of 2 replicas normalises only 32 images
    with pytest.raises(ConfigError, match=r"model.bn_splits \(64\) must divide the batch each "
                                          r"replica normalises \(model.norm: split\), .* "
                                          r"64 / 2 = 32"):
        train(_config(digits16, "model.bn_splits=64"), str(tmp_path / "run"),
              strategy=two_replicas)
    with pytest.raises(ConfigError, match=r"\(model.predictor_norm: split\)"):
        train(_config(digits16, "model.norm=batch", "ascl.framework=byol",
                      "model.predictor_norm=split", "model.bn_splits=64"),
              str(tmp_path / "run"), strategy=two_replicas)
    with pytest.raises(ConfigError, match=r"batch_size \(63\) must be a multiple of the 2 "):
        train(_config(digits16, "optimizer.batch_size=63", "model.norm=batch"),
              str(tmp_path / "run"), strategy=two_replicas)
    assert not (tmp_path / "run").exists()


def test_resuming_with_changed_settings_is_refused_unless_allowed(digits16, tmp_path):
    config = _config(digits16, "train.epochs=1", "train.knn_every=0", "train.view_images=0")
    run_dir = str(tmp_path / "run")
    train(config, run_dir)
    for change in ("ascl.mode=moco", "optimizer.lr=0.5", "optimizer.batch_size=32",
                   "data.crop_min_scale=0.5"):
        key = change.split("=")[0]
        with pytest.raises(TrainingError, match=f"another configuration \\({key}: "):
            train(_config(digits16, "train.epochs=1", "train.knn_every=0",
                          "train.view_images=0", change), run_dir)
    train(_config(digits16, "train.epochs=2", "train.knn_every=0", "train.view_images=0"),
          str(tmp_path / "longer"))
    with pytest.raises(TrainingError, match="train.epochs: 2 -> 1"):  # fewer epochs: refused
        train(_config(digits16, "train.epochs=1", "train.knn_every=0", "train.view_images=0"),
              str(tmp_path / "longer"))
    assert not os.path.exists(os.path.join(run_dir, "config_changes.jsonl"))
    # a run recorded before settings were added: they compare as their defaults
    recorded = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    del recorded["ascl"]["framework"], recorded["model"]["predictor_norm"]
    yaml.safe_dump(recorded, open(os.path.join(run_dir, "config.yaml"), "w"))
    # a larger train.epochs is accepted, and recorded
    train(_config(digits16, "train.epochs=2", "train.knn_every=0", "train.view_images=0"),
          run_dir)
    # anything else only when allowed, and recorded
    train(_config(digits16, "train.epochs=2", "train.knn_every=0", "train.view_images=0",
                  "optimizer.lr=0.5"), run_dir, allow_config_change=True)
    records = [json.loads(line) for line in open(os.path.join(run_dir, "config_changes.jsonl"))]
    assert records[0]["changes"] == {"train.epochs": [1, 2]}
    assert records[0]["allowed_by"] == "a larger train.epochs"
    assert records[1]["changes"] == {"optimizer.lr": [0.06, 0.5]}
    assert records[1]["allowed_by"] == "--allow-config-change"


class _PoisonAt(keras.callbacks.Callback):
    """Forces divergence: a weight becomes NaN before (or, ``after=True``, after) the given
    step of the given epoch."""

    def __init__(self, epoch, step, after=False):
        super().__init__()
        self.epoch, self.step, self.after, self._current = epoch, step, after, None

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def _poison(self, batch):
        if self._current == self.epoch and batch == self.step:
            # the projector's last weight: no ReLU after it to turn NaN into 0
            weight = self.model.query_encoder.trainable_weights[-1]
            weight.assign(np.full(weight.shape, np.nan, weight.dtype))

    def on_train_batch_begin(self, batch, logs=None):
        if not self.after:
            self._poison(batch)

    def on_train_batch_end(self, batch, logs=None):
        if self.after:
            self._poison(batch)


@pytest.mark.parametrize("after", [False, True], ids=["loss of the last step",
                                                     "weights after the last step"])
def test_divergence_leaves_the_last_good_backup_and_a_rerun_resumes_from_it(digits16, tmp_path,
                                                                          after):
    """Whether the last step's loss is NaN, or its update leaves NaN weights behind a finite
    loss, nothing of the diverged epoch is saved."""
    config = _config(digits16, "train.epochs=3", "train.knn_every=1", "train.view_images=0",
                     "train.checkpoint_every=1")
    run_dir = str(tmp_path / "run")
    with pytest.raises(TrainingError, match="training diverged.*epoch 2"):
        train(config, run_dir, extra_callbacks=[_PoisonAt(epoch=1, step=7, after=after)])
    checkpoints = os.path.join(run_dir, "checkpoints")
    # neither an epoch checkpoint nor `best` was written from the diverged epoch
    assert not os.path.exists(os.path.join(checkpoints, "epoch_0002.weights.h5"))
    assert json.load(open(os.path.join(checkpoints, "best.json")))["epoch"] == 1
    best = build_model(config, digits16)
    best.load_weights(os.path.join(checkpoints, "best.weights.h5"))
    assert all(np.all(np.isfinite(w.numpy())) for w in best.weights)
    backup = os.path.join(run_dir, "backup")
    metadata = json.load(open(os.path.join(backup, "training_metadata.json")))
    assert metadata["epoch"] == 1  # the diverged epoch 2 was not backed up
    restored = build_model(config, digits16)
    restored.load_weights(os.path.join(backup, "latest.weights.h5"))
    assert all(np.all(np.isfinite(w.numpy())) for w in restored.weights)
    state = _StateAtStart()
    summary = train(config, run_dir, extra_callbacks=[state])
    assert state.iterations == 512 // 64 and np.isfinite(summary["final"]["loss"])


def test_a_dataset_without_a_train_split_fails_with_a_clear_error(tmp_path):
    from PIL import Image

    from beam_jobs.dataset_format import DatasetError, load_manifest
    from beam_jobs.prepare import run as prepare

    for index in range(4):
        folder = tmp_path / "raw" / "test" / f"c{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), index * 40, np.uint8)).save(folder / f"{index}.png")
    prepare(["--source", f"folder:{tmp_path / 'raw'}", "--output", str(tmp_path / "data")])
    manifest = load_manifest(str(tmp_path / "data"))
    config = _config(manifest, "data.train_split=test", "data.validation_size=0",
                     "optimizer.batch_size=4", "model.bn_splits=2", "data.train_limit=0")
    with pytest.raises(DatasetError, match="has no 'train' split"):
        train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_training_improves_knn_over_the_initial_encoder(digits16, tmp_path):
    from pipeline import splits
    from pipeline.evaluate import encoder_knn
    from pipeline.run_dir import load_trained_model

    config = _config(digits16, "train.epochs=8", "train.knn_every=0", "train.view_images=0",
                     "train.checkpoint_every=100", "data.train_limit=0")
    run_dir = str(tmp_path / "run")
    train(config, run_dir)
    knn = dict(train_split=splits.Selection("train"), eval_split=splits.Selection("test"), k=20,
               temperature=0.1, batch_size=256)
    keras.utils.set_random_seed(config.train.seed)  # as train() does before building
    initial = build_model(config, digits16)  # so: the weights training started from
    trained, _, _ = load_trained_model(run_dir, "last")
    before = encoder_knn(initial.backbone, digits16, **knn)["top1"]
    after = encoder_knn(trained.backbone, digits16, **knn)["top1"]
    print(f"kNN top-1 before {before:.4f}, after training {after:.4f}")
    assert after > before + 0.04  # measured: 0.880 -> 0.960 (324 test digits: 0.003 each)


def test_a_kill_before_the_history_is_written_leaves_no_gap(digits16, tmp_path, monkeypatch):
    from pipeline import callbacks as run_callbacks

    config = _config(digits16, "train.epochs=3", "train.knn_every=0", "train.view_images=0")
    run_dir = str(tmp_path / "run")
    write = run_callbacks.HistoryFile.on_epoch_end

    def killed_at_epoch_2(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("killed")  # before epoch 2's record is written
        return write(self, epoch, logs)

    monkeypatch.setattr(run_callbacks.HistoryFile, "on_epoch_end", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir)
    monkeypatch.undo()
    train(config, run_dir)
    history = json.load(open(os.path.join(run_dir, "history.json")))
    assert [r["epoch"] for r in history] == [1, 2, 3]


_TWO_DETERMINISTIC_RUNS = """
import sys
import numpy as np
from pipeline.train import train
from pipeline.run_dir import load_trained_model
from tests import small_runs
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

manifest = {"directory": sys.argv[1]}
weights = []
for name in ("first", "second"):
    train(small_runs.small_config(manifest, "train.epochs=2", "train.deterministic=true",
                                  "train.knn_every=0"), f"{sys.argv[2]}/{name}")
    model, _, _ = load_trained_model(f"{sys.argv[2]}/{name}", "last")
    weights.append([np.asarray(w) for w in model.get_weights()])
assert tf_config.is_op_determinism_enabled(), "train.deterministic did not enable it"
assert len(weights[0]) == len(weights[1]) and weights[0]
different = [i for i, (a, b) in enumerate(zip(*weights)) if not np.array_equal(a, b)]
print("DIFFERENT", different)
"""


def test_deterministic_runs_give_identical_weights(digits16, tmp_path):
    """Two runs with train.deterministic on, in one fresh process (op determinism is
    process-wide, so not in the test process), end with bit-identical weights."""
    result = subprocess.run(
        [sys.executable, "-c", _TWO_DETERMINISTIC_RUNS, digits16["directory"], str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DIFFERENT []" in result.stdout, result.stdout[-2000:]


def test_byol_options_reach_the_model_and_the_cosine_schedule_spans_the_run(digits16, tmp_path):
    """ascl.symmetric and ascl.momentum_schedule=cosine reach the model from the config; the
    schedule spans the run (epochs x steps), so the target has almost stopped moving at the
    end."""
    from models.momentum_encoder import ema_momentum

    class Capture(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            self.trained = self.model

    capture = Capture()
    summary = train(_config(digits16, "ascl.framework=byol", "ascl.mode=ascl",
                            "ascl.symmetric=true", "ascl.momentum_schedule=cosine",
                            "train.epochs=2", "train.knn_every=0", "train.view_images=0"),
                    str(tmp_path / "run"), extra_callbacks=[capture])
    model = capture.trained
    assert np.isfinite(summary["final"]["loss"]) and summary["final"]["projection_spread"] > 0
    assert model.symmetric and model.momentum_schedule == "cosine"
    steps = int(model.optimizer.iterations.numpy())
    assert steps > 2 and model.momentum_steps == steps  # the schedule spans the whole run
    assert float(ema_momentum(model.momentum, steps - 1, model.momentum_steps, "cosine")) > 0.9999


def test_a_lost_worker_message_names_the_task_the_backup_and_how_to_resume(tmp_path,
                                                                          monkeypatch):
    from pipeline.run_dir import RunDir
    from pipeline.train import lost_worker_message

    def message(text, run=None):
        return lost_worker_message(tf.errors.UnavailableError(None, None, text),
                                   run or RunDir(str(tmp_path)))

    heartbeats = message(
        "{{function_node __wrapped__CollectiveReduceV2_device_/job:worker/replica:0/task:0/"
        "device:CPU:0}} Collective ops is aborted by: Error reported from /job:worker/task:1: "
        "The following tasks are unhealthy (stopped sending heartbeats):\n"
        "/job:worker/replica:0/task:1\n/job:worker/replica:0/task:2\n"
        "The tasks have crashed.")
    assert heartbeats.startswith("a worker of the cluster stopped (/job:worker/replica:0/task:1,"
                                 " /job:worker/replica:0/task:2); TensorFlow said: Collective")
    assert "task:0" not in heartbeats  # the survivor's own device is not a lost one
    assert "function_node" not in heartbeats
    assert "The run has no backup yet (it restarts from epoch 1)" in heartbeats
    assert heartbeats.endswith("start every worker again with the same command to resume")

    broken = message(
        "Graph execution error:\n\nDetected at node CollectiveReduceV2 defined at (most recent "
        "call last):\n  File \"train.py\", line 1, in <module>\n\nSocket closed\n"
        "Additional GRPC error information from remote target /job:worker/replica:0/task:1 "
        "while calling /tensorflow.WorkerService/RecvBuf:\n:UNKNOWN:Error received from peer "
        "{grpc_message:\"Socket closed\", grpc_status:14}\n\t [[{{node CollectiveReduceV2}}]]")
    assert broken.startswith("a worker of the cluster stopped (/job:worker/replica:0/task:1); "
                             "TensorFlow said: Socket closed.")

    # no task named: the message does not claim more than it knows
    assert message("Socket closed").startswith(
        "a collective operation failed, most likely because a worker of the cluster stopped or "
        "restarted; TensorFlow said: Socket closed.")

    run = RunDir(str(tmp_path))
    run.write_backup(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), 3)
    assert f"The run keeps the chief's last backup, after epoch 3, in {tmp_path}:" in message(
        "Socket closed", run)

    def unreadable():
        raise OSError("Stale file handle")

    monkeypatch.setattr(run, "readable_backup", unreadable)
    assert "The run has a backup that cannot be read now (Stale file handle)" in message(
        "Socket closed", run)
