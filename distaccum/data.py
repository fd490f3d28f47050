"""Data: what a micro-batch is, sharding, and how workers agree on the number of updates.

Every worker brings its own `tf.data.Dataset` of micro-batches. Shards may differ in size, so the
workers agree, once per `fit`, on the largest number of micro-batches any of them has; that fixes
the number of update windows per epoch on every worker, and a worker that runs out early joins the
remaining updates with an empty window instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf

from distaccum import comm

INFINITE = math.inf


def check_micro_batch_spec(dataset: tf.data.Dataset) -> None:
    """Reject datasets whose elements are not `(x, y)` or `(x, y, sample_weight)` tuples."""
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"dataset must be a tf.data.Dataset. Received: a {type(dataset).__name__}"
        )
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise ValueError(
            "each micro-batch must be (x, y) or (x, y, sample_weight); labels are required. "
            f"Received: element_spec={spec}"
        )


def check_inputs_match_model(element_spec, model) -> None:
    """Catch an unbatched dataset before tracing (Keras would fail deep inside `tf.function`)."""
    model_inputs = getattr(model, "inputs", None)
    if not model_inputs:
        return  # a subclassed model declares no input shape to compare with
    given = tf.nest.flatten(element_spec[0])[0].shape
    expected = model_inputs[0].shape
    if given.rank != len(expected):
        raise ValueError(
            f"each element must be a micro-batch with a leading batch axis matching the model's "
            f"input {tuple(expected)} (use dataset.batch(micro_batch_size)). Received: x shape "
            f"{tuple(given)}"
        )


def unpack(micro_batch) -> tuple:
    """`(x, y, sample_weight or None)` from a dataset element."""
    x, y, *rest = micro_batch
    return x, y, (rest[0] if rest else None)


def count_micro_batches(dataset: tf.data.Dataset) -> float:
    """This worker's micro-batches per epoch: `INFINITE` for a repeating dataset.

    Uses the dataset's cardinality when tf.data knows it, else counts by iterating once (a
    `filter` hides the size; counting costs one pass over the input pipeline, not the model).
    """
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        return INFINITE
    if cardinality != tf.data.UNKNOWN_CARDINALITY:
        return cardinality
    return int(dataset.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))


@dataclass(frozen=True)
class EpochPlan:
    """What every worker agreed on before training.

    Attributes:
        updates_per_epoch: update windows per epoch, the same on every worker (`INFINITE` when
            every worker's dataset repeats forever).
        micro_batches_per_epoch: this worker's own micro-batches per epoch.
    """

    updates_per_epoch: float
    micro_batches_per_epoch: float


def agree_on_epoch_plan(dataset: tf.data.Dataset, accumulation_steps: int) -> EpochPlan:
    """Agree across workers on the updates per epoch: ceil(max micro-batches / k).

    One collective of two scalars (the max and, negated, the min of the counts).

    Raises:
        ValueError: every worker's dataset is empty, or some repeat forever and others do not.
    """
    local = count_micro_batches(dataset)
    encoded = -1 if local == INFINITE else local
    with comm.collective("the start-up agreement on updates per epoch"):
        extremes = comm.current().max_all(tf.constant([encoded, -encoded], dtype=tf.int64))
    largest, smallest = int(extremes[0]), -int(extremes[1])
    if smallest == -1 and largest != -1:
        raise ValueError(
            "either every worker's dataset repeats forever or none does. "
            f"Received: micro-batches per epoch on this worker={local}"
        )
    if largest == -1:
        return EpochPlan(INFINITE, INFINITE)
    if largest == 0:
        raise ValueError("the dataset is empty on every worker. Received: 0 micro-batches")
    return EpochPlan(math.ceil(largest / accumulation_steps), local)


def shard(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """This worker's share: every `num_workers`-th element starting at `rank` (call before
    `.batch()` so shards split samples, not micro-batches)."""
    return dataset.shard(comm.num_workers(), comm.rank())
