"""The row exchange: a sparse gradient's window sum sent as the rows the window touched.

An `Embedding`'s gradient (`tf.IndexedSlices`) touches only the rows of the tokens a window saw.
The accumulator adds it into a dense sum, and between workers that sum can travel two ways:

- dense, in the update's grouped allreduce (in place, `comm.sum_in_place`): a ring allreduce
  sends each of its V·D values about 2(N − 1)/N times per rank, whatever the data;
- as rows: each worker's rows that hold a nonzero value, each with its int32 index, in one grouped
  allgather beside the allreduce of everything else. A ring allgather sends (N − 1)/N of all
  workers' rows per rank. Every worker then zeroes its sum and adds all workers' rows into it,
  one worker's rows at a time in rank order (no index repeats within one worker's rows, so no
  addition order is left to the device), and every worker gets the same sum.

So rows send fewer bytes when the U rows of all workers satisfy U·(4 + b·D) < 2·b·V·D, b being
the bytes of a value (`allreduce_dtype`). Every worker must take the same way in the same update,
and U is known only after the exchange, so recent updates decide: each update's U travels in its
grouped allreduce (so every worker holds the same), and the U expected next is the largest recent
one, forgotten by `FORGET` per update. Windows batched by length, which alternate few rows and
many, thus go as rows only when their larger windows pay too. The first update goes dense. Rows
also cost a second collective: they are taken only when they save at least `MIN_SAVING_BYTES`
per rank.

Both ways give the same sum (a row a worker leaves out is zero in its sum); only the order of
additions differs from the allreduce's, so the two differ by float round-off at most, and on two
workers (a + b either way) not at all.
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from distaccum import comm

INDEX_BYTES = 4  # int32 row indices: tables of up to 2**31 rows
# Bytes per rank a row exchange must save over the dense one to be worth its extra collective:
# about what one more collective's latency (~50 µs) sends on a 10 Gbit/s link.
MIN_SAVING_BYTES = 1 << 16
# Per update, the share of the largest recent row count the next update still expects.
FORGET = 0.9


class RowExchange:
    """Sums a window's totals over workers, sending each sparse gradient sum as its touched rows
    when that is fewer bytes: the update step's collective for a model with sparse gradients.

    Args:
        backend: the communication backend (`comm`), with more than one worker.
        sparse: per gradient sum of the totals, whether its gradient comes as `tf.IndexedSlices`.
        shapes: per gradient sum, its shape (rows first).
        dtype: the type gradient sums travel in (`allreduce_dtype`).
        reduce: how the dense sums are summed, `(sums, others, name) -> others summed`:
            `comm.sum_in_place` (the default), or a sharded state's reduce-scatter (`shards`),
            which sends each value once instead of twice.
    """

    def __init__(self, backend, sparse: Sequence[bool], shapes: Sequence, dtype: tf.DType,
                 reduce=None) -> None:
        self.backend = backend
        self._reduce = reduce or (lambda sums, others, name: comm.sum_in_place(
            backend, sums, others, name, dtype))
        # A ring allreduce sends each value twice (reduce-scatter, then allgather).
        self._dense_sends = 2.0 if reduce is None else 1.0
        self.positions = [i for i, is_sparse in enumerate(sparse) if is_sparse]
        self._shapes = [tf.TensorShape(shapes[i]) for i in self.positions]
        self._dtype = tf.as_dtype(dtype)
        with tf.init_scope():  # created once, outside any traced graph
            # Per sparse sum, the touched rows of every worker expected in the next update; inf
            # before the first, which then goes dense.
            self._expected_rows = tf.Variable(tf.fill([len(self.positions)], math.inf),
                                              trainable=False, name="expected_rows")

    @property
    def expected_rows(self) -> list[float]:
        """Per sparse sum, the rows (of all workers) the next update is expected to touch: the
        largest recent count, less `FORGET` per update since (inf before the first update)."""
        return [float(v) for v in self._expected_rows.numpy()]

    def rows_pay(self, rows: tf.Tensor) -> tf.Tensor:
        """Whether sending `rows` (per sparse sum, all workers' touched rows) saves at least
        `MIN_SAVING_BYTES` per rank over the dense allreduce of the sums."""
        value_bytes = self._dtype.size
        widths = [s[1:].num_elements() for s in self._shapes]
        dense = sum(self._dense_sends * value_bytes * s[0] * width for s, width in zip(self._shapes, widths))
        sent = tf.reduce_sum(rows * tf.constant([INDEX_BYTES + value_bytes * width
                                                 for width in widths], tf.float32))
        return sent + MIN_SAVING_BYTES <= dense

    def sum_in_place(self, sums: Sequence[tf.Variable], others: Sequence[tf.Tensor],
                     name: str) -> list[tf.Tensor]:
        """`comm.sum_in_place(backend, sums, others, name, dtype)`, the sparse sums (at
        `positions`) sent as rows or dense, whichever the expected rows say is fewer bytes; as
        rows, each is written over with the table of every worker's rows."""
        sums, others = list(sums), list(others)
        touched = tf.stack([rows_touched(sums[i]) for i in self.positions])

        def dense():
            return self._reduce(sums, others + [touched], name)

        def as_rows():
            dense_sums = [s for i, s in enumerate(sums) if i not in self.positions]
            reduced = self._reduce(dense_sums, others + [touched], name)
            gathered = self.backend.gather_all(
                [payload(sums[i], self._dtype) for i in self.positions], f"{name}_rows")
            written = [write_table(sums[i], pieces) for i, pieces in zip(self.positions, gathered)]
            with tf.control_dependencies(written):
                return [tf.identity(t) for t in reduced]

        *reduced, rows = tf.cond(self.rows_pay(self._expected_rows), as_rows, dense)
        recent = tf.where(tf.math.is_inf(self._expected_rows), 0.0, self._expected_rows)
        self._expected_rows.assign(tf.maximum(rows, FORGET * recent))
        return reduced


def rows_touched(total: tf.Tensor) -> tf.Tensor:
    """How many rows of `total` hold a nonzero value (NaN and Inf count), as float32."""
    return tf.reduce_sum(tf.cast(_nonzero_rows(total), tf.float32))


def _nonzero_rows(total: tf.Tensor) -> tf.Tensor:
    return tf.reduce_any(tf.not_equal(total, 0), axis=list(range(1, total.shape.rank)))


def payload(total: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """`total`'s nonzero rows as they travel: `[rows, index columns + values]` in `dtype`, each
    row's int32 index in its first columns bit for bit (so any index survives the trip exactly),
    its values, flattened, in the others."""
    indices = tf.cast(tf.where(_nonzero_rows(total))[:, 0], tf.int32)
    values = tf.reshape(tf.cast(tf.gather(total, indices), dtype),
                        [-1, total.shape[1:].num_elements()])
    columns = tf.reshape(tf.bitcast(indices, dtype), [-1, INDEX_BYTES // dtype.size])
    return tf.concat([columns, values], axis=1)


def write_table(total: tf.Variable, pieces: Sequence[tf.Tensor]):
    """Write the float32 sum of every worker's `payload`s (`pieces`, in rank order) over
    `total`, in its own memory: zeros, then each worker's rows added in turn. Returns the last
    addition (to wait for)."""
    written = comm.pieces.zero_in_place(total)
    for piece in pieces:
        columns = INDEX_BYTES // piece.dtype.size
        index_bits = piece[:, :columns] if columns > 1 else piece[:, 0]
        indices = tf.bitcast(index_bits, tf.int32)
        values = tf.reshape(tf.cast(piece[:, columns:], tf.float32), [-1, *total.shape[1:]])
        with tf.control_dependencies(written):
            written = [total.scatter_nd_add(indices[:, None], values)]
    return written[-1]
