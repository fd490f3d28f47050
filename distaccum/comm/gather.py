"""What the Horovod and mpi4py backends' `gather_all` share: the row counts that cut each
worker's piece out of a gathered tensor, kept in one place that both backends import."""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf


def row_counts(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Each tensor's first dimension, int32 `[len(tensors)]`: what a worker's piece of a
    `gather_all` is cut by. With a run-time zero added in a graph (`horovod._never_constant`'s
    reason: a gather whose inputs were all constants could be folded away)."""
    counts = tf.stack([tf.shape(t)[0] for t in tensors])
    if tf.executing_eagerly():
        return counts
    return counts + tf.cast(tf.timestamp() * 0.0, tf.int32)
