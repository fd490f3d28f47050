"""How the backends cut what they send into pieces: a gather's row counts, which cut each worker's
piece out of a gathered tensor, and the groups of variables that the start-up broadcast and the
update's reduction send one after another, which keep their copies small. Kept in one place that
every backend imports."""

from __future__ import annotations

from typing import Iterator, Sequence

import tensorflow as tf

# The start-up broadcast and the update's reduction send variables in groups of at most this many
# bytes (a larger variable goes alone): what a group's collective copies (packing, buffers,
# results) stays that small, never a copy of the whole state. Horovod's own fusion buffer, which
# plays that part inside Horovod, holds 64 MiB.
GROUP_BYTES = 32 << 20


def row_counts(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Each tensor's first dimension, int32 `[len(tensors)]`: what a worker's piece of a
    `gather_all` is cut by. With a run-time zero added in a graph (`horovod._never_constant`'s
    reason: a gather whose inputs were all constants could be folded away)."""
    counts = tf.stack([tf.shape(t)[0] for t in tensors])
    if tf.executing_eagerly():
        return counts
    return counts + tf.cast(tf.timestamp() * 0.0, tf.int32)


def bounded_groups(variables: Sequence, limit: int = GROUP_BYTES) -> Iterator[list]:
    """`variables` in order, as consecutive groups of at most `limit` bytes each (one variable
    larger than that is a group of its own)."""
    group: list = []
    size = 0
    for variable in variables:
        nbytes = tf.TensorShape(variable.shape).num_elements() * tf.as_dtype(variable.dtype).size
        if group and size + nbytes > limit:
            yield group
            group, size = [], 0
        group.append(variable)
        size += nbytes
    if group:
        yield group
