"""Two real processes under horovodrun --gloo and under mpirun, against the reference."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import scenarios
from conftest import WORKERS_DIR, run_script
from distaccum.timeline import collective_counts

pytestmark = pytest.mark.multiworker

EPOCHS = 2


def _reference(accumulation_steps: int, optimizer: str):
    shards = [
        scenarios.split_micro_batches(*scenarios.make_shard(rank, size))
        for rank, size in enumerate(scenarios.SHARD_SIZES)
    ]
    model = scenarios.make_model(seed=7)
    updates = scenarios.reference_training(
        model,
        scenarios.make_optimizer(optimizer),
        keras.losses.MeanSquaredError(),
        shards,
        accumulation_steps,
        EPOCHS,
    )
    return scenarios.weights_of(model), updates


# Each backend under each launcher it runs under proves the property once: Horovod under
# horovodrun (k=3, with Horovod's timeline) and under mpirun (k=1 and k=3 in one launch), mpi4py
# under mpirun (k=1 and k=3).
LAUNCHES = {
    "horovodrun": ("horovodrun", "3", {}),
    "mpirun": ("mpirun", "1,3", {}),
    "mpirun-mpi4py": ("mpirun", "1,3", {"DISTACCUM_BACKEND": "mpi"}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(launch, k): directory of rank files}."""
    found = {}
    for launch, (launcher, steps, env) in LAUNCHES.items():
        out = tmp_path_factory.mktemp(launch)
        if launch == "horovodrun":
            env = {**env, "HOROVOD_TIMELINE": str(out / "timeline.json")}
        run_script(launcher, WORKERS_DIR / "train_shards.py", "--accumulation-steps", steps,
                   "--epochs", str(EPOCHS), "--out", str(out), extra_env=env)
        for k in map(int, steps.split(",")):
            found[launch, k] = out / f"k{k}" if "," in steps else out
    return found


@pytest.mark.parametrize("launch, accumulation_steps",
                         [("horovodrun", 3), ("mpirun", 1), ("mpirun", 3), ("mpirun-mpi4py", 1),
                          ("mpirun-mpi4py", 3)],
                         ids=["horovodrun-k3", "mpirun-k1", "mpirun-k3", "mpirun-mpi4py-k1",
                              "mpirun-mpi4py-k3"])
def test_two_workers_match_large_batch_reference_when_shards_are_uneven(
    runs, launch, accumulation_steps
):
    directory = runs[launch, accumulation_steps]
    ranks = [np.load(directory / f"rank{r}.npz") for r in range(2)]
    expected_weights, expected_updates = _reference(accumulation_steps, "sgd")
    for saved in ranks:
        assert str(saved["backend"]) == ("mpi" if launch.endswith("mpi4py") else "horovod")
        assert int(saved["num_workers"]) == 2
        assert int(saved["iterations"]) == expected_updates
        for index, expected in enumerate(expected_weights):
            np.testing.assert_allclose(saved[f"arr_{index}"], expected, rtol=1e-5, atol=1e-7)
    for index in range(len(expected_weights)):
        np.testing.assert_array_equal(ranks[0][f"arr_{index}"], ranks[1][f"arr_{index}"])
    np.testing.assert_array_equal(ranks[0]["loss"], ranks[1]["loss"])


@pytest.mark.parametrize("accumulation_steps, updates", [(1, 12), (3, 4)], ids=["k1", "k3"])
def test_mpi4py_backend_allreduces_once_per_update_when_counted(runs, accumulation_steps, updates):
    for rank in range(2):
        saved = np.load(runs["mpirun-mpi4py", accumulation_steps] / f"rank{rank}.npz")
        assert int(saved["iterations"]) == updates
        # One fused allreduce per update, none on micro-steps, one for the plan agreement; one
        # broadcast at start-up.
        assert int(saved["allreduces"]) == updates + 1
        assert int(saved["broadcasts"]) == 1


def test_allreduce_count_equals_updates_not_micro_batches_when_k_is_3(runs):
    directory = runs["horovodrun", 3]
    # Worker 0 has ceil(23/4) = 6 micro-batches per epoch, so 2 updates per epoch at k=3.
    expected_updates = EPOCHS * 2
    micro_batches = EPOCHS * 6
    assert int(np.load(directory / "rank0.npz")["iterations"]) == expected_updates
    counts = collective_counts(directory / "timeline.json")
    gradient_rows = {
        name: c for name, c in counts.items() if name.startswith("HorovodGroupedAllreduce")
    }
    num_variables = len(scenarios.make_model().trainable_variables)
    # One row per gradient sum, plus loss sum, weight sum, sample count and votes: one group.
    assert len(gradient_rows) == num_variables + 4
    assert {c["ALLREDUCE"] for c in gradient_rows.values()} == {expected_updates}
    assert expected_updates < micro_batches
    other = {name: c for name, c in counts.items() if name not in gradient_rows}
    # Start-up only: one broadcast per dtype of model + optimizer state, one max for the plan.
    assert sum(sum(c.values()) for c in other.values()) <= 3
