"""Two real worker processes under MultiWorkerMirroredStrategy against one process with two
logical devices under MirroredStrategy, on the same global batches (both forms of ASCL)."""

import time

import numpy as np

from tests import cluster
from tests.models import distributed_case as case


def test_two_workers_equal_one_process_with_two_devices(two_replicas, tmp_path):
    start = time.perf_counter()
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
    workers = [np.load(path) for path in outputs]
    assert all(bool(worker["seedless_refused"]) for worker in workers)
    assert sorted(set(workers[0].files) - {"seedless_refused"}) == sorted(replicas[0])
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
    assert time.perf_counter() - start < 60, "the two-worker test must stay under a minute"
