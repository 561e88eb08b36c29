"""``ascl train --strategy multi_worker`` on two real worker processes sharing one run
directory: it trains, only the chief writes, either worker's death stops the other with an error
saying how to resume, and the restarted cluster resumes to the end."""

import json
import os
import subprocess
import time

import pytest

from pipeline.run_dir import RunDir
from tests import cluster
from tests.small_runs import SMALL

EPOCHS = 12


def _command(digits16, run_dir):
    return [cluster.PYTHON, "-m", "pipeline.cli", "train", "--config",
            "configs/digits_small.yaml", "--strategy", "multi_worker", "--run-dir", run_dir,
            "--set", f"data.dataset={digits16['directory']}", "--epochs", str(EPOCHS),
            *[arg for item in SMALL for arg in ("--set", item)],
            "--set", "train.knn_every=4", "--set", "train.checkpoint_every=4",
            "--set", "train.view_images=0", "--set", "model.norm=batch"]


def _epochs_done(run_dir):
    path = os.path.join(run_dir, "history.json")
    try:
        return len(json.load(open(path)))
    except (OSError, ValueError):
        return 0


def test_cluster_trains_writes_on_the_chief_only_and_resumes_after_a_kill(digits16, tmp_path):
    run_dir = str(tmp_path / "run")
    command = _command(digits16, run_dir)
    temp = [tmp_path / "tmp1", tmp_path / "tmp2"]  # the workers' TMPDIR, one per sitting
    for folder in temp:
        folder.mkdir()

    # 1. Both workers start on one run directory; a worker dies mid-run.
    with cluster.cluster(lambda index: command, log_dir=str(tmp_path),
                         extra_env={"TMPDIR": str(temp[0])}) as workers:
        deadline = time.time() + 120
        while time.time() < deadline and _epochs_done(run_dir) < 2:
            assert all(w.poll() is None for w in workers), (
                tmp_path / "worker0.log").read_text()[-3000:]
            time.sleep(0.1)
        # the other worker records the same epochs, in its own temporary folder
        own = list(temp[0].glob("ascl-worker-*"))
        assert len(own) == 1 and (own[0] / "history.json").exists()
        assert (own[0] / "backup" / "latest.weights.h5").exists()
        cluster.kill(workers[1])  # the non-chief
        # The chief's next collective fails once TensorFlow gives up on its peer (a broken
        # connection at once, or missed heartbeats within seconds): it stops with a one-line
        # error saying how to resume, and writes no summary.
        try:
            [code] = cluster.wait_all(workers[:1], timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the chief went on without its peer:\n"
                        + (tmp_path / "worker0.log").read_text()[-3000:])
    _assert_stopped_with_the_lost_worker_error(code, tmp_path / "worker0.log", run_dir,
                                               lost_task=1)
    done_before = _epochs_done(run_dir)
    assert 2 <= done_before < EPOCHS, "the cluster must be killed mid-run"
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))

    # 2. Restarting both resumes from the chief's backup and finishes the configured epochs.
    with cluster.cluster(lambda index: command, log_dir=str(tmp_path),
                         extra_env={"TMPDIR": str(temp[1])}) as workers:
        seen = set()
        deadline = time.time() + 180
        while time.time() < deadline and any(w.poll() is None for w in workers):
            seen.update(path.name for path in temp[1].glob("ascl-worker-*"))
            time.sleep(0.1)
        codes = cluster.wait_all(workers, timeout=max(1, deadline - time.time()))
    logs = "\n".join((tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], logs
    history = json.load(open(os.path.join(run_dir, "history.json")))
    assert [record["epoch"] for record in history] == list(range(1, EPOCHS + 1))
    assert all("test_knn_top1" in history[e - 1] for e in (4, 8, 12))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["replicas"] == 2 and summary["epochs"] == EPOCHS and summary["chief"]

    # 3. One writer: the run directory holds the chief's files only, and the other worker's
    # temporary folder of the finished sitting is gone.
    assert sorted(os.listdir(run_dir)) == ["backup", "checkpoints", "config.yaml",
                                           "history.json", "summary.json", "tensorboard"]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [
        "best.json", "best.weights.h5", "epoch_0004.weights.h5", "epoch_0008.weights.h5",
        "epoch_0012.weights.h5", "last.weights.h5"]
    assert len(seen) == 1, "the other worker wrote into a temporary folder while it ran"
    assert list(temp[1].glob("ascl-worker-*")) == [], "and removed it when it finished"


def test_the_chiefs_death_stops_the_other_worker_with_the_same_error(digits16, tmp_path):
    """The survivor of a lost chief is a worker that writes nothing: it still says which task
    stopped and where the chief's backup is, instead of blocking or printing a traceback."""
    run_dir = str(tmp_path / "run")
    with cluster.cluster(lambda index: _command(digits16, run_dir),
                         log_dir=str(tmp_path)) as workers:
        deadline = time.time() + 120
        while time.time() < deadline and _epochs_done(run_dir) < 2:
            assert all(w.poll() is None for w in workers), _logs(tmp_path)
            time.sleep(0.1)
        assert 2 <= _epochs_done(run_dir) < EPOCHS, "the chief must be killed mid-run"
        cluster.kill(workers[0])
        try:
            [code] = cluster.wait_all(workers[1:], timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker went on without its chief:\n" + _logs(tmp_path))
    # the chief is dead, so its backup is what it last wrote (atomically) before the kill
    _assert_stopped_with_the_lost_worker_error(code, tmp_path / "worker1.log", run_dir,
                                               lost_task=0)


def _assert_stopped_with_the_lost_worker_error(code, log_path, run_dir, lost_task):
    """The survivor exited 1 with the one-line error: the lost task, the chief's backup epoch
    as it is on disk now, how to resume, and no traceback."""
    log = log_path.read_text()
    assert code == 1, log[-3000:]
    _, backed_up = RunDir(run_dir).readable_backup()
    assert ("ascl train: error: a worker of the cluster stopped "
            f"(/job:worker/replica:0/task:{lost_task})" in log), log[-3000:]
    assert (f"The run keeps the chief's last backup, after epoch {backed_up}, in {run_dir}: "
            "start every worker again with the same command to resume") in log, log[-3000:]
    assert "Traceback (most recent call last)" not in log


def _logs(tmp_path):
    return "\n".join(f"worker{i}: " + (tmp_path / f"worker{i}.log").read_text()[-3000:]
                      for i in range(2))


def test_importing_the_package_leaves_tensorflow_uninitialised():
    """A multi-worker strategy can only be created before TensorFlow's context exists, so no
    module may run a TensorFlow op when imported (a module-level ``tf.constant`` did)."""
    import subprocess

    script = ("from tensorflow.python.eager import context\n"
              "import models, pipeline.cli, pipeline.train, pipeline.evaluate, pipeline.export\n"
              "import beam_jobs.prepare, beam_jobs.embed\n"
              "print(context.context()._context_handle is None)\n")
    result = subprocess.run([cluster.PYTHON, "-c", script], capture_output=True, text=True,
                            cwd=cluster.ROOT, env=cluster.worker_env([0], 0))
    assert result.stdout.strip() == "True", result.stderr[-2000:]
