"""Parquet and Arrow IPC files as data: every row once per epoch, row groups as the order's
chunks (a worker decodes the row groups of its span, not every row group for a few rows), rows
through `parse` or `columns`, Keras's large-batch steps, and one line for each bad input."""

from __future__ import annotations

import math
import re

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import distaccum
from distaccum import comm, order, sources, tables
from distaccum import config as config_module
from distaccum.recordfiles import RecordFileError

import scenarios

# Rows per file; row groups of GROUP rows (the last of a file shorter).
FILE_ROWS, GROUP, FEATURES = (230, 0, 170), 50, 3
MICRO_BATCH_SIZE, K = 4, 2


def _rows(count: int, start: int) -> pa.Table:
    ids = np.arange(start, start + count)
    rng = np.random.default_rng(start)
    return pa.table({
        "id": ids,
        **{f"f{i}": rng.normal(size=count).astype("float32") for i in range(FEATURES)},
        "label": (ids % 3).astype("int32"),
        "weight": (1 + ids % 2).astype("float64"),
        "text": pa.array([f"row {i}" for i in ids], pa.string()),
        "vector": pa.array([[float(i), -float(i)] for i in ids], pa.list_(pa.float32(), 2)),
    })


def write_tables(directory, kind: str = "parquet", file_rows=FILE_ROWS) -> str:
    """Files of `_rows`, numbered on from file to file; returns their glob."""
    start = 0
    for i, count in enumerate(file_rows):
        table, path = _rows(count, start), directory / f"part-{i}.{kind}"
        if kind == "parquet":
            pq.write_table(table, path, row_group_size=GROUP)
        else:
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
                for batch in table.to_batches(max_chunksize=GROUP):
                    out.write_batch(batch)
        start += count
    return f"{directory}/*.{kind}"


COLUMNS = {"x": [f"f{i}" for i in range(FEATURES)], "y": "label", "sample_weight": "weight"}


def _by_id(dataset) -> dict[int, tuple]:
    """{id: (x, y, w)} of every sample of a pipeline whose x is (features, id)."""
    found = {}
    for x, y, w in dataset.as_numpy_iterator():
        for row in range(len(y)):
            found.setdefault(int(x["id"][row]), []).append(
                (x["features"][row], y[row], w[row]))
    return found


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_every_row_once_per_epoch_with_its_own_values_through_parse(tmp_path, kind):
    pattern = write_tables(tmp_path, kind)
    reference = pa.concat_tables([_rows(c, s) for c, s in zip(FILE_ROWS, (0, 230, 230))])

    def parse(row):
        features = [row[f"f{i}"] for i in range(FEATURES)]
        return {"features": features, "id": row["id"]}, row["label"], row["weight"]

    batches = distaccum.micro_batches(pattern, MICRO_BATCH_SIZE, parse=parse, seed=2)
    total = sum(FILE_ROWS)
    assert batches.samples.sizes == (50, 50, 50, 50, 30, 50, 50, 50, 20)  # empty file skipped
    assert batches.plan(K).updates_per_epoch == math.ceil(total / (K * MICRO_BATCH_SIZE))
    for epoch in (1, 2):
        seen = _by_id(batches.epoch(epoch, K))
        assert sorted(seen) == list(range(total)) and all(len(v) == 1 for v in seen.values())
        for i in (0, 229, 230, 399):
            (features, y, w), = seen[i]
            np.testing.assert_array_equal(
                features, [reference.column(f"f{c}")[i].as_py() for c in range(FEATURES)])
            assert y == i % 3 and w == 1 + i % 2


def test_columns_stack_features_and_text_and_fixed_lists_keep_their_form(tmp_path):
    pattern = write_tables(tmp_path)
    stacked = distaccum.micro_batches(pattern, 5, columns=COLUMNS)
    x, y, w = next(iter(stacked.evaluation()))
    assert x.shape == (5, FEATURES) and x.dtype == "float32" and y.dtype == "int32"
    np.testing.assert_array_equal(w.numpy(), 1 + np.arange(5) % 2)
    kept = distaccum.micro_batches(pattern, 5, columns={"x": "vector", "y": "text"})
    x, y = next(iter(kept.evaluation()))
    np.testing.assert_array_equal(x.numpy(), [[i, -i] for i in range(5)])
    assert [t.decode() for t in y.numpy()] == [f"row {i}" for i in range(5)]


def test_each_of_two_workers_decodes_the_row_groups_of_its_span_only(tmp_path, monkeypatch):
    # 40 row groups of 50 rows: each worker's span covers 20 of them, cut at most at its ends.
    pattern = write_tables(tmp_path, file_rows=(1000, 1000))
    decoded = [[]]  # per worker and epoch (the first: the look at the first row)
    group = tables.TableSamples._group

    def counting(self, index, held):
        if index not in held.groups:
            decoded[-1].append(index)
        return group(self, index, held)

    monkeypatch.setattr(tables.TableSamples, "_group", counting)
    # Indexed by this one process (two patched workers would each index half the files).
    samples = tables.TableSamples(tables.index(pattern), columns=COLUMNS)
    for rank in (0, 1):  # each worker's view, in this process: the order is arithmetic
        monkeypatch.setattr(comm, "num_workers", lambda: 2)
        monkeypatch.setattr(comm, "rank", lambda rank=rank: rank)
        batches = distaccum.MicroBatches(samples, 8, partitions=8, shuffle_buffer=256)
        for epoch in (1, 2):
            decoded.append([])
            list(batches.epoch(epoch, K))
    decoded = [groups for groups in decoded[1:] if groups != [0]]
    # Per worker and epoch: its 20 row groups once, and at most the one its span's end cuts.
    for groups in decoded:
        assert len(groups) == len(set(groups)) and len(groups) <= 21, groups
        assert len(groups) * GROUP / 1000 <= 1.1  # rows decoded ÷ share


def _classifier() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(3)])


SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.rounding
def test_training_on_tables_takes_keras_large_batch_steps_on_the_orders_windows(tmp_path):
    pattern = write_tables(tmp_path)
    model = _classifier()
    trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.1), loss=SCCE, accumulation_steps=K)
    batches = distaccum.micro_batches(pattern, MICRO_BATCH_SIZE, seed=5,
                                      columns={"x": COLUMNS["x"], "y": "label"})
    history = trainer.fit(batches, epochs=2)
    # Keras's own steps on each window, its rows by the order alone (row groups as chunks).
    table = pa.concat_tables([_rows(c, s) for c, s in zip(FILE_ROWS, (0, 230, 230))])
    x = np.stack([table.column(f"f{i}").to_numpy() for i in range(FEATURES)], axis=1)
    y = table.column("label").to_numpy()
    reference, optimizer = _classifier(), keras.optimizers.SGD(0.1)
    updates = 0
    for epoch in (1, 2):
        epoch_order = order.EpochOrder(batches.layout, 5, epoch, K * MICRO_BATCH_SIZE)
        micro_batches = [(x[s], y[s], None) for u in range(epoch_order.updates)
                         for samples in [epoch_order.worker_update(u, 1, 0)]
                         for s in np.split(samples, range(MICRO_BATCH_SIZE, len(samples),
                                                          MICRO_BATCH_SIZE))]
        updates += scenarios.reference_training(reference, optimizer, SCCE, [micro_batches], K,
                                                epochs=1)
    assert history.update_steps == updates
    scenarios.assert_weights_close(scenarios.weights_of(model),
                                   scenarios.weights_of(reference))


def test_a_null_value_stops_fit_in_one_line_naming_its_file_and_row(tmp_path):
    table = _rows(40, 0)
    weights = table.column("weight").to_pylist()
    weights[33] = None
    table = table.set_column(table.schema.get_field_index("weight"), "weight",
                             pa.array(weights, pa.float64()))
    # The null in the second row group: the first is read at start-up (the samples' form). A
    # long path, as a cluster's are: the line still ends with the reason, not tf.data's prefix.
    where = tmp_path / ("long-directory-name-" * 3)
    where.mkdir()
    pq.write_table(table, where / "nulls.parquet", row_group_size=20)
    trainer = distaccum.Trainer(_classifier(), keras.optimizers.SGD(0.1), loss=SCCE,
                                accumulation_steps=K)
    batches = distaccum.micro_batches(f"{where}/*.parquet", MICRO_BATCH_SIZE, columns=COLUMNS)
    with pytest.raises(distaccum.BadMicroBatch, match=r"\(here: InvalidArgumentError: SourceError: "
                       r".*nulls\.parquet#33: column 'weight' is null; fill it or drop the row\); "
                       r"it holds rows .*nulls\.parquet#") as raised:
        trainer.fit(batches, epochs=1)
    assert "\n" not in str(raised.value)
    stopped_at = int(re.search(r"stopped at update step (\d+)", str(raised.value)).group(1))
    assert int(trainer.optimizer.iterations) == stopped_at - 1


def _config(**keys) -> config_module.TrainConfig:
    return config_module.TrainConfig(micro_batch_size=MICRO_BATCH_SIZE, epochs=1, **keys)


def test_config_reads_tables_by_their_extension_and_keeps_their_index(tmp_path):
    pattern = write_tables(tmp_path)
    config = _config(dataset=pattern, columns=COLUMNS)
    loaded = sources.load_data(config, tmp_path / "index.json")
    assert loaded.notes[0].startswith("distaccum: dataset: 3 table files, 400 rows in 9 row "
                                      "groups, indexed in")
    assert re.search(r"; a worker holds about one decoded row group per partition it reads, up "
                     r"to \d+\.\d MB \(smaller row groups hold less\)$", loaded.notes[0])
    again = sources.load_data(config, tmp_path / "index.json")
    assert "index kept from an earlier run" in again.notes[0]
    assert again.train.samples.sizes == loaded.train.samples.sizes


@pytest.mark.parametrize("keys, message", [
    ({"columns": {"x": ["f0", "lable"], "y": "label"}},
     r"^columns: x: column 'lable' is not in .*part-0\.parquet \(its columns: id, f0, f1, f2, "
     r"label, weight, text, vector\)$"),
    ({"columns": {"x": "f0"}}, r"^columns: must be a dict with x and y"),
    ({"columns": {"x": ["text"], "y": "label"}},
     r"^columns: fails on the first row of .*part-0\.parquet \(.*\)$"),
    ({"parse": "test_tables:failing_parse"},
     r"^parse: fails on the first row of .*part-0\.parquet \(KeyError: .*'lable'.*\)\. "
     r"Received: parse='test_tables:failing_parse'$"),
    ({"dataset": "NOT_PARQUET", "columns": COLUMNS},
     r"^dataset: not a Parquet file \(.*\): .*broken\.parquet\. Received: dataset="),
    ({"columns": None}, r"^dataset: Parquet or Arrow IPC files need parse .* or columns"),
], ids=["missing_column", "no_y", "text_stacked", "parse_raises", "not_parquet", "neither"])
def test_bad_table_input_is_one_line_naming_the_key(tmp_path, keys, message):
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    pattern = write_tables(tmp_path / "good")
    (tmp_path / "bad" / "broken.parquet").write_bytes(b"PAR1 not really")
    values = {"dataset": pattern, "columns": COLUMNS, **keys}
    if values["dataset"] == "NOT_PARQUET":
        values["dataset"] = f"{tmp_path}/bad/*.parquet"
    if "parse" in keys:
        values.pop("columns")
    with pytest.raises(config_module.ConfigError, match=message):
        sources.load_data(_config(**values))


def failing_parse(row):
    return row["lable"], row["label"]


def test_columns_elsewhere_are_refused_and_an_empty_match_names_the_pattern(tmp_path):
    with pytest.raises(config_module.ConfigError, match=r"^columns: is for Parquet or Arrow IPC "
                       r"files .*dataset='digits' would ignore it"):
        _config(columns=COLUMNS)
    with pytest.raises(ValueError, match=r"^columns is for Parquet or Arrow IPC files"):
        distaccum.micro_batches((np.zeros((4, 1)), np.zeros(4)), 2, columns=COLUMNS)
    with pytest.raises(RecordFileError, match="the pattern matches no file"):
        distaccum.micro_batches(f"{tmp_path}/*.parquet", 2, columns=COLUMNS)
