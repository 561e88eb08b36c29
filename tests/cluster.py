"""Starting real multi-worker clusters on 127.0.0.1 for tests: free ports, ``TF_CONFIG``,
and worker processes that never outlive the test."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(count):
    """``count`` ports nothing listens on now (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def worker_env(ports, index, extra_env=None):
    """The environment of worker ``index``: ``TF_CONFIG`` naming every worker, one CPU each."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(extra_env or {})
    env["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
        "task": {"type": "worker", "index": index}})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


@contextlib.contextmanager
def cluster(command_of, count=2, log_dir=None, extra_env=None):
    """Starts ``count`` workers running ``command_of(index)``; yields the ``Popen``s, and kills
    whatever still runs on the way out, whether the test passed or failed."""
    ports = free_ports(count)
    processes = []
    try:
        for index in range(count):
            log = (open(os.path.join(log_dir, f"worker{index}.log"), "ab") if log_dir
                   else subprocess.DEVNULL)
            processes.append(subprocess.Popen(
                command_of(index), env=worker_env(ports, index, extra_env), cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def kill(process):
    """SIGKILL, as a lost machine or an OOM kill would end it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_all(processes, timeout):
    """Return codes of every process, killing them all when ``timeout`` seconds pass."""
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for other in processes:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            raise
    return codes


PYTHON = sys.executable
