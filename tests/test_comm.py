"""Backend choice, and training where Horovod cannot even be imported: one process, and
mpirun with the mpi4py backend."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import WORKERS_DIR, run_script
from distaccum import comm


@pytest.mark.parametrize(
    "environ, horovod_installed, expected",
    [
        ({}, True, "single"),
        ({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}, True, "horovod"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True, "horovod"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, False, "mpi"),
        ({"OMPI_COMM_WORLD_SIZE": "2", "DISTACCUM_BACKEND": "single"}, True, "single"),
        ({"DISTACCUM_BACKEND": "horovod"}, True, "horovod"),
        ({"OMPI_COMM_WORLD_SIZE": "2", "DISTACCUM_BACKEND": "mpi"}, True, "mpi"),
    ],
    ids=["no_launcher", "horovodrun", "mpirun", "mpirun_without_horovod", "override_single",
         "override_horovod", "override_mpi"],
)
def test_choose_backend_name_when_environment_is(environ, horovod_installed, expected):
    assert comm.choose_backend_name(environ, horovod_installed) == expected


def test_choose_backend_name_refuses_unknown_override():
    with pytest.raises(ValueError, match="'nccl'"):
        comm.choose_backend_name({"DISTACCUM_BACKEND": "nccl"})


@pytest.mark.multiworker
@pytest.mark.parametrize("launcher, backend, workers",
                         [("python", "single", 1), ("horovodrun", "horovod", 2),
                          ("mpirun", "mpi", 2)])
def test_every_backend_meets_the_collective_contract_when_ranks_give_different_values(
        tmp_path, launcher, backend, workers):
    # One contract for every backend (`comm.Backend`): rank r gives r + 1, so each result has a
    # closed form in the worker count. A collective added to one backend file is added here.
    run_script(launcher, WORKERS_DIR / "collectives.py", "--out", str(tmp_path),
               num_workers=workers, extra_env={"DISTACCUM_BACKEND": backend}, timeout=120)
    total = workers * (workers + 1) / 2
    for rank in range(workers):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert (str(got["backend"]), int(got["workers"])) == (backend, workers)
        np.testing.assert_array_equal(got["sum_vector"], [total] * 3)
        np.testing.assert_array_equal(got["sum_matrix"], [[0, total], [2 * total, 3 * total]])
        assert str(got["narrow_dtype"]) == "float16"  # each part keeps its dtype
        np.testing.assert_array_equal(got["narrow_vector"], [total] * 3)
        np.testing.assert_array_equal(got["narrow_matrix"], [[0, total], [2 * total, 3 * total]])
        np.testing.assert_array_equal(got["max"], [workers, -1])
        np.testing.assert_array_equal(got["gathered_rows"], np.arange(1, workers + 1))
        np.testing.assert_array_equal(
            got["gathered"], np.concatenate([[r + 1.0] * 2 * (r + 1) for r in range(workers)]))
        np.testing.assert_array_equal(got["scattered"], [2 * total] * rank)
        np.testing.assert_array_equal(got["broadcast_vector"], [1.0] * 3)
        np.testing.assert_array_equal(got["broadcast_int"], [[0, 0]])
        np.testing.assert_array_equal(got["in_place_table"],
                                      np.arange(10.0).reshape(5, 2) * total)
        assert float(got["in_place_scalar"]) == total
        np.testing.assert_array_equal(got["in_place_others"], [total] * 3)
        np.testing.assert_array_equal(got["broadcast_in_place_table"], np.ones([5, 2]))
        assert int(got["broadcast_in_place_int"]) == 0


def test_single_process_backend_is_identity():
    backend = comm.SingleProcessBackend()
    assert backend.sum_all([1, 2], "update") == [1, 2]
    assert (backend.num_workers(), backend.rank(), backend.local_rank()) == (1, 0, 0)


@pytest.mark.parametrize("launcher, backend, workers",
                         [("python", "single", 1), ("mpirun", "mpi", 2)])
def test_trains_without_horovod_when_its_import_fails(tmp_path, launcher, backend, workers):
    blocker = tmp_path / "blocker" / "horovod"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('horovod is not installed here')\n")
    check = tmp_path / "check.py"
    check.write_text(
        "import runpy, sys\n"
        "try:\n    import horovod\nexcept ImportError:\n    pass\n"
        "else:\n    sys.exit('horovod imported although blocked')\n"
        f"sys.argv = [{str(WORKERS_DIR / 'train_shards.py')!r}, *sys.argv[1:]]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "assert 'horovod.tensorflow' not in sys.modules\n"
    )
    run_script(
        launcher,
        check,
        "--accumulation-steps", "3", "--epochs", "1", "--out", str(tmp_path),
        extra_env={"PYTHONPATH": str(blocker.parent)},
    )
    saved = np.load(tmp_path / "rank0.npz")
    assert str(saved["backend"]) == backend  # under mpirun: mpi4py, chosen by default
    assert int(saved["num_workers"]) == workers
    assert int(saved["iterations"]) == 2  # ceil(6 micro-batches / 3)


class _Backend:
    def __init__(self, name: str, rank: int) -> None:
        self.name, self._rank = name, rank

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("name, rank, gpus, warns", [
    ("mpi", 0, ["GPU:0"], True), ("mpi", 1, ["GPU:0"], False), ("mpi", 0, [], False),
    ("horovod", 0, ["GPU:0"], False)], ids=["mpi_gpu_chief", "mpi_gpu_other_rank", "mpi_cpu",
                                           "horovod_gpu"])
def test_gpu_ranks_on_the_mpi4py_backend_are_told_of_horovod_with_nccl(
        monkeypatch, recwarn, name, rank, gpus, warns):
    import tensorflow as tf

    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind: gpus if kind == "GPU" else [])
    comm.warn_if_gpus_sum_through_host(_Backend(name, rank))
    messages = [str(w.message) for w in recwarn if w.category is comm.HostMemoryWarning]
    assert messages == ([
        "the mpi4py backend sums gradients through host memory (a copy from each GPU and back per "
        "update, no NCCL); on GPUs use Horovod with NCCL: launch/setup.sh --gpu --horovod, then "
        "DISTACCUM_BACKEND=horovod"] if warns else [])


def test_trainer_tells_at_start_up_when_its_gpu_ranks_sum_through_host_memory(monkeypatch,
                                                                              recwarn):
    # The warning's wiring: `Trainer.prepare` asks with the trainer's own backend (here the
    # single-process one, named as mpi4py, on a faked GPU).
    import keras
    import tensorflow as tf

    import distaccum
    import scenarios

    x, y, _ = scenarios.make_shard(0, 8, weighted=False)
    trainer = distaccum.Trainer(scenarios.make_model(), keras.optimizers.SGD(0.1), loss="mse")
    monkeypatch.setattr(trainer.backend, "name", "mpi")
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    trainer.fit(scenarios.as_dataset(x, y, None), epochs=1)
    assert [w for w in recwarn if w.category is comm.HostMemoryWarning]
