"""This worker's micro-batches of arrays, TFRecord or table files, a random-access source or a
folder of images, in the order `order` defines.

`micro_batches(...)` is the public way in: each worker reads only the samples it trains on (a
window of sample numbers per update, gathered from arrays or read from record files), the updates
per epoch follow by arithmetic (no pass over the data, no collective), and a resumed epoch starts
at its next update without reading what came before.
"""

from __future__ import annotations

import copy
import math
import os
import threading

import numpy as np
import tensorflow as tf

from distaccum import comm, imagefolders, order, randomaccess, recordfiles, tables
from distaccum.config import is_table_pattern
from distaccum.data import EpochPlan

# Samples read per step of an unshuffled (validation) pass.
EVALUATION_WINDOW = 1024
# The pipeline's parallelism, fixed: `parse` on every core, a few micro-batches ready. tf.data's
# autotuner is off, because with it on, deleting an epoch's iterator waits out the tuner's current
# period, which grows with the iterator's age (measured: about 20 s at the end of 20-second
# epochs, for a hand-written pipeline too), and a pipeline this simple has little to tune.
PARSE_THREADS = os.cpu_count() or 1
MICRO_BATCHES_AHEAD = 4
_FIXED = tf.data.Options()
_FIXED.autotune.enabled = False
# Epoch orders a `MicroBatches` keeps (a mixture's source may be at the turn of two epochs).
ORDERS_KEPT = 4


class MicroBatches:
    """This worker's micro-batches of arrays, record files or a random-access source, in
    `order`'s order: each worker reads only its share, and update u of an epoch trains on the
    same samples whatever the number of workers, as long as `global_batch_size` is the same.

    Build one with `distaccum.micro_batches`. Owns batching and reading windows of samples; not
    the order (`order`) nor what a sample is (`ArraySamples`, `recordfiles.RecordSamples`,
    `randomaccess.RandomAccessSamples`).
    """

    def __init__(self, samples, micro_batch_size: int, *, seed: int = 0,
                 partitions: int = order.DEFAULT_PARTITIONS,
                 shuffle_buffer: int = order.DEFAULT_SHUFFLE_BUFFER) -> None:
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) \
                or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be an int >= 1. Received: "
                             f"micro_batch_size={micro_batch_size!r}")
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.layout = order.Layout(tuple(samples.sizes), partitions, shuffle_buffer,
                                   getattr(samples, "chunk_records", order.CHUNK_RECORDS))
        order.check_num_workers(comm.num_workers(), partitions)
        self._orders: dict[tuple, order.EpochOrder] = {}
        self._orders_lock = threading.Lock()
        self._transforms: tuple = ()

    def map(self, transform) -> "MicroBatches":
        """A copy whose datasets of micro-batches go through `transform` (a function of one)."""
        mapped = copy.copy(self)
        mapped._transforms = self._transforms + (transform,)
        return mapped

    @property
    def element_spec(self):
        """The micro-batches' spec: that of a pipeline over no window (`parse` traced, nothing
        read)."""
        return self._batched(tf.data.Dataset.range(0), lambda index: np.empty(0, np.int64)
                             ).element_spec

    def global_batch_size(self, accumulation_steps: int) -> int:
        return comm.num_workers() * accumulation_steps * self.micro_batch_size

    @property
    def num_samples(self) -> int:
        return self.layout.num_samples

    @property
    def fingerprint(self) -> str | None:
        """The files' listing's digest, for samples listed at start-up (folders of images)."""
        return getattr(self.samples, "fingerprint", None)

    def order(self, epoch: int, global_batch_size: int, quota=None) -> order.EpochOrder:
        """The epoch's order for this global batch (and per-partition quota, a mixture's); the
        last few are kept."""
        key = (epoch, global_batch_size, None if quota is None else tuple(quota.tolist()))
        with self._orders_lock:  # a mixture's pipelines ask from their threads
            if key not in self._orders:
                if len(self._orders) >= ORDERS_KEPT:
                    del self._orders[next(iter(self._orders))]
                self._orders[key] = order.EpochOrder(self.layout, self.seed, epoch,
                                                     global_batch_size, quota)
            return self._orders[key]

    def _order(self, epoch: int, accumulation_steps: int) -> order.EpochOrder:
        return self.order(epoch, self.global_batch_size(accumulation_steps))

    def plan(self, accumulation_steps: int) -> EpochPlan:
        """By arithmetic: no pass over the data, no collective."""
        epoch = self._order(1, accumulation_steps)
        last = len(epoch.worker_update(epoch.updates - 1, comm.num_workers(), comm.rank()))
        return EpochPlan(epoch.updates, (epoch.updates - 1) * accumulation_steps
                         + math.ceil(last / self.micro_batch_size))

    def epoch(self, epoch: int, accumulation_steps: int, first_update: int = 0) -> tf.data.Dataset:
        """The epoch's micro-batches from update `first_update` on: the updates before it are
        neither read nor parsed (at most one shuffle block per partition is read again)."""
        order.check_num_workers(comm.num_workers(), self.layout.partitions)  # an elastic job's
        epoch_order = order.EpochOrder(self.layout, self.seed, epoch,
                                       self.global_batch_size(accumulation_steps))
        workers, rank = comm.num_workers(), comm.rank()
        updates = tf.data.Dataset.range(first_update, epoch_order.updates)
        return self._batched(updates, lambda u: epoch_order.worker_update(u, workers, rank))

    def evaluation(self) -> tf.data.Dataset:
        """This worker's contiguous share, in order, in micro-batches (a validation pass)."""
        share = order.contiguous_share(self.layout.num_samples, comm.num_workers(), comm.rank())
        windows = tf.data.Dataset.range(math.ceil(len(share) / EVALUATION_WINDOW))
        return self._batched(windows, lambda w: np.arange(
            share.start + w * EVALUATION_WINDOW,
            min(share.start + (w + 1) * EVALUATION_WINDOW, share.stop), dtype=np.int64))

    def describe(self, epoch: int, accumulation_steps: int, micro_batch: int) -> str:
        """Where micro-batch `micro_batch` (1-based) of this worker's epoch comes from."""
        update, within = divmod(micro_batch - 1, accumulation_steps)
        samples = self._order(epoch, accumulation_steps).worker_update(
            update, comm.num_workers(), comm.rank())
        m = self.micro_batch_size
        return self.samples.describe(samples[within * m:(within + 1) * m])

    def _cached_chunks(self) -> int:
        """Chunks a reader keeps: the current shuffle block of every partition this worker reads
        spans at most ceil(block / chunk) + 1 chunks; one more each for a block's turn. Bounded
        by the shuffle buffer, not by the data (twice as many read 4 % fewer records again, at
        +4 % peak memory on the benchmark's 64,000 images: the bound matters more)."""
        partitions = self.layout.partitions // comm.num_workers()
        return partitions * (math.ceil(self.layout.block_size / self.layout.chunk_records) + 2)

    def _batched(self, windows: tf.data.Dataset, samples_of) -> tf.data.Dataset:
        """Windows (indices into `samples_of`) read, parsed and cut into micro-batches (a window
        holds whole micro-batches, but the epoch's last)."""
        return self.batched(self.parsed(windows, samples_of))

    def parsed(self, windows: tf.data.Dataset, samples_of) -> tf.data.Dataset:
        """The samples of windows (indices into `samples_of`), read in order, one Python call
        each (the reader keeps a cache: calls are sequential), then parsed in parallel."""
        read = self.samples.reader(self._cached_chunks())
        signature = self.samples.window_signature

        def read_window(index):
            values = tf.numpy_function(lambda i: read(samples_of(int(i))), [index],
                                       [spec.dtype for spec in signature], stateful=True)
            return tuple(tf.ensure_shape(v, spec.shape) for v, spec in zip(values, signature))

        samples = windows.map(read_window).prefetch(2).unbatch()
        if self.samples.parse is not None:
            samples = samples.map(self.samples.parse, num_parallel_calls=PARSE_THREADS)
        return samples

    def batched(self, samples: tf.data.Dataset) -> tf.data.Dataset:
        return batch_micro_batches(samples, self.micro_batch_size, self._transforms)


def batch_micro_batches(samples: tf.data.Dataset, micro_batch_size: int,
                        transforms: tuple = ()) -> tf.data.Dataset:
    """Samples in micro-batches, through `map`ped transforms, a few ahead."""
    batched = samples.batch(micro_batch_size)
    for transform in transforms:
        batched = transform(batched)
    return batched.prefetch(MICRO_BATCHES_AHEAD).with_options(_FIXED)


class ArraySamples:
    """Samples in arrays (rows), as `MicroBatches` reads them: a window of sample numbers is a
    gather of rows, so no worker copies another's samples into its pipeline."""

    parse = None

    def __init__(self, arrays: tuple) -> None:
        arrays = tuple(np.asarray(a) for a in arrays)
        if len(arrays) not in (2, 3) or any(len(a) != len(arrays[0]) for a in arrays):
            raise ValueError("arrays must be (x, y) or (x, y, sample_weight), with as many rows "
                             f"each. Received: {[a.shape for a in arrays]}")
        self.arrays = arrays
        self.sizes = (len(arrays[0]),)
        self.window_signature = tuple(tf.TensorSpec([None, *a.shape[1:]], tf.as_dtype(a.dtype))
                                      for a in arrays)

    def reader(self, cached_chunks: int = 0):
        return lambda samples: tuple(a[samples] for a in self.arrays)

    def describe(self, samples: np.ndarray) -> str:
        return f"rows {', '.join(map(str, samples[:3].tolist()))}" + (
            f" and {len(samples) - 3} more" if len(samples) > 3 else "")


def micro_batches(data, micro_batch_size: int, *, parse=None, columns=None, seed: int = 0,
                  partitions: int = order.DEFAULT_PARTITIONS,
                  shuffle_buffer: int = order.DEFAULT_SHUFFLE_BUFFER,
                  index_file=None) -> MicroBatches:
    """This worker's micro-batches of `data`, for `Trainer.fit` (training or validation data).

    Args:
        data: arrays `(x, y)` or `(x, y, sample_weight)` (a tuple or list); files, as a glob (any
            path `tf.io.gfile` reads): Parquet or Arrow IPC tables (`.parquet`, `.arrow`,
            `.feather`, `.ipc`), else TFRecord; a random-access source: any other object with
            `__len__` and `__getitem__(i)` returning one sample, `(x, y)` or
            `(x, y, sample_weight)` (`distaccum.randomaccess`); or a folder of class subfolders
            of images (`distaccum.ImageFolder`).
        micro_batch_size: samples per micro-batch on one worker.
        parse: a function returning `(x, y)` or `(x, y, sample_weight)`, as for
            `tf.data.Dataset.map`: of one serialized record (TFRecord files), or of one row, a
            dict of column name → value (tables).
        columns: for tables (instead of `parse`) and random-access sources of rows (dicts of
            column values, as a Hugging Face `datasets.Dataset` gives): {"x": a column or a list
            of them (stacked into one float32 vector), "y": a column, optionally
            "sample_weight": a column} (`distaccum.columns`).
        seed: with the epoch, seeds the order (`distaccum.order`): update u of an epoch trains on
            the same samples for any number of workers with the same global batch size.
        partitions: the order's fixed logical partitions; the number of workers must divide it.
        shuffle_buffer: samples shuffled at once, over all partitions.
        index_file: where to keep the files' index (None: build it every time). Called on
            every worker: the workers split the indexing.
    """
    if isinstance(data, str) and is_table_pattern(data):
        samples = tables.TableSamples(tables.index(data, index_file), parse, columns)
    elif columns is not None and not randomaccess.is_random_access(data):
        raise ValueError("columns is for Parquet or Arrow IPC files (a glob ending in .parquet, "
                         ".arrow, .feather or .ipc) and random-access sources of rows. "
                         f"Received: columns={columns!r}")
    elif isinstance(data, str):
        samples = recordfiles.RecordSamples(recordfiles.index(data, index_file), parse)
    elif parse is not None:
        raise ValueError("parse is for files; arrays, random-access sources and image folders "
                         f"give samples already. Received: parse={parse!r}")
    elif isinstance(data, imagefolders.ImageFolder):
        samples = data
    elif randomaccess.is_random_access(data):
        samples = randomaccess.RandomAccessSamples(data, columns)
    else:
        samples = ArraySamples(tuple(data))
    return MicroBatches(samples, micro_batch_size, seed=seed, partitions=partitions,
                        shuffle_buffer=shuffle_buffer)
