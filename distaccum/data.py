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


def apply_class_weight(dataset: tf.data.Dataset, class_weight) -> tf.data.Dataset:
    """Keras's `class_weight` as per-sample weights: each sample weighs its class's weight (1 for
    classes not listed), times its own sample weight if it has one.

    Labels are class ids (`[batch]` or `[batch, 1]`) or one-hot rows (argmax), as in Keras.
    """
    if not isinstance(class_weight, dict) or not class_weight or not all(
            isinstance(c, int) and not isinstance(c, bool) and isinstance(w, (int, float))
            and not isinstance(w, bool) and w >= 0 for c, w in class_weight.items()):
        raise ValueError("class_weight must be a non-empty dict {class id: weight >= 0}. "
                         f"Received: class_weight={class_weight!r}")
    if min(class_weight) < 0:
        raise ValueError(f"class ids must be >= 0. Received: class_weight={class_weight!r}")
    if not isinstance(dataset.element_spec[1], tf.TensorSpec):
        raise ValueError("class_weight needs a model with a single output (as in Keras). "
                         f"Received: labels {dataset.element_spec[1]}")
    table = tf.constant([float(class_weight.get(c, 1.0)) for c in range(max(class_weight) + 1)])

    def weigh(x, y, sample_weight=None):
        if y.shape.rank >= 2 and y.shape[-1] != 1:
            classes = tf.argmax(y, axis=-1, output_type=tf.int32)
        else:
            classes = tf.cast(tf.round(tf.reshape(y, [-1])), tf.int32)
        # A class id past the table's end weighs 1, as an unlisted class does.
        weights = tf.gather(tf.concat([table, [1.0]], 0),
                            tf.minimum(classes, len(table)))
        if sample_weight is not None:
            weights *= tf.cast(tf.reshape(sample_weight, [-1]), tf.float32)
        return x, y, weights

    return dataset.map(weigh)
