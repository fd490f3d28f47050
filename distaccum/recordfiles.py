"""TFRecord files as a dataset: the index (records and chunk byte offsets per file) and reading
records by sample number.

The index is what lets a worker read only its share: every `order.CHUNK_RECORDS`-th record's byte
offset, so a chunk is one seek and one read. It is built once per set of files, the workers
splitting the files between them and exchanging what they found in two collectives, and kept (a
JSON file, beside the checkpoints in the job) so that a restart or a resize does not scan again;
a file whose size or modification time changed is scanned again.

Records are framed as TFRecord writes them: an 8-byte little-endian length, a 4-byte checksum of
the length, the data, a 4-byte checksum of the data. The checksums are not verified here (the
framing is: lengths must chain to the chunk's end); a damaged record fails in `parse`.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from distaccum import comm
from distaccum.order import CHUNK_RECORDS
from distaccum.errors import one_line

_HEADER = 12  # length (8) + its checksum (4)
_FOOTER = 4  # the data's checksum
# Chunks a reader keeps when not told: a pass in order (validation) needs one at a time.
CHUNK_CACHE = 4


class RecordFileError(ValueError):
    """A path that matches no file, or a file that is not TFRecord (one line naming it)."""


class ParseError(ValueError):
    """The `parse` function is not one, raises, or returns something else than a sample."""


@dataclass(frozen=True)
class RecordFiles:
    """A set of TFRecord files, indexed.

    Attributes:
        paths: the files, sorted (the order samples are numbered in).
        sizes: records per file.
        offsets: per file, the byte offset of every `CHUNK_RECORDS`-th record, then the file's end.
        seconds: how long indexing took (0 when the kept index was valid for every file).
        scanned: how many files were scanned (the others came from the kept index).
    """

    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    offsets: tuple[np.ndarray, ...]
    seconds: float
    scanned: int


def expand(pattern: str) -> list[str]:
    """The files a glob (any path `tf.io.gfile` reads) matches, sorted."""
    try:
        paths = sorted(tf.io.gfile.glob(pattern))
    except tf.errors.OpError as error:
        raise RecordFileError(f"cannot list the files ({error.message})") from None
    paths = [p for p in paths if not tf.io.gfile.isdir(p)]
    if not paths:
        raise RecordFileError("the pattern matches no file")
    return paths


def scan(path: str) -> tuple[int, np.ndarray]:
    """(records, byte offsets of every `CHUNK_RECORDS`-th record then the end) of a TFRecord
    file. Reads only the 12-byte headers, seeking over the data."""
    size = tf.io.gfile.stat(path).length
    offsets, position, records = [], 0, 0
    with tf.io.gfile.GFile(path, "rb") as handle:
        while position < size:
            if records % CHUNK_RECORDS == 0:
                offsets.append(position)
            handle.seek(position)
            header = handle.read(_HEADER)
            length = struct.unpack("<Q", header[:8])[0] if len(header) == _HEADER else size
            position += _HEADER + length + _FOOTER
            records += 1
            if position > size:
                raise RecordFileError(f"not a TFRecord file (a record at byte "
                                      f"{position - length - _HEADER - _FOOTER} runs past the end)")
    offsets.append(size)
    _check_first_record(path, records)
    return records, np.asarray(offsets, np.int64)


def _check_first_record(path: str, records: int) -> None:
    """TensorFlow's own reader checks the first record's checksums, so that a file that merely
    chains (zero bytes, say) is not taken for TFRecord."""
    if records == 0:
        return
    try:
        next(iter(tf.data.TFRecordDataset(path).take(1)))
    except tf.errors.OpError as error:
        raise RecordFileError(f"not a TFRecord file ({error.message.splitlines()[0]})") from None


def _stat(path: str) -> list[int]:
    status = tf.io.gfile.stat(path)
    return [int(status.length), int(status.mtime_nsec)]


def read_kept(index_file: Path | None) -> dict:
    """What a kept index (a JSON object) holds; empty when there is none or it is unreadable."""
    if index_file is None or not index_file.is_file():
        return {}
    try:
        return json.loads(index_file.read_text())
    except (OSError, ValueError):
        return {}  # unreadable: scan again, and write a good one


def write_kept(index_file: Path, entries: dict) -> None:
    """`entries` into a kept index, atomically, beside what it holds."""
    kept = {**read_kept(index_file), **entries}
    index_file.parent.mkdir(parents=True, exist_ok=True)
    staging = index_file.with_name(f".{index_file.name}.{os.getpid()}")
    staging.write_text(json.dumps(kept))
    os.replace(staging, index_file)


def _gather(values: list[int], what: str) -> np.ndarray:
    """Element-wise maximum over workers of non-negative int64 values: each value is known by
    one worker, the others contribute 0."""
    with comm.collective(what):
        return comm.current().max_all(tf.constant(values, tf.int64, shape=[len(values)])).numpy()


def index(pattern: str, index_file: Path | None = None, scan=scan,
          what: str = "record files") -> RecordFiles:
    """The files `pattern` matches, indexed; called on every worker (four collectives).

    The chief reads the kept index and names the files to scan (new, or changed in size or
    modification time); the workers scan them in turns, then gather record counts and offsets.
    The chief writes the index back. `scan` gives a file's (records, offsets): TFRecord's by
    default; a table's row groups (`tables.scan`) use the same index.

    Raises:
        RecordFileError: no file matches, or one is not TFRecord (on every worker).
    """
    started = time.perf_counter()
    paths = expand(pattern)
    chief = comm.is_chief()
    kept = read_kept(index_file) if chief else {}
    known = {i: kept[p] for i, p in enumerate(paths) if p in kept and kept[p]["stat"] == _stat(p)}
    stale = _gather([int(chief and i not in known) for i in range(len(paths))],
                    f"indexing the {what}")
    mine = [int(i) for i in np.flatnonzero(stale)][comm.rank()::comm.num_workers()]
    found, failed = {}, {}
    for i in mine:
        try:
            records, offsets = scan(paths[i])
            found[i] = {"records": records, "offsets": offsets.tolist(), "stat": _stat(paths[i])}
        except (RecordFileError, tf.errors.OpError) as error:
            failed[i] = str(error) if isinstance(error, RecordFileError) else error.message
    found.update(known)
    # Records + 2 where known, 1 where the scan failed: 0 is nobody's knowledge.
    codes = _gather([found[i]["records"] + 2 if i in found else int(i in failed)
                     for i in range(len(paths))], f"indexing the {what}")
    if (codes == 1).any():
        bad = int(np.flatnonzero(codes == 1)[0])
        reason = failed.get(bad, f"unreadable, or not one of the {what}")
        raise RecordFileError(f"{reason}: {paths[bad]}")
    sizes = [int(c) - 2 for c in codes]
    lengths = _gather([len(found[i]["offsets"]) if i in found else 0
                       for i in range(len(paths))], f"indexing the {what}").tolist()
    flat = _gather([v for i, length in enumerate(lengths)
                    for v in (found[i]["offsets"] if i in found else [0] * length)],
                   f"indexing the {what}")
    offsets = tuple(np.split(flat, np.cumsum(lengths)[:-1]))
    if chief and index_file is not None and len(known) < len(paths):
        write_kept(index_file, {paths[i]: {"records": sizes[i], "offsets": offsets[i].tolist(),
                                            "stat": _stat(paths[i])} for i in range(len(paths))})
    return RecordFiles(tuple(paths), tuple(sizes), offsets, time.perf_counter() - started,
                       int(stale.sum()))


class RecordReader:
    """Reads records by sample number (samples numbered in file order), a chunk at a time.

    Owns open files and a cache of the last `cached_chunks` chunks read, so that the samples of
    the shuffle blocks being read, scattered over a few chunks each, cost one read per chunk. One
    reader per input pipeline: not thread-safe.
    """

    def __init__(self, files: RecordFiles, cached_chunks: int = CHUNK_CACHE) -> None:
        self._files = files
        self._capacity = cached_chunks
        self._file_start = np.concatenate([[0], np.cumsum(files.sizes)])
        self._chunks: OrderedDict[tuple[int, int], list[bytes]] = OrderedDict()
        self._handles: OrderedDict[int, object] = OrderedDict()
        self.chunks_read = 0

    def where(self, sample: int) -> tuple[str, int]:
        """(file, 0-based record in it) of a sample."""
        file = int(np.searchsorted(self._file_start, sample, side="right") - 1)
        return self._files.paths[file], int(sample - self._file_start[file])

    def read(self, samples: np.ndarray) -> np.ndarray:
        """The serialized records of `samples`, in that order (an object array of bytes)."""
        files = np.searchsorted(self._file_start, samples, side="right") - 1
        records = samples - self._file_start[files]
        out = np.empty(len(samples), dtype=object)
        for i, (file, record) in enumerate(zip(files.tolist(), records.tolist())):
            chunk, within = divmod(record, CHUNK_RECORDS)
            out[i] = self._chunk(file, chunk)[within]
        return out

    def _chunk(self, file: int, chunk: int) -> list[bytes]:
        key = (file, chunk)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        offsets = self._files.offsets[file]
        start, stop = int(offsets[chunk]), int(offsets[chunk + 1])
        handle = self._handle(file)
        handle.seek(start)
        records = _split_records(handle.read(stop - start), self._files.paths[file], start)
        expected = min(CHUNK_RECORDS, self._files.sizes[file] - chunk * CHUNK_RECORDS)
        if len(records) != expected:
            raise ValueError(f"{self._files.paths[file]} holds other records than when it was "
                             f"indexed ({len(records)} in chunk {chunk}, {expected} indexed)")
        self.chunks_read += 1
        self._chunks[key] = records
        if len(self._chunks) > self._capacity:
            self._chunks.popitem(last=False)
        return records

    def _handle(self, file: int):
        if file not in self._handles:
            self._handles[file] = tf.io.gfile.GFile(self._files.paths[file], "rb")
            if len(self._handles) > 16:
                self._handles.popitem(last=False)[1].close()
        self._handles.move_to_end(file)
        return self._handles[file]


def _split_records(data: bytes, path: str, start: int) -> list[bytes]:
    """A chunk's records from its bytes; a framing that does not chain to the chunk's end (a
    file changed or damaged since it was indexed) names the file."""
    records, position = [], 0
    while position < len(data):
        if position + _HEADER > len(data):
            break
        length = struct.unpack_from("<Q", data, position)[0]
        records.append(data[position + _HEADER:position + _HEADER + length])
        position += _HEADER + length + _FOOTER
    if position != len(data):
        raise ValueError(f"damaged TFRecord framing in {path} near byte {start + position} "
                         "(changed since it was indexed?)")
    return records


class RecordSamples:
    """Samples from record files, as `microbatches.MicroBatches` reads them: a window of sample numbers
    becomes serialized records here, and samples in `parse` (the user's function, run by tf.data
    in parallel)."""

    window_signature = (tf.TensorSpec([None], tf.string),)

    def __init__(self, files: RecordFiles, parse) -> None:
        if not any(files.sizes):
            raise RecordFileError("the files hold no records")
        self.files = files
        self.parse = parse
        self.sizes = files.sizes
        check_parse(files, parse)

    def reader(self, cached_chunks: int = CHUNK_CACHE):
        reader = RecordReader(self.files, cached_chunks)
        return lambda samples: (reader.read(samples),)

    def describe(self, samples: np.ndarray) -> str:
        """The records of a micro-batch that failed: those `parse` fails on alone (each parsed
        again, on this error path only), else the micro-batch's first few."""
        reader = RecordReader(self.files)
        failing = [s for s, record in zip(samples.tolist(), reader.read(samples))
                   if _parse_fails(self.parse, record)]
        shown = failing or samples[:3].tolist()
        places = ", ".join("{}#{}".format(*reader.where(int(s))) for s in shown)
        if failing:
            return f"record{'s' if len(failing) > 1 else ''} {places}, which parse fails on"
        more = f" and {len(samples) - 3} more" if len(samples) > 3 else ""
        return f"records {places}{more}"


def _parse_fails(parse, record: bytes) -> bool:
    try:
        next(iter(tf.data.Dataset.from_tensors(record).map(parse)))
        return False
    except Exception:  # noqa: BLE001 - whatever the user's function raises on this record
        return True


def check_parse(files: RecordFiles, parse) -> None:
    """Run `parse` on the first record, so that a function that raises or returns something else
    than `(x, y)` or `(x, y, sample_weight)` stops the job before training.

    Raises:
        ParseError: naming what `parse` did (one line).
    """
    if not callable(parse):
        raise ParseError(f"not a function of one serialized record: a {type(parse).__name__}")
    first = next(i for i, size in enumerate(files.sizes) if size)
    record = RecordReader(files).read(np.array([sum(files.sizes[:first])], np.int64))
    check_first_sample(parse, (tf.constant(record.tolist()),),
                       f"the first record of {files.paths[first]}")


def check_first_sample(parse, first: tuple, where: str) -> None:
    """`parse` on the parts of one sample as read (each with a leading axis of 1); a
    `ParseError` naming `where` if it raises or returns other than `(x, y[, sample_weight])`."""
    try:
        parsed = tf.data.Dataset.from_tensor_slices(first).map(parse)
        spec = parsed.element_spec
        if not isinstance(spec, tuple) or len(spec) not in (2, 3):
            raise ValueError(f"it returned {spec}, not (x, y) or (x, y, sample_weight)")
        next(iter(parsed))
    except Exception as error:  # noqa: BLE001 - whatever the user's function raises, one line
        reason = one_line(error)
        if not reason.startswith(f"{type(error).__name__}:"):  # a traced error's last line has it
            reason = f"{type(error).__name__}: {reason}"
        raise ParseError(f"fails on {where} ({reason})") from None
