"""A random-access source as `MicroBatches` reads it: any object with `__len__` and
`__getitem__(i)` returning one sample, `(x, y)` or `(x, y, sample_weight)` (Grain's
`RandomAccessDataSource` protocol: a Grain `MapDataset` is one), or a row, a dict of column
values, with `columns` naming x, y and sample_weight (a Hugging Face `datasets.Dataset`).

Each worker calls `__getitem__` for the samples of its own windows only, in threads (a source that
waits on storage keeps up), and stacks them into the window's arrays; the order, the updates per
epoch, resume and resize are `order`'s arithmetic, as for arrays and record files.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf

from distaccum.columns import Columns

# Samples fetched at once: `__getitem__` of a source on a network or a disk mostly waits, so more
# threads than cores.
READ_THREADS = 16


class SourceError(ValueError):
    """A sample the source would not give, or gave in another form than its first: the message
    names the index. A `ValueError`, so that read inside the input pipeline it reaches the
    training loop as a bad micro-batch, which every worker stops on."""


def is_random_access(data) -> bool:
    """Whether `data` is a random-access source rather than arrays (a tuple or list of them), a
    glob of files (a string), or a `tf.data.Dataset`."""
    return (not isinstance(data, (str, bytes, tuple, list, np.ndarray, tf.data.Dataset))
            and hasattr(data, "__len__") and hasattr(data, "__getitem__"))


class RandomAccessSamples:
    """The samples of a random-access source: owns reading a window of sample numbers (threads,
    then one array per part of a sample); not the order (`order`) nor the batching
    (`MicroBatches`).

    Args:
        source: an object with `__len__` and `__getitem__(i)` → `(x, y)` or
            `(x, y, sample_weight)`, each part an array, a number, a string, or a dict, list or
            tuple of them (several inputs), of one shape and type for every sample.
        columns: with rows (`__getitem__(i)` → a dict of column values), which columns are x, y
            and sample_weight (`distaccum.columns`).
    """

    def __init__(self, source, columns=None) -> None:
        self.source = source
        try:
            size = len(source)
        except Exception as error:  # noqa: BLE001 - the user's object: one line naming it
            raise SourceError(f"len(source) raised {type(error).__name__}: {error}") from None
        if not isinstance(size, int) or size < 1:
            raise SourceError(f"a random-access source needs at least one sample. Received: "
                              f"len(source)={size!r}")
        self.sizes = (size,)
        self._threads: ThreadPoolExecutor | None = None  # made by the first reader
        first = self._fetch(0)
        self._columns = None
        if columns is not None:  # rows: a dict of column values per index
            if not isinstance(first, Mapping):
                raise SourceError(f"with columns, source[i] must be a row (a dict of column "
                                  f"values). Received: source[0] of {type(first).__name__}")
            self._columns = Columns(columns, list(first), "source[0]")
            first = {name: first[name] for name in self._columns.read}
        elif not isinstance(first, tuple) or len(first) not in (2, 3):
            raise SourceError(f"source[0] must be (x, y) or (x, y, sample_weight) (or a row, "
                              f"with columns). Received: {type(first).__name__}"
                              + (f" of {len(first)}" if isinstance(first, tuple) else ""))
        self._structure = first
        leaves = [_as_array(leaf) for leaf in tf.nest.flatten(first)]
        self._leaves = [(leaf.shape, leaf.dtype) for leaf in leaves]
        self.window_signature = tuple(
            tf.TensorSpec([None, *shape], tf.string if dtype == object else tf.as_dtype(dtype))
            for shape, dtype in self._leaves)

    def parse(self, *leaves):
        """One sample's parts, read flat, in the form `__getitem__` gave them (a row: its
        columns as `columns` names them)."""
        sample = tf.nest.pack_sequence_as(self._structure, list(leaves))
        return sample if self._columns is None else self._columns.sample(sample)

    def reader(self, cached_chunks: int = 0):
        """A function of a window's sample numbers returning its flat arrays, fetched
        `READ_THREADS` at a time, in order."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="distaccum-read")
        threads = self._threads

        def read(samples: np.ndarray) -> tuple:
            flat = list(threads.map(self._flat_sample, samples.tolist()))
            if not flat:
                return tuple(np.empty((0, *shape), dtype) for shape, dtype in self._leaves)
            return tuple(np.stack(part) for part in zip(*flat))

        return read

    def _fetch(self, index: int):
        try:
            return self.source[index]
        except Exception as error:  # noqa: BLE001 - the user's __getitem__: one line naming it
            reason = str(error).splitlines()[0] if str(error) else ""
            raise SourceError(f"source[{index}] raised {type(error).__name__}: {reason}") from None

    def _flat_sample(self, index: int) -> list[np.ndarray]:
        sample = self._fetch(index)
        if self._columns is not None and isinstance(sample, Mapping):
            missing = [name for name in self._columns.read if name not in sample]
            if missing:
                raise SourceError(f"source[{index}] has no column {missing[0]!r}")
            sample = {name: sample[name] for name in self._columns.read}
        try:
            tf.nest.assert_same_structure(sample, self._structure, check_types=False)
        except (TypeError, ValueError):
            raise SourceError(f"source[{index}] is not in the form of source[0] (x, y"
                              f"{', sample_weight' if len(self._structure) == 3 else ''} with "
                              "the same parts)") from None
        leaves = [_as_array(leaf) for leaf in tf.nest.flatten(sample)]
        for position, (leaf, (shape, dtype)) in enumerate(zip(leaves, self._leaves)):
            if leaf.shape != shape or (leaf.dtype == object) != (dtype == object):
                raise SourceError(
                    f"source[{index}]: part {position} has shape {leaf.shape} and dtype "
                    f"{leaf.dtype}, source[0]'s {shape} and {dtype}; every sample needs one "
                    "shape (pad or crop it in __getitem__)")
        return [leaf.astype(dtype, copy=False) for leaf, (_, dtype) in zip(leaves, self._leaves)]

    def describe(self, samples: np.ndarray) -> str:
        return f"samples {', '.join(map(str, samples[:3].tolist()))}" + (
            f" and {len(samples) - 3} more" if len(samples) > 3 else "") + " of the source"


def _as_array(leaf) -> np.ndarray:
    """A sample's part as an array; text as an object array of bytes (TensorFlow's strings)."""
    array = np.asarray(leaf)
    if array.dtype.kind in "UO":
        encoded = [item.encode() if isinstance(item, str) else item for item in array.ravel()]
        return np.array(encoded, dtype=object).reshape(array.shape)
    if array.dtype.kind == "S":
        return array.astype(object)
    return array
