"""A random-access source (`__len__`, `__getitem__`) as data: the arrays' order and micro-batches,
samples of any form, reads of its own samples only, and one line for a source that fails."""

from __future__ import annotations

import math
import re
import sys
import threading
import types

import keras
import numpy as np
import pytest

import distaccum
from distaccum import comm
from distaccum import config as config_module
from distaccum import order, sources
from distaccum.microbatches import ArraySamples
from distaccum.randomaccess import SourceError

import scenarios

SAMPLES, FEATURES, MICRO_BATCH_SIZE, K = 37, 3, 4, 2


def _arrays():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(SAMPLES, FEATURES)).astype("float32"),
            (np.arange(SAMPLES) % 3).astype("int64"))


class Source:
    """The arrays' rows, one `__getitem__` at a time, counting the calls (from any thread)."""

    def __init__(self, arrays, fail_at: int | None = None) -> None:
        self.arrays, self.fail_at = arrays, fail_at
        self.asked: list[int] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, index: int):
        with self._lock:
            self.asked.append(index)
        if index == self.fail_at:
            raise OSError("the disk went away")
        return tuple(a[index] for a in self.arrays)


def _values(dataset) -> list[list[np.ndarray]]:
    return [[part.numpy() for part in micro_batch] for micro_batch in dataset]


def test_source_gives_the_arrays_micro_batches_when_it_serves_their_rows():
    arrays = _arrays()
    from_arrays = distaccum.micro_batches(arrays, MICRO_BATCH_SIZE, seed=3)
    source = Source(arrays)
    from_source = distaccum.micro_batches(source, MICRO_BATCH_SIZE, seed=3)
    assert from_source.plan(K) == from_arrays.plan(K)
    assert from_source.element_spec == from_arrays.element_spec
    for epoch, first_update in ((1, 0), (2, 0), (2, 3)):  # a resumed epoch too
        source.asked.clear()
        got = _values(from_source.epoch(epoch, K, first_update=first_update))
        expected = _values(from_arrays.epoch(epoch, K, first_update=first_update))
        assert len(got) == len(expected) > 0
        for parts, expected_parts in zip(got, expected):
            for part, expected_part in zip(parts, expected_parts):
                np.testing.assert_array_equal(part, expected_part)
        # Only the samples trained on, each once: none before the resumed update.
        trained = np.concatenate([parts[0] for parts in got])
        assert len(source.asked) == len(set(source.asked)) == len(trained)


def test_each_of_two_workers_asks_the_source_for_its_own_samples_only(monkeypatch):
    arrays = _arrays()
    asked = []
    for rank in (0, 1):  # each worker's view, in this process: the order is arithmetic
        monkeypatch.setattr(comm, "num_workers", lambda: 2)
        monkeypatch.setattr(comm, "rank", lambda rank=rank: rank)
        source = Source(arrays)
        batches = distaccum.micro_batches(source, MICRO_BATCH_SIZE, seed=3)
        source.asked.clear()  # the look at source[0] that gives the samples' form
        list(batches.epoch(1, K))
        asked.append(source.asked)
    assert sorted(asked[0] + asked[1]) == list(range(SAMPLES))  # all, each once, by one worker
    assert all(len(mine) <= 1.1 * SAMPLES / 2 for mine in asked)


def test_samples_keep_their_form_when_x_is_a_dict_with_text():
    class Texts:
        def __len__(self):
            return 5

        def __getitem__(self, index):
            return {"ids": np.full(2, index, "int32"), "text": f"sample {index}"}, float(index), 1.0

    batches = distaccum.micro_batches(Texts(), 5)
    (x, y, w), = list(batches.epoch(1, 1))
    assert sorted(x) == ["ids", "text"]
    order = x["ids"].numpy()[:, 0]
    assert sorted(order.tolist()) == list(range(5))
    assert [t.decode() for t in x["text"].numpy()] == [f"sample {i}" for i in order]
    np.testing.assert_array_equal(y.numpy(), order.astype("float64"))
    np.testing.assert_array_equal(w.numpy(), np.ones(5))


def _classifier() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(3)])


SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.rounding
def test_training_on_a_source_takes_keras_large_batch_steps_and_the_arrays_steps():
    def trained(data):
        model = _classifier()
        trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.1), loss=SCCE,
                                    accumulation_steps=K)
        history = trainer.fit(distaccum.micro_batches(data, MICRO_BATCH_SIZE, seed=5), epochs=2)
        return [v.numpy() for v in model.trainable_variables], history.update_steps

    arrays = _arrays()
    weights, update_steps = trained(Source(arrays))
    # Keras's own step on each window's concatenated batch, the window's samples by the order
    # alone (ragged last update included).
    reference, optimizer = _classifier(), keras.optimizers.SGD(0.1)
    layout = order.Layout((SAMPLES,), order.DEFAULT_PARTITIONS, order.DEFAULT_SHUFFLE_BUFFER)
    updates = 0
    for epoch in (1, 2):
        epoch_order = order.EpochOrder(layout, 5, epoch, K * MICRO_BATCH_SIZE)
        micro_batches = [(arrays[0][s], arrays[1][s], None)
                         for u in range(epoch_order.updates)
                         for samples in [epoch_order.worker_update(u, 1, 0)]
                         for s in np.split(samples, range(MICRO_BATCH_SIZE, len(samples),
                                                          MICRO_BATCH_SIZE))]
        updates += scenarios.reference_training(reference, optimizer, SCCE, [micro_batches], K,
                                                epochs=1)
    assert update_steps == updates == 2 * math.ceil(SAMPLES / (K * MICRO_BATCH_SIZE))
    scenarios.assert_weights_close(weights, [v.numpy() for v in reference.trainable_variables])
    # And the arrays' run, bit for bit: one order, one pipeline after the read.
    for got, expected in zip(weights, trained(arrays)[0]):
        np.testing.assert_array_equal(got, expected)


class _Shaped(Source):
    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return (x[:2] if index == 9 else x), y


class _Reshaped(Source):
    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return (x, y, 1.0) if index == 9 else (x, y)


@pytest.mark.parametrize("source, message", [
    (Source(_arrays(), fail_at=30), r"source\[30\] raised OSError: the disk went away"),
    (_Shaped(_arrays()), r"source\[9\]: part 0 has shape \(2,\).*source\[0\]'s \(3,\)"),
    (_Reshaped(_arrays()), r"source\[9\] is not in the form of source\[0\]"),
], ids=["getitem_raises", "shape_differs", "form_differs"])
def test_bad_sample_stops_fit_in_one_line_naming_its_index_with_nothing_applied(source, message):
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(3)])
    trainer = distaccum.Trainer(
        model, keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), accumulation_steps=K)
    with pytest.raises(distaccum.BadMicroBatch, match=message) as raised:
        trainer.fit(distaccum.micro_batches(source, MICRO_BATCH_SIZE), epochs=1)
    assert "\n" not in str(raised.value)
    # Every update before the one that held it was applied, that one not.
    stopped_at = int(re.search(r"stopped at update step (\d+)", str(raised.value)).group(1))
    assert int(trainer.optimizer.iterations) == stopped_at - 1


def test_a_list_is_arrays_as_a_tuple_is_and_neither_is_taken_for_a_source():
    arrays = _arrays()
    as_list = distaccum.micro_batches(list(arrays), MICRO_BATCH_SIZE, seed=3)
    as_tuple = distaccum.micro_batches(arrays, MICRO_BATCH_SIZE, seed=3)
    assert type(as_list.samples) is type(as_tuple.samples) is ArraySamples
    for parts, expected in zip(_values(as_list.epoch(1, K)), _values(as_tuple.epoch(1, K))):
        for part, expected_part in zip(parts, expected):
            np.testing.assert_array_equal(part, expected_part)
    with pytest.raises(ValueError, match=r"^arrays must be"):  # not "a source of 0 samples"
        distaccum.micro_batches([], MICRO_BATCH_SIZE)


class _Empty:
    def __len__(self):
        return 0

    def __getitem__(self, index):
        raise IndexError(index)


class _NotASample(Source):
    def __getitem__(self, index):
        return {"x": 1}


@pytest.mark.parametrize("source, message", [
    (_Empty(), r"at least one sample. Received: len\(source\)=0"),
    (_NotASample(_arrays()), r"source\[0\] must be \(x, y\) or \(x, y, sample_weight\) \(or a "
                             r"row, with columns\). "
                             r"Received: dict"),
], ids=["empty", "not_a_tuple"])
def test_source_that_gives_no_samples_is_refused_in_one_line(source, message):
    with pytest.raises(SourceError, match=message):
        distaccum.micro_batches(source, MICRO_BATCH_SIZE)


def test_dataset_function_returning_sources_gives_micro_batches_for_training_and_validation(
        monkeypatch):
    arrays = _arrays()
    module = types.ModuleType("user_data")
    module.load = lambda: (Source(arrays), Source(arrays))
    module.broken = lambda: Source(arrays, fail_at=0)
    monkeypatch.setitem(sys.modules, "user_data", module)
    config = config_module.TrainConfig(dataset="user_data:load", micro_batch_size=MICRO_BATCH_SIZE,
                                       epochs=1)
    loaded = sources.load_data(config)
    assert isinstance(loaded.train, distaccum.MicroBatches)
    assert isinstance(loaded.validation, distaccum.MicroBatches)
    assert loaded.train.plan(K).updates_per_epoch == 5
    broken = config_module.TrainConfig(dataset="user_data:broken", epochs=1,
                                       micro_batch_size=MICRO_BATCH_SIZE)
    with pytest.raises(config_module.ConfigError,
                       match=r"^dataset: source\[0\] raised OSError: the disk went away$"):
        sources.load_data(broken)


def _same_micro_batches(got, expected) -> None:
    got, expected = _values(got), _values(expected)
    assert len(got) == len(expected) > 0
    for parts, expected_parts in zip(got, expected):
        for part, expected_part in zip(parts, expected_parts):
            np.testing.assert_array_equal(part, expected_part)


@pytest.mark.parametrize("formatted", [True, False], ids=["numpy_format", "python_rows"])
def test_a_hugging_face_dataset_gives_the_arrays_micro_batches_through_columns(formatted):
    import datasets
    x, y = _arrays()
    rows = datasets.Dataset.from_dict({**{f"f{i}": x[:, i] for i in range(FEATURES)},
                                       "label": y, "note": [f"row {i}" for i in range(SAMPLES)]})
    rows = rows.with_format("numpy") if formatted else rows
    columns = {"x": [f"f{i}" for i in range(FEATURES)], "y": "label"}
    _same_micro_batches(distaccum.micro_batches(rows, MICRO_BATCH_SIZE, seed=3, columns=columns
                                                ).epoch(1, K),
                        distaccum.micro_batches((x, y), MICRO_BATCH_SIZE, seed=3).epoch(1, K))
    with pytest.raises(ValueError, match=r"^columns: y: column 'lable' is not in source\[0\] "
                       r"\(its columns: f0, f1, f2, label, note\)$"):
        distaccum.micro_batches(rows, MICRO_BATCH_SIZE, columns={"x": "f0", "y": "lable"})
    with pytest.raises(SourceError, match=r"^with columns, source\[i\] must be a row"):
        distaccum.micro_batches(Source(_arrays()), MICRO_BATCH_SIZE, columns=columns)


def test_grain_map_dataset_over_array_record_files_gives_the_arrays_micro_batches(tmp_path):
    import grain
    from array_record.python.array_record_module import ArrayRecordWriter
    x, y = _arrays()
    paths = []
    for part, rows in enumerate(np.array_split(np.arange(SAMPLES), 2)):
        paths.append(str(tmp_path / f"part-{part}.array_record"))
        writer = ArrayRecordWriter(paths[-1], "group_size:1")
        for row in rows:
            writer.write(x[row].tobytes() + y[row].tobytes())
        writer.close()

    def decode(record: bytes):
        return (np.frombuffer(record[:4 * FEATURES], "float32"),
                np.frombuffer(record[4 * FEATURES:], "int64")[0])

    source = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths)).map(decode)
    _same_micro_batches(distaccum.micro_batches(source, MICRO_BATCH_SIZE, seed=3).epoch(2, K),
                        distaccum.micro_batches((x, y), MICRO_BATCH_SIZE, seed=3).epoch(2, K))
