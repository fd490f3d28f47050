"""Data: what a micro-batch is, where a worker's micro-batches come from, and how the workers
agree on the number of updates per epoch.

Two kinds of data reach the training loop, both as `EpochSource`s:

- `microbatches.MicroBatches`: arrays or TFRecord files, in the order `order` defines. Each
  worker reads only the samples it trains on, the updates per epoch follow by arithmetic, and a
  resumed epoch starts at its next update without reading what came before.
- `DatasetEpochs`: a `tf.data.Dataset` of micro-batches (or a function of the epoch returning
  one) that the user shards. Shards may differ in size, so the workers agree, once, on the
  largest number of micro-batches any of them has (one pass to count them when tf.data cannot
  tell); a worker that runs out early joins the remaining updates with an empty window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Union

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


# A dataset, or a function of the 1-based epoch returning that epoch's dataset (for shuffles
# that must be reproducible on resume).
EpochData = Union[tf.data.Dataset, Callable[[int], tf.data.Dataset]]


class DatasetEpochs:
    """A user's own `tf.data.Dataset` of this worker's micro-batches, or a function of the epoch
    returning one, as the training loop takes it."""

    micro_batch_size = None  # the user's batching: not known before reading it

    def __init__(self, dataset: EpochData) -> None:
        self._dataset = dataset
        self._plans: dict[int, EpochPlan] = {}
        self._first = self.epoch(1, 1)  # the user's function called once for spec and count
        check_micro_batch_spec(self._first)
        self.element_spec = self._first.element_spec

    def plan(self, accumulation_steps: int) -> EpochPlan:
        """The agreed plan (counted once, then kept)."""
        if accumulation_steps not in self._plans:
            self._plans[accumulation_steps] = agree_on_epoch_plan(self._first, accumulation_steps)
        return self._plans[accumulation_steps]

    def epoch(self, epoch: int, accumulation_steps: int, first_update: int = 0) -> tf.data.Dataset:
        """The epoch's micro-batches from window `first_update` on (those before are skipped:
        read, not trained on)."""
        dataset = self._dataset
        if callable(dataset) and not isinstance(dataset, tf.data.Dataset):
            dataset = dataset(epoch)
        return dataset.skip(first_update * accumulation_steps) if first_update else dataset

    def describe(self, epoch: int, accumulation_steps: int, micro_batch: int) -> str:
        return ""


class EpochSource(Protocol):
    """What the training loop reads an epoch from: `DatasetEpochs`, or
    `microbatches.MicroBatches` (which also has `evaluation()`, for validation)."""

    element_spec: object
    micro_batch_size: int | None  # None when the source cannot tell (a user's dataset)

    def plan(self, accumulation_steps: int) -> EpochPlan: ...

    def epoch(self, epoch: int, accumulation_steps: int,
              first_update: int = 0) -> tf.data.Dataset: ...

    def describe(self, epoch: int, accumulation_steps: int, micro_batch: int) -> str: ...


def as_epoch_source(data) -> EpochSource:
    """What the training loop reads: an `EpochSource` as it is, any other data (a dataset, a
    function of the epoch) as a `DatasetEpochs`, its micro-batch spec checked."""
    return data if hasattr(data, "plan") and hasattr(data, "epoch") else DatasetEpochs(data)


def evaluation_dataset(data) -> tf.data.Dataset:
    """A validation set as `Trainer.evaluate` reads it: this worker's micro-batches."""
    return data.evaluation() if hasattr(data, "evaluation") else data  # else checked as a dataset


def shuffled_shards(samples: tf.data.Dataset, micro_batch_size: int, seed: int,
                    shuffle_buffer: int) -> Callable[[int], tf.data.Dataset]:
    """For a dataset of samples the user's function builds: per epoch, shuffled with a buffer
    seeded by (seed, epoch), then this worker's share, batched. Every worker reads all of it
    (a dataset cannot be split before it is read): record files avoid that."""
    def for_epoch(epoch: int) -> tf.data.Dataset:
        # Same seed on every worker: all shuffle identically, so `shard` splits disjointly.
        shuffled = samples.shuffle(shuffle_buffer, seed=seed * 100_003 + epoch,
                                   reshuffle_each_iteration=False)
        return shard(shuffled).batch(micro_batch_size).prefetch(2)
    return for_epoch


def shard(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """This worker's share: every `num_workers`-th element starting at `rank` (call before
    `.batch()` so shards split samples, not micro-batches)."""
    return dataset.shard(comm.num_workers(), comm.rank())


def with_class_weight(data, class_weight):
    """`data` (a dataset of micro-batches, or `micro_batches(...)`) with Keras's `class_weight`
    applied to every micro-batch."""
    if not isinstance(data, tf.data.Dataset) and hasattr(data, "map"):
        return data.map(lambda dataset: apply_class_weight(dataset, class_weight))
    check_micro_batch_spec(data)
    return apply_class_weight(data, class_weight)


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
