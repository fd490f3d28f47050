"""Two real processes under horovodrun --gloo and under mpirun, against the reference."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import scenarios
from conftest import WORKERS_DIR, run_script
from distaccum.timeline import collective_bytes, collective_counts

pytestmark = pytest.mark.multiworker

EPOCHS = 2


def _reference(accumulation_steps: int, optimizer: str):
    shards = [
        scenarios.split_micro_batches(*scenarios.make_shard(rank, size))
        for rank, size in enumerate(scenarios.SHARD_SIZES)
    ]
    model = scenarios.make_model(seed=7)
    optimizer = scenarios.make_optimizer(optimizer)
    updates = scenarios.reference_training(
        model,
        optimizer,
        keras.losses.MeanSquaredError(),
        shards,
        accumulation_steps,
        EPOCHS,
    )
    optimizer.finalize_variable_values(model.trainable_variables)  # as Keras's fit ends
    return scenarios.weights_of(model), updates


# Each backend under each launcher it runs under proves the property once: Horovod under
# horovodrun (k=3, a Horovod timeline per training, float32 and float16 gradient sums, sharded
# optimizer state) and under mpirun (k=1 and k=3 in one launch, with XLA and without), mpi4py
# under mpirun (k=1 and k=3, float32 and bfloat16, with XLA and without, sharded state).
LAUNCHES = {
    "horovodrun": ("horovodrun", "3", ("float32", "float16"), ("false",),
                   ("sgd", "adafactor_clipped"), {"HOROVOD_TIMELINE": "DYNAMIC"}),
    "mpirun": ("mpirun", "1,3", ("float32",), ("false", "true"), (), {}),
    "mpirun-mpi4py": ("mpirun", "1,3", ("float32", "bfloat16"), ("false", "true"),
                      ("sgd", "adamw_ema"), {"DISTACCUM_BACKEND": "mpi"}),
}
# Unit round-off of each type gradient sums can travel in.
ROUND_OFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(launch, k, *variant): directory of rank files}, variant () or some of (dtype,
    "sharded", optimizer, "xla") as train_shards.py names its runs."""
    found = {}
    for launch, (launcher, steps, dtypes, jit_values, sharded, env) in LAUNCHES.items():
        out = tmp_path_factory.mktemp(launch)
        timelines = ["--timelines"] if "HOROVOD_TIMELINE" in env else []
        run_script(launcher, WORKERS_DIR / "train_shards.py", "--accumulation-steps", steps,
                   "--allreduce-dtypes", ",".join(dtypes), "--jit-compile", ",".join(jit_values),
                   "--sharded-optimizers", ",".join(sharded), *timelines,
                   "--epochs", str(EPOCHS), "--out", str(out), extra_env=env)
        trainings = [(int(k), (() if dtype == "float32" else (dtype,)) + xla)
                     for k in steps.split(",") for dtype in dtypes for jit in jit_values
                     for xla in [("xla",) if jit == "true" else ()]
                     if dtype == "float32" or not xla]
        trainings += [(int(k), ("sharded", name) + xla)
                      for k in steps.split(",") for name in sharded for jit in jit_values
                      for xla in [("xla",) if jit == "true" else ()]
                      if name == sharded[0] or not xla]
        for k, variant in trainings:
            name = "-".join([f"k{k}", *variant])
            found[(launch, k, *variant)] = out / name if len(trainings) > 1 else out
    return found


# XLA fuses and reorders the same float32 sums: the reference's tolerance holds (docs/rounding.md).
@pytest.mark.rounding
@pytest.mark.parametrize("launch, accumulation_steps, variant",
                         [("horovodrun", 3, ()), ("mpirun", 1, ()), ("mpirun", 3, ()),
                          ("mpirun", 1, ("xla",)), ("mpirun", 3, ("xla",)),
                          ("mpirun-mpi4py", 1, ()), ("mpirun-mpi4py", 3, ()),
                          ("mpirun-mpi4py", 1, ("xla",)), ("mpirun-mpi4py", 3, ("xla",))],
                         ids=["horovodrun-k3", "mpirun-k1", "mpirun-k3", "mpirun-k1-xla",
                              "mpirun-k3-xla", "mpirun-mpi4py-k1", "mpirun-mpi4py-k3",
                              "mpirun-mpi4py-k1-xla", "mpirun-mpi4py-k3-xla"])
def test_two_workers_match_large_batch_reference_when_shards_are_uneven(
    runs, launch, accumulation_steps, variant
):
    directory = runs[(launch, accumulation_steps, *variant)]
    ranks = [np.load(directory / f"rank{r}.npz") for r in range(2)]
    expected_weights, expected_updates = _reference(accumulation_steps, "sgd")
    for saved in ranks:
        assert str(saved["backend"]) == ("mpi" if launch.endswith("mpi4py") else "horovod")
        assert int(saved["num_workers"]) == 2
        assert int(saved["iterations"]) == expected_updates
        scenarios.assert_weights_close([saved[f"arr_{i}"] for i in range(len(expected_weights))],
                                       expected_weights)
    for index in range(len(expected_weights)):
        np.testing.assert_array_equal(ranks[0][f"arr_{index}"], ranks[1][f"arr_{index}"])
    np.testing.assert_array_equal(ranks[0]["loss"], ranks[1]["loss"])


@pytest.mark.parametrize("accumulation_steps, updates, variant",
                         [(1, 12, ()), (3, 4, ()), (3, 4, ("xla",))], ids=["k1", "k3", "k3-xla"])
def test_mpi4py_backend_allreduces_once_per_update_when_counted(runs, accumulation_steps, updates,
                                                                variant):
    for rank in range(2):
        saved = np.load(runs[("mpirun-mpi4py", accumulation_steps, *variant)] / f"rank{rank}.npz")
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


@pytest.mark.rounding
@pytest.mark.parametrize("launch, dtype", [("horovodrun", "float16"), ("mpirun-mpi4py", "bfloat16")])
def test_narrow_allreduce_halves_gradient_bytes_and_stays_within_its_round_off(runs, launch, dtype):
    accumulation_steps = 3
    exact = runs[launch, accumulation_steps]
    narrow = runs[launch, accumulation_steps, dtype]
    ranks = [np.load(narrow / f"rank{r}.npz") for r in range(2)]
    expected_weights, expected_updates = _reference(accumulation_steps, "sgd")
    initial = scenarios.weights_of(scenarios.make_model(seed=7))
    movement = max(np.max(np.abs(e - w)) for e, w in zip(expected_weights, initial))
    error = max(np.max(np.abs(ranks[0][f"arr_{i}"] - e)) for i, e in enumerate(expected_weights))
    # Within a few round-offs of the type, relative to how far training moved the weights; and
    # not exact, so the narrow sums really travelled.
    assert 0 < error <= 4 * ROUND_OFF[dtype] * movement
    for index in range(len(expected_weights)):
        np.testing.assert_array_equal(ranks[0][f"arr_{index}"], ranks[1][f"arr_{index}"])
    assert int(ranks[0]["iterations"]) == expected_updates
    gradient_values = sum(w.size for w in initial)
    if launch == "horovodrun":  # bytes from Horovod's timeline
        sent, sent_exact = collective_bytes(narrow / "timeline.json"), collective_bytes(
            exact / "timeline.json")
        assert sent[dtype] == expected_updates * gradient_values * 2
        assert sent["float32"] == sent_exact["float32"] - expected_updates * gradient_values * 4
    else:  # bytes from the mpi4py backend's own counter; one buffer, narrow part padded to even
        padded = gradient_values + gradient_values % 2
        saved_exact = np.load(exact / "rank0.npz")
        assert int(ranks[0]["allreduce_bytes"]) == int(saved_exact["allreduce_bytes"]) - (
            expected_updates * (gradient_values * 4 - padded * 2))
        assert int(ranks[0]["allreduces"]) == int(saved_exact["allreduces"])


# On two workers a reduce-scatter adds the same two numbers as the allreduce, so sharded state
# takes the unsharded run's steps bit for bit (XLA included: the apply then runs outside it, as
# its elementwise updates round alike). These sharded runs send a kernel in ranges of rows, as a
# large table travels (train_shards.py), so the ranges are checked too.
@pytest.mark.parametrize("launch, accumulation_steps, variant",
                         [("horovodrun", 3, ()), ("mpirun-mpi4py", 1, ()),
                          ("mpirun-mpi4py", 3, ()), ("mpirun-mpi4py", 3, ("xla",))],
                         ids=["horovodrun-k3", "mpirun-mpi4py-k1", "mpirun-mpi4py-k3",
                              "mpirun-mpi4py-k3-xla"])
def test_sharded_optimizer_state_takes_the_unsharded_steps_when_two_workers_sum(
        runs, launch, accumulation_steps, variant):
    count = len(scenarios.make_model().trainable_variables)
    for rank in range(2):
        whole = np.load(runs[(launch, accumulation_steps, *variant)] / f"rank{rank}.npz")
        sharded = np.load(runs[(launch, accumulation_steps, "sharded", "sgd", *variant)]
                          / f"rank{rank}.npz")
        assert int(sharded["travelling"]) > count  # a variable did travel in ranges of rows
        for index in range(count):
            np.testing.assert_array_equal(sharded[f"arr_{index}"], whole[f"arr_{index}"])
        np.testing.assert_array_equal(sharded["loss"], whole["loss"])
        assert int(sharded["iterations"]) == int(whole["iterations"])


@pytest.mark.rounding
@pytest.mark.parametrize("launch, optimizer", [("horovodrun", "adafactor_clipped"),
                                               ("mpirun-mpi4py", "adamw_ema")])
def test_sharded_optimizer_state_matches_the_reference_when_the_optimizer_is_not_elementwise(
        runs, launch, optimizer):
    """Adafactor factors each kernel's second moment and is clipped by the global norm of all
    shards; AdamW decays weights and writes moving averages over them (every third update and
    at the end). Each worker owns whole variables, so each stays Keras's step."""
    accumulation_steps = 3
    expected_weights, expected_updates = _reference(accumulation_steps, optimizer)
    unclipped = optimizer.replace("_clipped", "")
    ranks = [np.load(runs[(launch, accumulation_steps, "sharded", optimizer)] / f"rank{r}.npz")
             for r in range(2)]
    for saved in ranks:
        weights = [saved[f"arr_{i}"] for i in range(len(expected_weights))]
        assert int(saved["iterations"]) == expected_updates
        scenarios.assert_weights_close(weights, expected_weights)
        if unclipped != optimizer:  # the clip bit: without it the steps differ
            start = scenarios.flat(scenarios.weights_of(scenarios.make_model(seed=7)))
            assert scenarios.distance(weights, _reference(accumulation_steps, unclipped)[0],
                                      start) > 1e-2
    for index in range(len(expected_weights)):
        np.testing.assert_array_equal(ranks[0][f"arr_{index}"], ranks[1][f"arr_{index}"])


def test_sharded_optimizer_state_sends_the_allreduces_bytes_when_counted(runs):
    """Per update, one reduce-scatter of the sums and one allgather of the weights in place of
    the allreduce: as many bytes as the allreduce sends in a ring (which is a reduce-scatter and
    an allgather: 2(N-1)/N of its buffer per rank, against (N-1)/N for each of the two), but for
    the riders every segment carries, the gather's row counts and the norm. Counted by the
    mpi4py backend, in bytes each rank passes in."""
    workers, accumulation_steps = 2, 3
    gradient = 4 * sum(w.size for w in scenarios.weights_of(scenarios.make_model()))
    # loss sum, divisor, sample count; stop, cancel, change, bad per rank
    riders = 4 * (3 + 3 + workers)
    whole = [np.load(runs[("mpirun-mpi4py", accumulation_steps)] / f"rank{r}.npz")
             for r in range(workers)]
    sharded = [np.load(runs[("mpirun-mpi4py", accumulation_steps, "sharded", "sgd")]
                       / f"rank{r}.npz") for r in range(workers)]
    updates = int(whole[0]["iterations"])
    start_up = int(whole[0]["allreduce_bytes"]) - updates * (gradient + riders)  # the plan's
    for saved in sharded:
        assert int(saved["reducescatters"]) == updates
        assert int(saved["reducescatter_bytes"]) == updates * (gradient + workers * riders)
        # Per update; at start-up, what each worker's optimizer state holds
        # (`state.exchange_slots`). None as training ends: without `use_ema` Keras's fit keeps
        # the weights every worker holds already.
        assert int(saved["allgathers"]) == updates + 1
        # The norm's partial sums per update; the plan's agreement at start-up.
        assert int(saved["allreduces"]) == int(whole[0]["allreduces"])
        assert int(saved["allreduce_bytes"]) == updates * 4 + start_up
    # At start-up each slot (SGD's momentum, one per variable) is a row of 12 int32 (its
    # variable, position, dtype, rank and 8 dimensions), with each worker's row count.
    slot_rows = 4 * 12 * len(scenarios.make_model().trainable_variables) + 4 * workers
    gathered = sum(int(saved["allgather_bytes"]) for saved in sharded) - slot_rows
    # Each variable, or range of a variable's rows, a tensor of the gather, with its row count
    # from every worker (train_shards.py sends the first kernel in ranges).
    counts = 4 * int(sharded[0]["travelling"]) * workers
    assert gathered == updates * (gradient + counts)
    # Per rank and update, as a ring sends them: the same bytes, but for the riders and counts.
    share = (workers - 1) / workers
    ring_whole = 2 * share * (int(whole[0]["allreduce_bytes"]) - start_up) / updates
    ring_sharded = share * (int(sharded[0]["reducescatter_bytes"]) / updates
                            + gathered / updates)
    assert 0 <= ring_sharded - ring_whole <= share * (workers * riders + counts)


def test_sharded_optimizer_state_under_horovod_sends_the_sums_and_weights_once_per_update(runs):
    """Horovod's timeline (rank 0's) of the sharded run: per update, one alltoall of the sums
    (the reduce-scatter) on the update's row, no allreduce of them, and an allgather that
    gathers every weight once (what each rank receives: its own and the others' share)."""
    directory = runs[("horovodrun", 3, "sharded", "sgd")]
    saved = np.load(directory / "rank0.npz")
    updates = int(saved["iterations"])
    timeline = directory / "timeline.json"
    counts = collective_counts(timeline)
    update_rows = {name: c for name, c in counts.items() if "_distaccum_update" in name}
    # The tiny model is one round.
    assert [(name.split("_distaccum")[0], dict(c)) for name, c in update_rows.items()] == [
        ("HorovodAlltoall", {"ALLTOALL": updates})]
    weights = 4 * sum(w.size for w in scenarios.weights_of(scenarios.make_model()))
    gathered = collective_bytes(timeline, "ALLGATHER", "HorovodGroupedAllgather_distaccum_weights")
    # Each weight gathered per update, with every rank's row counts (int32 bytes, a row per
    # rank: the group's first tensor), one per variable or range of rows (train_shards.py sends
    # the first kernel in ranges).
    assert gathered == {"uint8": updates * (weights + 4 * int(saved["travelling"]) * 2)}
