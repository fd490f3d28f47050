"""Parquet and Arrow IPC files as data: rows numbered in file order, read by row group.

A row group (an IPC file's record batch) is the unit Parquet compresses and decodes, and may hold
10⁵ rows or more: reading it for a few of its rows would cost a worker far more than its share.
So a table's row groups are the order's chunks (`order.Layout.chunk_records`): the epoch's stream
is the row groups, permuted, and each worker's span of the stream covers whole row groups but at
its two ends. A worker decodes each row group of its span once per epoch (kept while its
partitions read it), only the columns it needs; the row groups a span's ends cut are decoded by
both workers that share them. The index (rows per row group of every file) is the record files'
(`recordfiles.index`): built once, split between the workers, kept beside the checkpoints.

A row is a dict of column values. `parse` turns one into `(x, y[, sample_weight])` inside the
input pipeline (as a record file's `parse` turns a record); `columns` names them instead.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import tensorflow as tf

from distaccum import recordfiles
from distaccum.columns import Columns
from distaccum.config import PARQUET_EXTENSIONS
from distaccum.errors import one_line
from distaccum.randomaccess import SourceError

def _open(path: str):
    """A file's reader: Parquet (`pyarrow.parquet.ParquetFile`) or Arrow IPC (memory-mapped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if path.lower().endswith(PARQUET_EXTENSIONS):
        return pq.ParquetFile(path)
    return pa.ipc.open_file(pa.memory_map(path))


def _group_sizes(table_file) -> list[int]:
    if hasattr(table_file, "read_row_group"):  # Parquet
        return [table_file.metadata.row_group(g).num_rows
                for g in range(table_file.metadata.num_row_groups)]
    return [table_file.get_batch(g).num_rows for g in range(table_file.num_record_batches)]


def scan(path: str) -> tuple[int, np.ndarray]:
    """(rows, row-group boundaries: 0, then the rows before each next group, then rows) of a
    Parquet or Arrow IPC file, from its metadata."""
    try:
        sizes = _group_sizes(_open(path))
    except Exception as error:  # noqa: BLE001 - pyarrow's many error types: one line naming it
        kind = "a Parquet" if path.lower().endswith(PARQUET_EXTENSIONS) else "an Arrow IPC"
        raise recordfiles.RecordFileError(f"not {kind} file ({one_line(error)})") from None
    return int(sum(sizes)), np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])


class TableSamples:
    """Samples from Parquet or Arrow IPC files, as `microbatches.MicroBatches` reads them: a
    window of sample numbers becomes one array per column here (row groups decoded whole, kept
    while the window's partitions read them), and samples in `parse`.

    Args:
        files: the index (`recordfiles.index(pattern, scan=tables.scan)`): per file, its row
            groups' boundaries as offsets.
        parse: a function of one row (a dict of column name → value) returning `(x, y)` or
            `(x, y, sample_weight)`; or None with `columns`.
        columns: which columns are x, y and sample_weight (`distaccum.columns`).
    """

    def __init__(self, files: recordfiles.RecordFiles, parse=None, columns=None) -> None:
        if (parse is None) == (columns is None):
            raise recordfiles.ParseError("give parse (a function of one row) or columns (which "
                                         "columns are x, y and sample_weight), not both")
        if not any(files.sizes):
            raise recordfiles.RecordFileError("the files hold no rows")
        self.files = files
        # Every row group of every file, in order: the order's "files", one chunk each.
        self._groups = [(f, g) for f, offsets in enumerate(files.offsets)
                        for g in range(len(offsets) - 1) if offsets[g + 1] > offsets[g]]
        self.sizes = tuple(int(files.offsets[f][g + 1] - files.offsets[f][g])
                           for f, g in self._groups)
        self.chunk_records = max(self.sizes)
        self._group_start = np.concatenate([[0], np.cumsum(self.sizes)])
        first_path = files.paths[self._groups[0][0]]
        opened = _open(first_path)
        # Decoded, as the first file's largest (all columns): what holding one costs.
        self.group_bytes = max(
            [opened.metadata.row_group(g).total_byte_size
             for g in range(opened.metadata.num_row_groups)] if hasattr(opened, "read_row_group")
            else [opened.get_batch(g).nbytes for g in range(opened.num_record_batches)])
        available = list(getattr(opened, "schema_arrow", opened.schema).names)
        if columns is not None:
            by_name = Columns(columns, available, first_path)
            self.columns = by_name.read
            self.parse = lambda *values: by_name.sample(dict(zip(by_name.read, values)))
        else:
            self.columns, self.parse = available, _row_parse(parse, available)
        first = self._read_rows(np.array([0], np.int64), DecodedGroups(1))
        self.window_signature = tuple(
            tf.TensorSpec([None, *array.shape[1:]],
                          tf.string if array.dtype == object else tf.as_dtype(array.dtype))
            for array in first)
        try:
            recordfiles.check_first_sample(self.parse, first, f"the first row of {first_path}")
        except recordfiles.ParseError as error:
            raise recordfiles.ParseError(f"columns: {error}" if parse is None else str(error)
                                         ) from None

    def reader(self, cached_chunks: int = 4):
        """A function of a window's sample numbers returning its columns, row groups decoded
        once and held while this reader takes their rows (one reader per pipeline: not
        thread-safe)."""
        held = DecodedGroups(cached_chunks)
        return lambda samples: self._read_rows(samples, held)

    def where(self, sample: int) -> tuple[str, int]:
        """(file, 0-based row in it) of a sample."""
        group = int(np.searchsorted(self._group_start, sample, side="right") - 1)
        file, g = self._groups[group]
        return (self.files.paths[file],
                int(self.files.offsets[file][g] + sample - self._group_start[group]))

    def describe(self, samples: np.ndarray) -> str:
        places = ", ".join("{}#{}".format(*self.where(int(s))) for s in samples[:3].tolist())
        return f"rows {places}" + (f" and {len(samples) - 3} more" if len(samples) > 3 else "")

    def _read_rows(self, samples: np.ndarray, held: "DecodedGroups") -> tuple:
        """The columns of `samples`, in that order: one NumPy array each (text: objects)."""
        groups = np.searchsorted(self._group_start, samples, side="right") - 1
        rows = samples - self._group_start[groups]
        parts, positions = [], []
        for group in np.unique(groups).tolist():
            mine = np.flatnonzero(groups == group)
            parts.append([column[rows[mine]] for column in self._group(group, held)])
            positions.append(mine)
            held.took(group, len(mine), self.sizes[group])
        if len(parts) == 1:
            return tuple(parts[0])
        back = np.argsort(np.concatenate(positions), kind="stable")
        return tuple(np.concatenate(column)[back] for column in zip(*parts))

    def _group(self, group: int, held: "DecodedGroups") -> tuple:
        """Row group `group` decoded (the columns read only) into one array per column, held or
        decoded now."""
        if group in held.groups:
            return held.groups[group]
        file, g = self._groups[group]
        path = self.files.paths[file]
        try:
            table_file = _open(path)
            if hasattr(table_file, "read_row_group"):  # Parquet
                decoded = table_file.read_row_group(g, columns=self.columns)
            else:
                decoded = table_file.get_batch(g).select(self.columns)
        except Exception as error:  # noqa: BLE001 - pyarrow's error types: one line naming it
            raise SourceError(f"{path}: row group {g} does not read ({one_line(error)})"
                              ) from None
        samples = np.arange(self._group_start[group], self._group_start[group + 1])
        columns = tuple(_as_array(decoded.column(name), name, self, samples)
                        for name in self.columns)
        held.hold(group, columns)
        return columns


class DecodedGroups:
    """The row groups a reader holds decoded. A worker reads each row of its span once an epoch,
    so a row group goes once the reader has taken as many rows from it as it holds; those it
    takes only part of (the two its span's ends cut, a validation pass's) go when `capacity`
    newer ones push them out. So a worker holds about one row group per partition it reads."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.groups: OrderedDict = OrderedDict()
        self._taken: dict[int, int] = {}

    def hold(self, group: int, decoded) -> None:
        self.groups[group] = decoded
        self._taken[group] = 0
        if len(self.groups) > self.capacity:
            oldest, _ = self.groups.popitem(last=False)
            del self._taken[oldest]

    def took(self, group: int, rows: int, size: int) -> None:
        self.groups.move_to_end(group)
        self._taken[group] += rows
        if self._taken[group] >= size:
            del self.groups[group], self._taken[group]


class BinaryColumn:
    """A text or bytes column of a row group as Arrow holds it (offsets into one buffer): a
    window's values are sliced out of it as `bytes` objects, not the whole row group turned
    into Python objects."""

    def __init__(self, column) -> None:
        import pyarrow as pa
        column = column.cast(pa.large_binary())
        _, offsets, data = column.buffers()
        self._offsets = np.frombuffer(offsets, np.int64)[column.offset:
                                                         column.offset + len(column) + 1]
        self._data = memoryview(data) if data is not None else memoryview(b"")

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        values = np.empty(len(rows), dtype=object)
        offsets = self._offsets
        values[:] = [bytes(self._data[offsets[r]:offsets[r + 1]]) for r in rows.tolist()]
        return values


def _as_array(column, name: str, samples: TableSamples, rows: np.ndarray):
    """A row group's column as a window reads it: numbers as an array, lists of numbers of one
    length as a 2-D array, text and bytes as a `BinaryColumn`."""
    import pyarrow as pa
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        at = int(np.flatnonzero(np.asarray(column.is_null()))[0])
        raise SourceError("{}#{}: column {!r} is null; fill it or drop the row".format(
            *samples.where(int(rows[at])), name))
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
            or pa.types.is_large_binary(kind):
        return BinaryColumn(column)
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) \
            or pa.types.is_large_list(kind):
        lengths = np.asarray(column.value_lengths())
        if len(lengths) and (lengths != lengths[0]).any():
            at = int(np.flatnonzero(lengths != lengths[0])[0])
            raise SourceError("{}#{}: column {!r} holds a list of {} values, another row {}; "
                              "every row needs one length (pad it, or write a fixed-size list)"
                              .format(*samples.where(int(rows[at])), name, int(lengths[at]),
                                      int(lengths[0])))
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(column), int(lengths[0]) if len(lengths) else 0)
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
            or pa.types.is_boolean(kind)):
        raise SourceError(f"{samples.files.paths[0]}: column {name!r} is {kind}; columns of "
                          "numbers, text, bytes or lists of numbers are read")
    return column.to_numpy(zero_copy_only=False)


def _row_parse(parse, available: list[str]):
    """`MicroBatches`' parse of a row's columns (flat): the user's function of the row's dict."""
    if not callable(parse):
        raise recordfiles.ParseError(f"not a function of one row: a {type(parse).__name__}")
    return lambda *values: parse(dict(zip(available, values)))


def index(pattern: str, index_file: Path | None = None) -> recordfiles.RecordFiles:
    """The Parquet or Arrow IPC files `pattern` matches, their row groups indexed (on every
    worker: `recordfiles.index`'s collectives)."""
    return recordfiles.index(pattern, index_file, scan=scan, what="table files")
