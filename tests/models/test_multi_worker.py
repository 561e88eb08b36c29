"""Two real worker processes under MultiWorkerMirroredStrategy against one process with two
logical devices under MirroredStrategy, on the same global batches (both forms of ASCL);
and whether the Keras bug that ``models.keras_workarounds`` works around is still there."""

import numpy as np
import pytest

from tests import cluster
from tests.models import distributed_case as case


@pytest.fixture(scope="module")
def cluster_run(two_replicas, tmp_path_factory):
    """``(workers' arrays, the two-device process's replicas' arrays)``, one cluster run."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    outputs = [str(tmp_path / f"worker{index}.npz") for index in range(2)]
    with cluster.cluster(lambda index: [cluster.PYTHON, "-m", "tests.models.distributed_case",
                                        outputs[index]], log_dir=str(tmp_path)) as workers:
        # meanwhile, the reference here: one process, two logical CPUs, the same batches
        replicas = [{}, {}]
        for kind in case.KINDS:
            model, history = case.train(two_replicas, kind)
            for index in range(2):
                replicas[index].update(case.state(model, history, kind, replica=index))
        codes = cluster.wait_all(workers, timeout=120)
    logs = "\n".join((tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], logs
    return [np.load(path) for path in outputs], replicas


def test_two_workers_equal_one_process_with_two_devices(cluster_run):
    workers, replicas = cluster_run
    assert all(bool(worker["seedless_refused"]) for worker in workers)
    assert sorted(name for name in workers[0].files if name != "seedless_refused"
                  and not name.startswith("bug_")) == sorted(replicas[0])
    for kind in case.KINDS:
        paths = workers[0][f"{kind}/paths"]
        assert any(path.endswith("queue") for path in paths) or kind == "byol"
        for index, path in enumerate(paths):
            key = f"{kind}/w{index}"
            if "moving" not in path:  # batch-norm statistics are each replica's own
                np.testing.assert_array_equal(workers[0][key], workers[1][key], err_msg=path)
            for worker, replica in zip(workers, replicas):
                np.testing.assert_allclose(worker[key], replica[key], atol=1e-5, err_msg=path)
        for name in [key for key in replicas[0] if key.startswith(f"{kind}/history/")]:
            np.testing.assert_allclose(workers[0][name], replicas[0][name], atol=1e-5,
                                       err_msg=name)
    # and it trained: the first convolution moved from its initial value
    initial = case.build_model("ascl").weights[0].numpy()
    assert np.abs(workers[0]["ascl/w0"] - initial).max() > 1e-3


@pytest.mark.parametrize("workaround, symptom", [
    ("symbolic_build", "Attempt to convert a value (PerReplica"),
    ("scalar_logs", "Invalid reduction dimension 0 for input with 0 dimensions"),
])
def test_keras_still_needs_the_multi_worker_workarounds(cluster_run, workaround, symptom):
    """Fails once keras-team/keras#20585 is fixed: then delete that workaround from
    ``models/keras_workarounds.py`` (``BuildsOnlyTheOptimizer``, ``reducible_logs``)."""
    error = str(cluster_run[0][0][f"bug_20585/{workaround}"])
    assert error, (f"Keras trains across workers without the {workaround} workaround: "
                   f"keras-team/keras#20585 looks fixed, delete the workaround")
    assert symptom in error, error  # another failure is another bug: look at it
