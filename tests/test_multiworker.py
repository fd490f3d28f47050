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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each launcher proves the property once: horovodrun at k=3 (with Horovod's timeline),
    mpirun at k=1 and k=3 in one launch. Returns {(launcher, k): directory of rank files}."""
    horovodrun = tmp_path_factory.mktemp("horovodrun")
    run_script("horovodrun", WORKERS_DIR / "train_shards.py", "--accumulation-steps", "3",
               "--epochs", str(EPOCHS), "--out", str(horovodrun),
               extra_env={"HOROVOD_TIMELINE": str(horovodrun / "timeline.json")})
    mpirun = tmp_path_factory.mktemp("mpirun")
    run_script("mpirun", WORKERS_DIR / "train_shards.py", "--accumulation-steps", "1,3",
               "--epochs", str(EPOCHS), "--out", str(mpirun))
    return {("horovodrun", 3): horovodrun, ("mpirun", 1): mpirun / "k1",
            ("mpirun", 3): mpirun / "k3"}


@pytest.mark.parametrize("launcher, accumulation_steps",
                         [("horovodrun", 3), ("mpirun", 1), ("mpirun", 3)],
                         ids=["horovodrun-k3", "mpirun-k1", "mpirun-k3"])
def test_two_workers_match_large_batch_reference_when_shards_are_uneven(
    runs, launcher, accumulation_steps
):
    directory = runs[launcher, accumulation_steps]
    ranks = [np.load(directory / f"rank{r}.npz") for r in range(2)]
    expected_weights, expected_updates = _reference(accumulation_steps, "sgd")
    for saved in ranks:
        assert int(saved["num_workers"]) == 2
        assert int(saved["iterations"]) == expected_updates
        for index, expected in enumerate(expected_weights):
            np.testing.assert_allclose(saved[f"arr_{index}"], expected, rtol=1e-5, atol=1e-7)
    for index in range(len(expected_weights)):
        np.testing.assert_array_equal(ranks[0][f"arr_{index}"], ranks[1][f"arr_{index}"])
    np.testing.assert_array_equal(ranks[0]["loss"], ranks[1]["loss"])


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
