"""TFRecord files as a dataset, in one process: the index (record counts, chunk offsets, kept and
reused), records read by sample number, micro-batches from files in `order`'s order (a resumed
epoch neither reads nor parses what it already trained on), and training and validation on
them equal to Keras's large-batch computations on the same arrays."""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import distaccum
import scenarios
from distaccum import order, recordfiles

FEATURES = 5
CLASSES = 10
# Uneven files: empty (first, so the first record `parse` is checked on is in the second file),
# longer than a chunk (64 records), shorter than one, a single record. 630 samples.
FILE_SIZES = (0, 300, 37, 200, 1, 92)
MICRO_BATCH_SIZE, K = 4, 3
# 630 = 52 updates of 12 + a ragged last update of 6 samples (micro-batches of 4 and 2).
GLOBAL_BATCH_SIZE = MICRO_BATCH_SIZE * K
ORDER = {"partitions": 4, "shuffle_buffer": 64, "seed": 7}
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def write_records(directory: Path, sizes=FILE_SIZES, seed: int = 0) -> scenarios.RecordSet:
    """TFRecord files of a classification problem: features `x` (float32 [FEATURES]), a class
    `y` (int64), a weight `w` and the sample's number in file order `id`."""
    n = sum(sizes)
    rng = np.random.default_rng(seed)
    return scenarios.write_record_files(
        directory, sizes, rng.normal(size=(n, FEATURES)).astype("float32"),
        rng.integers(0, CLASSES, n), rng.uniform(0.2, 2.0, n).astype("float32"))


RECORD_FEATURES = scenarios.record_features(np.zeros((1, FEATURES)), np.zeros(1, np.int64))


def parse(record):
    """One example as `(x, y)`: the parse function the CLI tests name (test_recordfiles:parse)."""
    features = tf.io.parse_single_example(record, RECORD_FEATURES)
    return features["x"], features["y"]


def parse_weighted(record):
    features = tf.io.parse_single_example(record, RECORD_FEATURES)
    return features["x"], features["y"], features["w"]


def parse_noting_ids(seen: list):
    """A parse returning `(x, id)` that appends each record's id to `seen` when it runs."""
    def parse_ids(record):
        features = tf.io.parse_single_example(record, RECORD_FEATURES)
        noted = tf.py_function(lambda i: seen.append(int(i)) or i, [features["id"]], tf.int64)
        return features["x"], tf.ensure_shape(noted, [])
    return parse_ids


def expected_offsets(records: list[bytes]) -> list[int]:
    """Byte offsets of every 64th record then the file's end, from the records' lengths (TFRecord
    framing: 8-byte length, 4-byte checksum, the data, 4-byte checksum)."""
    starts = np.concatenate([[0], np.cumsum([16 + len(r) for r in records])])
    return starts[:len(records):order.CHUNK_RECORDS].tolist() + [int(starts[-1])]


def epoch_updates(epoch: int) -> list[np.ndarray]:
    """The samples of each update of an epoch (one worker), by the order alone."""
    layout = order.Layout(FILE_SIZES, ORDER["partitions"], ORDER["shuffle_buffer"])
    epoch_order = order.EpochOrder(layout, ORDER["seed"], epoch, GLOBAL_BATCH_SIZE)
    return [epoch_order.worker_update(u, 1, 0) for u in range(epoch_order.updates)]


def file_micro_batches(pattern: str, parse_function=parse) -> distaccum.MicroBatches:
    return distaccum.micro_batches(pattern, MICRO_BATCH_SIZE, parse=parse_function, **ORDER)


def classifier() -> keras.Model:
    keras.utils.set_random_seed(5)
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(6, activation="tanh"),
                             keras.layers.Dense(CLASSES)])


# --- the index and the reader -------------------------------------------------------------------


def test_index_counts_records_and_chunk_offsets_when_files_are_uneven(tmp_path):
    written = write_records(tmp_path)
    files = recordfiles.index(written.pattern)
    assert files.paths == tuple(map(str, written.paths))
    assert files.sizes == FILE_SIZES
    starts = np.concatenate([[0], np.cumsum(FILE_SIZES)])
    for i, offsets in enumerate(files.offsets):
        assert offsets.tolist() == expected_offsets(written.records[starts[i]:starts[i + 1]]), i
    assert files.scanned == len(FILE_SIZES)


def test_reader_returns_the_records_written_when_asked_by_sample_number_in_any_order(tmp_path):
    written = write_records(tmp_path)
    files = recordfiles.index(written.pattern)
    chunks = len(order.Layout(FILE_SIZES).chunks[0])  # 5 + 1 + 4 + 1 + 2
    scattered = np.random.default_rng(1).permutation(sum(FILE_SIZES))
    reader = recordfiles.RecordReader(files, cached_chunks=chunks)
    assert reader.read(scattered).tolist() == written.records[scattered].tolist()
    assert reader.chunks_read == chunks == 13  # each chunk read once, however scattered
    in_order = recordfiles.RecordReader(files)  # the default cache: a pass in order
    assert in_order.read(np.arange(sum(FILE_SIZES))).tolist() == written.records.tolist()
    assert in_order.chunks_read == chunks


def test_kept_index_is_used_without_scanning_when_files_are_unchanged(tmp_path, monkeypatch):
    written = write_records(tmp_path / "data")
    index_file = tmp_path / "index.json"
    first = recordfiles.index(written.pattern, index_file)

    def no_scan(path):
        raise AssertionError(f"scanned {path} again")

    monkeypatch.setattr(recordfiles, "scan", no_scan)
    second = recordfiles.index(written.pattern, index_file)
    assert (first.scanned, second.scanned) == (len(FILE_SIZES), 0)
    assert second.sizes == first.sizes
    assert [o.tolist() for o in second.offsets] == [o.tolist() for o in first.offsets]


@pytest.mark.parametrize("change", ["more_records", "same_size_later_mtime"])
def test_changed_file_is_scanned_again_and_read_right_when_index_was_kept(tmp_path, change):
    written = write_records(tmp_path / "data")
    index_file = tmp_path / "index.json"
    recordfiles.index(written.pattern, index_file)
    changed, first = written.paths[3], sum(FILE_SIZES[:3])  # 200 records
    before = os.stat(changed)
    size = 260 if change == "more_records" else 200
    rows = slice(first, first + size)
    # Other features; the same serialized lengths when the count is the same (fixed-width floats).
    records = scenarios.serialize_examples(-written.x[rows], written.y[rows], written.w[rows],
                                           range(first, first + size))
    with tf.io.TFRecordWriter(str(changed)) as writer:
        for record in records:
            writer.write(record)
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert (os.stat(changed).st_size == before.st_size) == (change != "more_records")
    files = recordfiles.index(written.pattern, index_file)
    assert files.scanned == 1
    assert files.sizes[3] == size and files.offsets[3].tolist() == expected_offsets(records)
    read = recordfiles.RecordReader(files).read(np.arange(first, first + size))
    assert read.tolist() == records
    assert recordfiles.index(written.pattern, index_file).scanned == 0  # the new stat was kept


# --- micro-batches from files ---------------------------------------------------------------------


def _ids(dataset: tf.data.Dataset) -> list[np.ndarray]:
    return [ids.numpy() for _, ids in dataset]


def test_every_sample_once_per_epoch_in_the_order_when_micro_batches_read_files(tmp_path):
    written = write_records(tmp_path)
    batches = file_micro_batches(written.pattern, parse_noting_ids([]))
    plan = batches.plan(K)
    epochs = []
    for epoch in (1, 2):
        micro_batches = _ids(batches.epoch(epoch, K))
        assert len(micro_batches) == plan.micro_batches_per_epoch == 52 * K + 2
        assert [len(b) for b in micro_batches[-2:]] == [4, 2]  # the ragged last update
        trained = np.concatenate(micro_batches)
        assert np.array_equal(np.sort(trained), np.arange(sum(FILE_SIZES)))
        assert np.array_equal(trained, np.concatenate(epoch_updates(epoch)))
        epochs.append(trained)
    assert not np.array_equal(*epochs)  # each epoch its own order


def test_resumed_epoch_reads_and_parses_only_its_remaining_updates_when_first_update_is_given(
        tmp_path, monkeypatch):
    written = write_records(tmp_path)
    parsed: list[int] = []
    batches = file_micro_batches(written.pattern, parse_noting_ids(parsed))
    readers = []

    class CountedReader(recordfiles.RecordReader):
        def __init__(self, *arguments, **options):
            super().__init__(*arguments, **options)
            readers.append(self)

    monkeypatch.setattr(recordfiles, "RecordReader", CountedReader)
    parsed.clear()  # the check of `parse` on the first record, when the files were indexed
    first_update = 40
    remaining = np.concatenate(epoch_updates(2)[first_update:])
    trained = np.concatenate(_ids(batches.epoch(2, K, first_update=first_update)))
    assert np.array_equal(trained, remaining)
    assert sorted(parsed) == sorted(remaining.tolist())
    # Chunks read: those holding the remaining updates' samples, each once.
    starts = np.concatenate([[0], np.cumsum(FILE_SIZES)])
    file_of = np.searchsorted(starts, remaining, side="right") - 1
    chunk_of = (remaining - starts[file_of]) // order.CHUNK_RECORDS
    chunks = set(zip(file_of.tolist(), chunk_of.tolist()))
    assert sum(reader.chunks_read for reader in readers) == len(chunks) < 13


# --- training on files ----------------------------------------------------------------------------


@pytest.mark.rounding
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_training_on_record_files_equals_large_batch_steps_when_k3_and_last_update_ragged(
        tmp_path, weighted):
    written = write_records(tmp_path)
    model = classifier()
    trainer = distaccum.Trainer(model, scenarios.make_optimizer("sgd"), loss=SCCE,
                                accumulation_steps=K)
    history = trainer.fit(file_micro_batches(written.pattern,
                                             parse_weighted if weighted else parse), epochs=2)
    reference = classifier()
    reference_optimizer = scenarios.make_optimizer("sgd")
    updates = 0
    for epoch in (1, 2):
        # The update's samples by the order alone, then the window definition on their arrays.
        micro_batches = [(written.x[s], written.y[s], written.w[s] if weighted else None)
                         for samples in epoch_updates(epoch)
                         for s in np.split(samples, range(MICRO_BATCH_SIZE, len(samples),
                                                          MICRO_BATCH_SIZE))]
        updates += scenarios.reference_training(reference, reference_optimizer, SCCE,
                                                [micro_batches], K, epochs=1)
    assert history.update_steps == int(trainer.optimizer.iterations) == updates == 2 * 53
    scenarios.assert_weights_close(model.trainable_variables, reference.trainable_variables)


@pytest.mark.rounding
def test_validation_loss_equals_keras_evaluate_when_validation_data_is_record_files(tmp_path):
    written = write_records(tmp_path / "train", sizes=(70, 30))
    validation = write_records(tmp_path / "validation", sizes=(0, 65, 1, 40), seed=1)
    model = classifier()
    trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.1), loss=SCCE,
                                metrics=["accuracy"], accumulation_steps=K)
    history = trainer.fit(file_micro_batches(written.pattern), epochs=1,
                          validation_data=file_micro_batches(validation.pattern))
    model.compile(loss=SCCE, metrics=["accuracy"])
    expected = model.evaluate(validation.x, validation.y, batch_size=len(validation.x),
                              verbose=0, return_dict=True)
    assert history.history["val_loss"] == [pytest.approx(expected["loss"], rel=1e-6)]
    assert history.history["val_accuracy"] == [pytest.approx(expected["accuracy"], rel=1e-6)]


def _corrupt(path: Path, record: int) -> None:
    """Overwrite record `record`'s data with 0xff bytes, keeping the framing (its length)."""
    content = bytearray(path.read_bytes())
    position = 0
    for _ in range(record):
        position += 16 + int.from_bytes(content[position:position + 8], "little")
    length = int.from_bytes(content[position:position + 8], "little")
    content[position + 12:position + 12 + length] = b"\xff" * length
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("position", [0, MICRO_BATCH_SIZE - 1],
                         ids=["first_in_micro_batch", "last_in_micro_batch"])
def test_record_corrupted_after_indexing_stops_fit_naming_it_when_parse_fails(tmp_path, position):
    written = write_records(tmp_path)
    batches = file_micro_batches(written.pattern)
    micro_batch = 50  # of epoch 1, counted from 1: in update 17
    sample = int(np.concatenate(epoch_updates(1))[(micro_batch - 1) * MICRO_BATCH_SIZE + position])
    file = int(np.searchsorted(np.cumsum(FILE_SIZES), sample, side="right"))
    record = sample - sum(FILE_SIZES[:file])
    _corrupt(written.paths[file], record)
    trainer = distaccum.Trainer(classifier(), keras.optimizers.SGD(0.1), loss=SCCE,
                                accumulation_steps=K)
    with pytest.raises(distaccum.BadMicroBatch) as caught:
        trainer.fit(batches, epochs=1)
    message = str(caught.value)
    assert f"rank 0: micro-batch {micro_batch} of epoch 1 " in message, message
    assert "stopped at update step 17 without applying it" in message, message
    assert f"; it holds record {written.paths[file]}#{record}, which parse fails on" in message, \
        message
