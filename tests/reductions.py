"""Every loss reduction × every way of weighting, on small dense models: the cases, and Keras's own
step as their oracle.

A case is a model, its loss (one per output), the weights its samples carry and how they reach
the loss. The oracle is Keras's `train_on_batch` on each window's concatenated batch, every
worker's micro-batches of that window together; a ragged tail window is smaller. One process
runs every case in turn (tests/test_reductions.py); two workers with uneven shards run them all
in one launch per backend (tests/workers/train_reductions.py).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import keras
import numpy as np

import scenarios

REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight", "sum")
TIME, FEATURES, CLASSES = 4, 3, 5
MICRO_BATCH_SIZE, K, EPOCHS = 3, 2, 2
SAMPLES = 14  # windows of 6, 6 and 2 on one worker
# Two workers' uneven shards: windows of 11 (3 + 3 on rank 0, 3 + 2 on rank 1) and 3 (rank 0's).
SHARDS = (slice(0, 9), slice(9, 14))
# The distance from Keras's step, as a share of how far the weights moved. Float32 round-off in
# another summation order is ~1e-7 here; a divisor off by one sample is ~1e-1.
TOLERANCE = 1e-5

# How samples are weighted, on the sequence model (a loss per time step, `[batch, time]`):
SEQUENCE_WEIGHTINGS = (
    "unweighted",
    "per_sample",  # `[batch]`: weighs as `[batch, 1]` (Keras refuses a `[batch]` weight here)
    "per_sample_column",  # `[batch, 1]`
    "per_element",  # `[batch, time]`
    "mask",  # Keras's mask from a Masking layer: padded time steps do not count
    "mask_and_per_element",
    "mask_and_per_sample_column",
)
# ... and on the classifier (a loss per sample, `[batch]`):
CLASSIFIER_WEIGHTINGS = ("unweighted", "per_sample", "per_sample_column", "class_weight",
                         "class_weight_and_per_sample")
CLASS_WEIGHT = {0: 0.5, 1: 2.0, 3: 3.0}  # class 2 and 4 weigh 1, as in Keras
# Keras refuses class_weight beside sample weights; distaccum multiplies them (its oracle: Keras's
# step on the products).


class SquaredHinge(keras.losses.Loss):
    """A user's own `Loss` subclass: its `reduction` is the constructor's."""

    def call(self, y_true, y_pred):
        return keras.ops.mean(keras.ops.square(keras.ops.relu(1.0 - y_true * y_pred)), axis=-1)


def mean_absolute(y_true, y_pred):
    """A user's plain loss function: Keras wraps it with its default reduction."""
    return keras.ops.mean(keras.ops.abs(y_true - y_pred), axis=-1)


@dataclass(frozen=True)
class Case:
    """One model, loss and weighting: what `Trainer` and Keras's `compile` are given."""

    model: str  # "sequence", "classifier" or "two_output"
    loss: object
    weighting: str
    loss_weights: object = None
    fit_options: dict = field(default_factory=dict)

    def build(self, seed: int = 3) -> keras.Model:
        keras.utils.set_random_seed(seed)
        if self.model == "sequence":
            inputs = keras.Input((TIME, FEATURES))
            hidden = inputs
            if self.weighting.startswith("mask"):
                hidden = keras.layers.Masking(0.0)(hidden)
            hidden = keras.layers.Dense(6, activation="tanh")(hidden)
            return keras.Model(inputs, keras.layers.Dense(CLASSES)(hidden))
        if self.model == "classifier":
            return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(6, activation="tanh"),
                                     keras.layers.Dense(CLASSES)])
        inputs = keras.Input((FEATURES,))
        hidden = keras.layers.Dense(6, activation="tanh")(inputs)
        return keras.Model(inputs, {"score": keras.layers.Dense(2, name="score")(hidden),
                                    "label": keras.layers.Dense(CLASSES, name="label")(hidden)})

    def data(self, part: slice = slice(None)):
        """`(x, y, w)` of samples `part` (w None when unweighted)."""
        rng = np.random.default_rng(0)
        weights = rng.uniform(0.2, 3.0, size=(SAMPLES, TIME)).astype("float32")
        if self.model == "sequence":
            x = rng.normal(size=(SAMPLES, TIME, FEATURES)).astype("float32")
            lengths = rng.integers(1, TIME + 1, size=SAMPLES)
            x[np.arange(TIME)[None] >= lengths[:, None]] = 0.0  # padding, masked when Masking is in
            y = rng.integers(0, CLASSES, size=(SAMPLES, TIME)).astype("int32")
            w = {"unweighted": None, "per_sample": weights[:, 0],
                 "per_sample_column": weights[:, :1], "per_element": weights, "mask": None,
                 "mask_and_per_element": weights,
                 "mask_and_per_sample_column": weights[:, :1]}[self.weighting]
        else:
            x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
            y = rng.integers(0, CLASSES, size=SAMPLES).astype("int32")
            w = {"unweighted": None, "per_sample": weights[:, 0],
                 "per_sample_column": weights[:, :1], "class_weight": None,
                 "class_weight_and_per_sample": weights[:, 0],
                 "per_output": {"score": weights[:, 0], "label": weights[:, 1]}}[self.weighting]
            if self.model == "two_output":
                y = {"score": np.sign(x[:, :2]).astype("float32"), "label": y}
        return tuple(None if v is None else scenarios.take(v, part) for v in (x, y, w))

    def micro_batches(self, part: slice = slice(None)) -> list[tuple]:
        return scenarios.split_micro_batches(*self.data(part), MICRO_BATCH_SIZE)

    def train_options(self) -> dict:
        if self.weighting.startswith("class_weight"):
            return {"class_weight": CLASS_WEIGHT}
        return {}

    def keras_batch(self, x, y, w) -> tuple[tuple, dict]:
        """A window's `(x, y, w)` and options as Keras's `train_on_batch` takes them: a `[batch]`
        weight on a `[batch, time]` loss as `[batch, 1]`, and class weights beside sample weights
        multiplied into them."""
        if self.model == "sequence" and w is not None and w.ndim == 1:
            w = w[:, None]
        if self.weighting == "class_weight_and_per_sample":
            return (x, y, w * np.array([CLASS_WEIGHT.get(c, 1.0) for c in y], "float32")), {}
        return (x, y, w), self.train_options()


def _sparse(reduction: str) -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)


def cases() -> dict[str, Case]:
    """Every case by name."""
    found = {}
    for reduction, weighting in itertools.product(REDUCTIONS, SEQUENCE_WEIGHTINGS):
        found[f"sequence-{reduction}-{weighting}"] = Case("sequence", _sparse(reduction), weighting)
    for reduction, weighting in itertools.product(REDUCTIONS, CLASSIFIER_WEIGHTINGS):
        found[f"classifier-{reduction}-{weighting}"] = Case("classifier", _sparse(reduction),
                                                            weighting)
    # Losses as Keras takes them in `compile`: a name, a plain function, a user's subclass.
    found["classifier-name-per_sample"] = Case(
        "classifier", "sparse_categorical_crossentropy", "per_sample")
    for weighting in ("unweighted", "per_sample"):
        found[f"two_output-mixed_reductions-{weighting}"] = Case(
            "two_output", {"score": SquaredHinge(reduction="sum"), "label": _sparse("mean")},
            weighting, loss_weights={"score": 0.5, "label": 2.0})
    found["two_output-weighted_means-per_sample"] = Case(  # one Σ w for both outputs
        "two_output", {"score": SquaredHinge(reduction="mean_with_sample_weight"),
                       "label": _sparse("mean_with_sample_weight")},
        "per_sample", loss_weights=[1.5, 1.0])
    found["two_output-function_and_weighted_mean-per_output"] = Case(
        "two_output", {"score": mean_absolute, "label": _sparse("mean_with_sample_weight")},
        "per_output", loss_weights={"score": 3.0, "label": 0.25})
    return found


def xla_cases() -> dict[str, Case]:
    """The cases two workers run under XLA too (XLA's compile of every case would double the
    launch; one process runs them all under XLA): every reduction with the weightings that
    combine most, and every two-output case."""
    combined = ("per_element", "mask_and_per_sample_column", "class_weight_and_per_sample")
    return {name: case for name, case in cases().items()
            if case.weighting in combined or case.model == "two_output"}


def optimizer() -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(0.1, momentum=0.5)


@functools.cache
def keras_step(name: str, workers: int) -> tuple[keras.Model, int]:
    """Keras's own `train_on_batch` on each window's samples of every worker's shard (one worker:
    all samples; two: `SHARDS`): the trained model and how many steps it took (computed once per
    case and worker count)."""
    shards = SHARDS if workers == 2 else (slice(None),)
    case = cases()[name]
    model = case.build()
    model.compile(optimizer=optimizer(), loss=case.loss, loss_weights=case.loss_weights)
    steps = 0
    for window in scenarios.windows([case.micro_batches(part) for part in shards], K, EPOCHS):
        (x, y, w), options = case.keras_batch(*window)
        model.train_on_batch(x, y, sample_weight=w, **options)
        steps += 1
    return model, steps
