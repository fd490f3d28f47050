"""How the backends cut what they send into pieces: a gather's row counts, which cut each worker's
piece out of a gathered tensor; the groups of variables that the start-up broadcast and the
update's reduction send one after another; and the ranges of rows a large variable is read
(checkpoints) or zeroed in, after which `shared_reads` takes the variable out of TensorFlow's
copy-on-read mode. Each keeps its copies small. Kept in one place that every backend imports."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import tensorflow as tf

# The start-up broadcast and the update's reduction send variables in groups of at most this many
# bytes (a larger piece goes alone): what a group's collective copies (packing, buffers, results)
# stays that small, never a copy of the whole state. Horovod's own fusion buffer plays that part
# inside Horovod (`horovod.FUSION_BYTES`).
GROUP_BYTES = 32 << 20

# A variable larger than this travels in ranges of rows (`travelling`).
CUT_BYTES = 4 * GROUP_BYTES


def run_time_zero(dtype) -> tf.Tensor:
    """A scalar zero of `dtype` that TensorFlow's graph optimisations cannot fold into a
    constant (made from `tf.timestamp`: stateful, finite), for a few bytes of work.

    What it keeps from being folded, computed once and baked into the graph: a collective
    whose inputs are all constants (`horovod._never_constant`), and a large tensor of zeros
    (`zero_in_place`), which the graph would then hold for good (0.11 W on Figure 4's
    Embedding). Under XLA, which has no `Timestamp`, a plain zero (XLA's memory was not
    measured)."""
    if tf.__internal__.get_enclosing_xla_context() is not None:
        return tf.zeros([], dtype)
    return tf.cast(tf.timestamp() * 0.0, dtype)


def row_counts(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Each tensor's first dimension, int32 `[len(tensors)]`: what a worker's piece of a
    `gather_all` is cut by. With a `run_time_zero` added in a graph (a gather whose inputs
    were all constants could be folded away)."""
    counts = tf.stack([tf.shape(t)[0] for t in tensors])
    if tf.executing_eagerly():
        return counts
    return counts + run_time_zero(tf.int32)


@dataclass(frozen=True)
class Piece:
    """A variable, or a range of its first axis (`rows`): as much of it as one collective, read
    or write handles, so that a variable larger than `GROUP_BYTES` (an `Embedding` that holds
    most of the weights) need not be copied whole."""

    variable: object  # a `keras.Variable` or a `tf.Variable`
    rows: tuple[int, int] | None = None  # [start, stop); None: the whole variable

    @property
    def _target(self):
        # A Keras variable's TensorFlow variable, which slices can be read from and assigned to.
        value = getattr(self.variable, "value", self.variable)
        return value if isinstance(value, tf.Variable) else self.variable

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.variable.shape)
        return shape if self.rows is None else (self.rows[1] - self.rows[0], *shape[1:])

    @property
    def dtype(self) -> tf.DType:
        return tf.as_dtype(self.variable.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size

    def read(self) -> tf.Tensor:
        """The piece's values, sharing the variable's memory where TensorFlow allows it (after
        a sparse access, only once `shared_reads` has run)."""
        target = self._target
        with tf.control_dependencies(shared_reads([self.variable])):
            return (tf.convert_to_tensor(target) if self.rows is None
                    else target[slice(*self.rows)])

    def write(self, value):
        """Assign `value` to the piece; in a graph, returns the assignment (to wait for). A
        range of rows is written as TensorFlow writes sparse updates, which leaves the variable
        copying on every read: `shared_reads` ends that again."""
        target = self._target
        if self.rows is None:
            return target.assign(value, read_value=False)
        written = target[slice(*self.rows)].assign(value)
        with tf.control_dependencies([written] if written is not None else []):
            return tf.group(shared_reads([self.variable]))


def row_ranges(shape: Sequence[int], itemsize: int,
               limit: int | None = None) -> list[tuple[int, int] | None]:
    """An array of `shape` whole (`[None]`), or, when it holds more than `limit` bytes
    (`GROUP_BYTES`), as ranges of its rows of at most `limit` bytes each (at least one row)."""
    limit = GROUP_BYTES if limit is None else limit
    nbytes = math.prod(shape) * itemsize
    if nbytes <= limit or len(shape) == 0 or shape[0] <= 1:
        return [None]
    rows = max(1, limit // (nbytes // shape[0]))
    return [(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]


def pieces_of(variable, limit: int | None = None) -> list[Piece]:
    """`variable` whole, or, when it holds more than `limit` bytes (`GROUP_BYTES`), as ranges
    of its rows of at most `limit` bytes each (at least one row)."""
    return [Piece(variable, rows) for rows in row_ranges(
        tuple(variable.shape), tf.as_dtype(variable.dtype).size, limit)]


def travelling(variables: Sequence) -> list[Piece]:
    """`variables` in order as a collective sends them: each whole, but one of more than
    `CUT_BYTES` as ranges of its rows of at most `GROUP_BYTES` (`pieces_of`).

    Whole where it can: assigning ranges of rows into a variable, at start-up or in the update
    step, left 0.4–1.5 W more resident on Figure 4's Dense stack (kernels of 36 MiB) than
    assigning whole variables. In ranges when it must: a table that holds most of the weights,
    sent whole, is copied whole (the start-up broadcast peaked 0.7 W higher on Figure 4's
    Embedding, and the owner of its sharded state 1 W higher under Horovod)."""
    return [piece for variable in variables
            for piece in (pieces_of(variable) if Piece(variable).nbytes > CUT_BYTES
                          else [Piece(variable)])]


def bounded_groups(variables: Sequence, limit: int | None = None) -> Iterator[list[Piece]]:
    """`variables` in order (`travelling`), as consecutive groups of at most `limit` bytes
    (`GROUP_BYTES`) each, a larger piece alone."""
    return groups_by_size(travelling(variables), lambda piece: piece.nbytes, limit)


def groups_by_size(items: Sequence, size, limit: int | None = None) -> Iterator[list]:
    """`items` in order, as consecutive groups whose `size(item)`s add up to at most `limit`
    (`GROUP_BYTES`), a larger item alone."""
    limit = GROUP_BYTES if limit is None else limit
    group: list = []
    total = 0
    for item in items:
        if group and total + size(item) > limit:
            yield group
            group, total = [], 0
        group.append(item)
        total += size(item)
    if group:
        yield group


def zero_in_place(variable) -> list:
    """Set `variable` to zeros a piece at a time (`pieces_of`): assigning a whole tensor of zeros
    would hold a second copy of a large variable while it is written. The zeros are made at
    run time (`run_time_zero`), never a constant the graph keeps. Returns the assignments (in a
    graph, to wait for)."""
    zero = run_time_zero(tf.as_dtype(variable.dtype))
    return [piece.write(tf.fill(piece.shape, zero)) for piece in pieces_of(variable)]


def as_bytes(value: tf.Tensor) -> tf.Tensor:
    """`value`'s bytes, uint8 `[-1]`: what a collective of any mix of dtypes sends."""
    value = tf.convert_to_tensor(value)
    return tf.reshape(value if value.dtype.size == 1 else tf.bitcast(value, tf.uint8), [-1])


def from_bytes(data: tf.Tensor, variable) -> tf.Tensor:
    """`as_bytes`' inverse: `data` as a value of `variable`'s (or a `Piece`'s) shape and
    dtype."""
    dtype = tf.as_dtype(variable.dtype)
    shape = list(variable.shape) + ([dtype.size] if dtype.size > 1 else [])
    return tf.bitcast(tf.reshape(data, shape), dtype)


def shared_reads(variables) -> list:
    """Take `variables` out of TensorFlow's copy-on-read mode, in which a sparse access (an
    `Embedding`'s gather of its table, a `scatter_add` of rows into a sum) leaves a variable for
    good: then every dense read and every dense write first copies the whole variable (a table
    that holds most of the weights: 1 W per read). Afterwards reads share its buffer again, and
    a write copies only while a read still holds it. Returns the ops (in a graph, to wait for).

    None under XLA, which has no such op and keeps variables its own way (no sparse access
    there puts one in that mode)."""
    if tf.__internal__.get_enclosing_xla_context() is not None:
        return []
    return [tf.raw_ops.DisableCopyOnRead(resource=variable.handle) for variable in variables]
