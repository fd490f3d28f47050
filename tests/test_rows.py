"""The row exchange (`distaccum.rows`): its encoding alone, then two real workers under
horovodrun and mpirun training an Embedding text classifier with and without it."""

from __future__ import annotations

import importlib.util

import keras
import numpy as np
import pytest
import tensorflow as tf

import scenarios
from conftest import WORKERS_DIR, run_script
from distaccum import comm, rows
from distaccum.timeline import collective_bytes, collective_counts

# Indices whose low 16 bits are a float16 Inf or NaN (0x7C00–0x7FFF) or a bfloat16 NaN, and the
# largest row: each must arrive as the same row.
INDICES = [0, 5, 0x7C00, 0x7C01, 0x7FFF, 0x7FC1, 39_999]


def _table() -> np.ndarray:
    values = np.zeros((40_000, 3), np.float32)
    values[INDICES] = np.arange(1, 3 * len(INDICES) + 1).reshape(-1, 3)
    values[7, 1] = np.nan  # a non-finite row travels too
    return values


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
def test_payload_carries_each_nonzero_row_and_its_index_bit_for_bit(dtype):
    dense = _table()
    payload = rows.payload(tf.constant(dense), dtype)
    assert payload.dtype == dtype
    assert payload.shape == (len(INDICES) + 1, rows.INDEX_BYTES // dtype.size + 3)
    assert float(rows.rows_touched(tf.constant(dense))) == len(INDICES) + 1
    # Two workers' rows, the second's a part of the first's: added row by row.
    total = tf.Variable(tf.fill(dense.shape, 7.0))  # written over: its old values go
    rows.write_table(total, [payload, payload[:2]])
    total = total.numpy()
    expected = dense.astype(dtype.as_numpy_dtype).astype(np.float32)
    expected[[0, 5]] *= 2
    np.testing.assert_array_equal(total, expected)


def test_rows_pay_exactly_when_they_save_the_minimum_bytes():
    exchange = rows.RowExchange(comm.SingleProcessBackend(), [False, True], [[3], [100_000, 8]],
                                tf.float32)
    dense = 2 * 4 * 100_000 * 8  # a ring allreduce sends about twice the table per rank
    most = (dense - rows.MIN_SAVING_BYTES) // (rows.INDEX_BYTES + 4 * 8)
    for touched, pays in [(most, True), (most + 1, False), (np.inf, False)]:  # inf: no update yet
        assert bool(exchange.rows_pay(tf.constant([touched], tf.float32))) == pays, touched


def test_expected_rows_are_the_largest_recent_count_forgotten_by_a_tenth_per_update():
    # Through the single-process backend, whose collectives are the identity: each update's
    # own rows. Windows batched by length alternate few rows and many: the many decide.
    exchange = rows.RowExchange(comm.SingleProcessBackend(), [True], [[1000, 8]], tf.float32)
    assert exchange.expected_rows == [np.inf]  # before the first update: dense
    expected = []
    for touched in (10, 500, 10, 10, 600):
        total = np.zeros((1000, 8), np.float32)
        total[:touched, 3] = 1.0
        summed = tf.Variable(total)
        assert exchange.sum_in_place([summed], [], "update") == []
        np.testing.assert_array_equal(summed.numpy(), total)
        expected.append(exchange.expected_rows[0])
    np.testing.assert_allclose(expected, [10, 500, 450, 405, 600], rtol=1e-6)


def _worker_script():
    spec = importlib.util.spec_from_file_location("train_rows", WORKERS_DIR / "train_rows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TEXT = _worker_script()
LAUNCHES = {
    "horovodrun": ("horovodrun", ("rows", "dense", "rows-xla", "rows-float16", "rows-mixed",
                                  "dense-mixed", "rows-sharded-mixed"),
                   {"HOROVOD_TIMELINE": "DYNAMIC"}),
    "mpirun-mpi4py": ("mpirun", ("rows", "dense", "rows-xla", "rows-bfloat16", "rows-sharded",
                                 "dense-sharded"),
                      {"DISTACCUM_BACKEND": "mpi"}),
}
ROUND_OFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """{launch: directory of its runs}: one 2-worker launch per backend."""
    found = {}
    for launch, (launcher, names, env) in LAUNCHES.items():
        out = tmp_path_factory.mktemp(launch)
        timelines = ["--timelines"] if "HOROVOD_TIMELINE" in env else []
        run_script(launcher, WORKERS_DIR / "train_rows.py", "--runs", ",".join(names),
                   "--out", str(out), *timelines, extra_env=env)
        found[launch] = out
    return found


def _ranks(directory) -> list:
    return [np.load(directory / f"rank{r}.npz") for r in range(2)]


def _weights(saved, count: int = 3) -> list[np.ndarray]:
    return [saved[f"arr_{i}"] for i in range(count)]


def _reference():
    """The literal large-batch step on the dense gradient, from rank 0's initial weights."""
    shards = [scenarios.split_micro_batches(*TEXT.shard(rank), None, TEXT.MICRO_BATCH_SIZE)
              for rank in range(2)]
    model = scenarios.text_classifier(TEXT.VOCABULARY, TEXT.WIDTH, TEXT.LENGTH, seed=5)
    initial = scenarios.weights_of(model)
    updates = scenarios.reference_training(
        model, TEXT.optimizer(global_clipnorm=TEXT.CLIP),
        keras.losses.BinaryCrossentropy(from_logits=True), shards, TEXT.K, TEXT.EPOCHS,
        densify=True)
    return initial, scenarios.weights_of(model), updates


def _windows_rows(rank: int) -> list[int]:
    """Distinct tokens in each window of `rank`'s epoch (0 for a window its shard ends before):
    the rows its sum touches."""
    tokens, _ = TEXT.shard(rank)
    window = TEXT.K * TEXT.MICRO_BATCH_SIZE
    windows = -(-max(TEXT.SHARD_SIZES) // window)
    return [np.unique(tokens[i * window:(i + 1) * window]).size for i in range(windows)]



@pytest.mark.multiworker
@pytest.mark.rounding
@pytest.mark.parametrize("launch, run", [("horovodrun", "rows"), ("horovodrun", "rows-xla"),
                                         ("mpirun-mpi4py", "rows"), ("mpirun-mpi4py", "rows-xla")])
def test_rows_take_the_dense_large_batch_step_as_the_dense_exchange_does(text_runs, launch, run):
    _, expected, updates = _reference()
    directory = text_runs[launch]
    got, dense = _ranks(directory / run), _ranks(directory / "dense")
    for saved in got:
        assert int(saved["iterations"]) == updates
        scenarios.assert_weights_close(_weights(saved), expected)
    for index in range(3):
        np.testing.assert_array_equal(got[0][f"arr_{index}"], got[1][f"arr_{index}"])
        if run == "rows":  # on two workers both add a + b: the same bits
            np.testing.assert_array_equal(got[0][f"arr_{index}"], dense[0][f"arr_{index}"])


@pytest.mark.multiworker
@pytest.mark.rounding
@pytest.mark.parametrize("launch, dtype", [("horovodrun", "float16"),
                                           ("mpirun-mpi4py", "bfloat16")])
def test_rows_in_a_narrow_dtype_keep_every_index_and_stay_within_its_round_off(text_runs, launch,
                                                                               dtype):
    tokens = np.concatenate([TEXT.shard(rank)[0] for rank in range(2)])
    assert set(TEXT.RARE_WORDS) <= set(tokens.ravel())  # indices with NaN bits in that dtype
    initial, expected, _ = _reference()
    got = _ranks(text_runs[launch] / f"rows-{dtype}")
    movement = max(np.max(np.abs(e - w)) for e, w in zip(expected, initial))
    error = max(np.max(np.abs(g - e)) for g, e in zip(_weights(got[0]), expected))
    assert 0 < error <= 4 * ROUND_OFF[dtype] * movement
    for index in range(3):
        np.testing.assert_array_equal(got[0][f"arr_{index}"], got[1][f"arr_{index}"])


@pytest.mark.multiworker
def test_mpi4py_backend_sends_only_the_touched_rows_after_the_first_update(text_runs):
    directory = text_runs["mpirun-mpi4py"]
    table_bytes = 4 * TEXT.VOCABULARY * TEXT.WIDTH
    for rank in range(2):
        got = np.load(directory / "rows" / f"rank{rank}.npz")
        dense = np.load(directory / "dense" / f"rank{rank}.npz")
        updates = int(got["iterations"])
        # The first update goes dense (nothing is known yet), every later one as rows: this
        # rank's distinct tokens of that window, an int32 index and WIDTH float32 values each,
        # and its row count.
        windows = _windows_rows(rank) * TEXT.EPOCHS
        assert int(got["allgathers"]) == updates - 1 and int(dense["allgathers"]) == 0
        assert int(got["allgather_bytes"]) == sum(
            4 + u * (4 + 4 * TEXT.WIDTH) for u in windows[1:updates])
        # Beside them, one allreduce per update (and one at start-up), without the table after
        # the first update, with each update's row count.
        assert int(got["allreduces"]) == int(dense["allreduces"]) == updates + 1
        assert int(got["allreduce_bytes"]) == (int(dense["allreduce_bytes"]) + 4 * updates
                                               - (updates - 1) * table_bytes)
    assert 0 in _windows_rows(1)  # rank 1 sent no rows for its empty window


@pytest.mark.multiworker
def test_horovod_timeline_shows_one_grouped_allgather_per_update_after_the_first(text_runs):
    directory = text_runs["horovodrun"]
    updates = int(np.load(directory / "rows" / "rank0.npz")["iterations"])
    got = collective_counts(directory / "rows" / "timeline.json")
    gathered = {name: c for name, c in got.items() if name.startswith("HorovodGroupedAllgather")}
    # The row counts and the embedding's rows: one group of two tensors.
    assert len(gathered) == 2
    assert {c["ALLGATHER"] for c in gathered.values()} == {updates - 1}
    dense = collective_counts(directory / "dense" / "timeline.json")
    assert not any("ALLGATHER" in c for c in dense.values())
    table_bytes = 4 * TEXT.VOCABULARY * TEXT.WIDTH
    assert collective_bytes(directory / "rows" / "timeline.json")["float32"] == (
        collective_bytes(directory / "dense" / "timeline.json")["float32"] + 4 * updates
        - (updates - 1) * table_bytes)


@pytest.mark.multiworker
def test_rows_of_two_normalisers_under_mixed_precision_are_one_group_and_the_dense_bits(text_runs):
    # Sample weights and an activity regularizer: the embedding has one sum per normaliser, both
    # gathered in one group with the row counts; float16 compute, loss scaling.
    directory = text_runs["horovodrun"]
    got, dense = _ranks(directory / "rows-mixed"), _ranks(directory / "dense-mixed")
    updates = int(got[0]["iterations"])
    assert updates == int(dense[0]["iterations"]) > 1
    for index in range(3):
        for rank in range(2):
            np.testing.assert_array_equal(got[rank][f"arr_{index}"], dense[0][f"arr_{index}"])
    gathered = {name: c for name, c in collective_counts(directory / "rows-mixed" / "timeline.json")
                .items() if name.startswith("HorovodGroupedAllgather")}
    assert len(gathered) == 3
    assert {c["ALLGATHER"] for c in gathered.values()} == {updates - 1}


@pytest.mark.multiworker
@pytest.mark.rounding
@pytest.mark.parametrize("launch, run", [("horovodrun", "rows-sharded-mixed"),
                                         ("mpirun-mpi4py", "rows-sharded"),
                                         ("mpirun-mpi4py", "dense-sharded")])
def test_sharded_optimizer_state_takes_the_unsharded_steps_with_rows_and_loss_scaling(
        text_runs, launch, run):
    """The row exchange and loss scaling under sharded state: the same updates, none skipped
    where the unsharded run applied, within round-off (the clipping norm adds the shards'
    partial sums in another order)."""
    directory = text_runs[launch]
    got, whole = _ranks(directory / run), _ranks(directory / run.replace("-sharded", ""))
    updates = int(whole[0]["iterations"])
    for saved in got:
        assert int(saved["iterations"]) == updates > 1
        scenarios.assert_weights_close(_weights(saved), _weights(whole[0]))
        if "mixed" not in run:  # float32: the literal large-batch step itself
            scenarios.assert_weights_close(_weights(saved), _reference()[1])
    for index in range(3):
        np.testing.assert_array_equal(got[0][f"arr_{index}"], got[1][f"arr_{index}"])
    if run == "rows-sharded":
        # Rows after the first update, beside each update's weights; at start-up what each
        # worker's optimizer state holds (`state.exchange_slots`). None as training ends:
        # without `use_ema` the weights stay as every worker holds them.
        assert int(got[0]["allgathers"]) == (updates - 1) + updates + 1
        assert int(got[0]["reducescatters"]) == updates
