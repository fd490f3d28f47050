"""Real Keras models for the exactness tests, and Keras's own step as their oracle.

Each case is a model builder, its data and how it is compiled. The oracle is Keras's
`train_on_batch` on the concatenation of a window's micro-batches (of every worker), under each
loss's own reduction: the weighted regularized case under Keras's default, the others under
`mean_with_sample_weight` (every reduction × weighting: tests/reductions.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

import scenarios

SAMPLES = 22  # micro-batches of 4: five full and a ragged tail of 2
TIME_STEPS = 6
VOCABULARY = 12
K = 3
EPOCHS = 2
# Two workers: rank 1 has 3 micro-batches (4, 4, 1), so its second window of each epoch is empty.
SHARD_SIZES = (SAMPLES, 9)
MULTIWORKER_CASES = ("regularized", "per_token", "two_output", "mixed_float16_overflow")
OVERFLOW = 1e5  # past float16's largest value (65504): the activations become inf
# The "small_gradients" case's loss weight: its float16 gradients lie below float16's normal range
# (6.1e-5) unless the loss is scaled, as deep networks' do; its learning rate is as much larger.
SMALL_GRADIENTS = 2.0 ** -20


def sgd(learning_rate: float = 0.05) -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(learning_rate, momentum=0.5)


def optimizer(case: str) -> keras.optimizers.Optimizer:
    """The optimizer a case trains with: `sgd()`, with a learning rate as much larger as the
    case's loss is smaller."""
    return sgd(0.05 / SMALL_GRADIENTS) if case == "small_gradients" else sgd()


def policy(case: str) -> str:
    return "mixed_float16" if case.startswith("mixed_float16") else "float32"


def setup(case: str, rank: int = 0, size: int = SAMPLES, seed: int = 3):
    """(model, (x, y, w), compile options) of a case, for one worker's shard. Build the model
    under `policy(case)`."""
    if case == "per_token":
        return sequence_model(seed), sequence_data(rank, size), {"loss": keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight")}
    if case == "two_output":
        return two_output_model(seed), two_output_data(rank, size), {
            "loss": TWO_OUTPUT_LOSSES, "loss_weights": TWO_OUTPUT_LOSS_WEIGHTS}
    weighted_mse = {"loss": keras.losses.MeanSquaredError(reduction="mean_with_sample_weight")}
    if case == "regularized":
        return regularized_model(seed), regularized_data(rank, size), {
            "loss": keras.losses.MeanSquaredError()}
    if case in ("mixed_precision", "mixed_float16_overflow"):
        # No activity regularizer: Keras's own step fails on one under mixed_bfloat16.
        x, y, w = regularized_data(rank, size)
        if case == "mixed_float16_overflow" and rank == 1:
            x[5, 0] = OVERFLOW  # rank 1's second micro-batch: window 1 of every epoch overflows
        if case == "mixed_precision":
            # A large weighted residual in the ragged tail: float16 gradients in the top of their
            # range, where Keras's step keeps them (see precision.large_batch_divisors).
            y[-1], w[-1] = y[-1] + 2.5, 2.0
        return regularized_model(seed, activity=False), (x, y, w), weighted_mse
    if case == "small_gradients":
        # No regularizer: its gradient would not shrink with the loss weight.
        return (regularized_model(seed, activity=False, weights=False), regularized_data(rank, size),
                {**weighted_mse, "loss_weights": SMALL_GRADIENTS})
    raise ValueError(case)


def compiled(case: str) -> keras.Model:
    """A case's model (rank 0's initial weights), compiled as the case trains (under the global
    policy)."""
    model, _, compile_options = setup(case)
    model.compile(optimizer=optimizer(case), **compile_options)
    return model


def regularized_model(seed: int = 3, activity: bool = True, weights: bool = True) -> keras.Model:
    """Weight regularizers on two layers and (batch-dependent) an activity regularizer."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(8, activation="tanh",
                           kernel_regularizer=keras.regularizers.L2(0.05) if weights else None,
                           activity_regularizer=keras.regularizers.L1(0.02) if activity else None),
        keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L1L2(0.01, 0.03) if weights else None,
                           bias_regularizer=keras.regularizers.L2(0.1) if weights else None),
    ])


def regularized_data(rank: int = 0, size: int = SAMPLES):
    rng = np.random.default_rng(11 + rank)
    x = rng.normal(size=(size, 5)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) / 3).astype("float32")
    w = rng.uniform(0.2, 2.0, size=(size,)).astype("float32")
    return x, y, w


def sequence_model(seed: int = 3, mask_zero: bool = False) -> keras.Model:
    """Per-token class logits for padded token sequences."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((TIME_STEPS,), dtype="int32")
    hidden = keras.layers.Embedding(VOCABULARY, 4, mask_zero=mask_zero)(tokens)
    hidden = keras.layers.Dense(6, activation="tanh")(hidden)
    return keras.Model(tokens, keras.layers.Dense(3)(hidden))


def sequence_data(rank: int = 0, size: int = SAMPLES):
    """Token ids with padding (id 0) after a random length, per-token labels, and the padding
    mask as per-token weights `[batch, time]`."""
    rng = np.random.default_rng(21 + rank)
    lengths = rng.integers(1, TIME_STEPS + 1, size=size)
    mask = (np.arange(TIME_STEPS)[None, :] < lengths[:, None]).astype("float32")
    x = (rng.integers(1, VOCABULARY, size=(size, TIME_STEPS)) * mask).astype("int32")
    y = rng.integers(0, 3, size=(size, TIME_STEPS)).astype("int32")
    return x, y, mask


def two_output_model(seed: int = 3) -> keras.Model:
    """A regression head and a classification head on a shared trunk."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    trunk = keras.layers.Dense(8, activation="relu",
                               kernel_regularizer=keras.regularizers.L2(0.02))(inputs)
    value = keras.layers.Dense(1, name="value")(trunk)
    label = keras.layers.Dense(3, name="label")(trunk)
    return keras.Model(inputs, {"value": value, "label": label})


def two_output_data(rank: int = 0, size: int = SAMPLES):
    rng = np.random.default_rng(31 + rank)
    x = rng.normal(size=(size, 5)).astype("float32")
    value = x[:, :1] * 2 - x[:, 1:2]
    label = np.argmax(x[:, 2:5], axis=1).astype("int32")
    w = rng.uniform(0.2, 2.0, size=(size,)).astype("float32")
    return x, {"value": value.astype("float32"), "label": label}, w


TWO_OUTPUT_LOSSES = {
    "value": keras.losses.MeanSquaredError(reduction="mean_with_sample_weight"),
    "label": keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                        reduction="mean_with_sample_weight"),
}
TWO_OUTPUT_LOSS_WEIGHTS = {"value": 0.5, "label": 2.0}


# Micro-batches of 4, as in the plain cases.
micro_batches = scenarios.split_micro_batches
as_dataset = scenarios.as_dataset


windows = scenarios.windows


def keras_reference(model: keras.Model, shards_micro_batches, k: int, epochs: int, **train_options
                    ) -> int:
    """Keras's own `train_on_batch` on each window's concatenated micro-batches of every worker.
    Returns the number of steps taken."""
    steps = 0
    for x, y, w in windows(shards_micro_batches, k, epochs):
        model.train_on_batch(x, y, sample_weight=w, **train_options)
        steps += 1
    return steps


# Unit round-off of each compute dtype: the largest relative error of one rounding to it.
UNIT_ROUND_OFF = {"mixed_float16": 2.0 ** -11, "mixed_bfloat16": 2.0 ** -8}
# The bound on a mixed-precision training's distance from the same training in float64, in unit
# round-offs per unit of the weights' path (the sum of the float64 steps' lengths). First order:
# - a weight's gradient passes through at most R = 16 roundings to the compute dtype in the
#   2-layer models here (per Dense layer forward: the casts of its input and kernel, the matmul,
#   bias and activation outputs; backward: the incoming gradient's cast, the activation's
#   derivative and its product, the matmul); each is off by at most u relative, so each
#   update's gradient is within R·u of its length (float32 accumulation and float32 sums over
#   micro-batches add only float32 round-off);
# - SGD with momentum β is linear in the gradients: step t is β·step(t-1) - lr·g(t), so
#   Σ lr·‖g(t)‖ <= (1 + β)·path, and each gradient's error reaches the final weights with total
#   weight at most 1 / (1 - β);
# so ‖W - W64‖ <= R·u·(1 + β)/(1 - β)·path = 48·u·path for β = 0.5. Measured: at most 6.1·u
# (distaccum and Keras's own step alike; 16 seeds, TensorFlow's and XLA's kernels, docs/rounding.md).
ROUND_OFF_BOUND = 16 * (1 + 0.5) / (1 - 0.5)
# And no further than this many times Keras's own step under the same policy (or than one round-off
# unit per unit of path, if Keras's step happens to land closer): the same roundings in another
# order (micro-batch sums added in float32). Measured: Keras's step 0.45-1.8 units, the ratio at
# most 1.43, over 16 seeds and under XLA's kernels (docs/rounding.md).
KERAS_ERROR_MULTIPLE = 2.0


@dataclass(frozen=True)
class Float64Training:
    """A training run in float64: the oracle for mixed precision, independent of the CPU (no
    float16 or bfloat16 kernel runs in it)."""

    end: np.ndarray  # all trainable weights, as one vector
    path: float  # Σ over updates of the length of each step

    def distance(self, variables) -> float:
        """How far trained `variables` are from the float64 result, per unit of path."""
        return float(np.linalg.norm(_flat(variables) - self.end) / self.path)


def _flat(weights) -> np.ndarray:
    return np.concatenate([np.asarray(w, "float64").ravel() for w in weights])


def float64_training(case: str, start, shards_micro_batches, skip=lambda x: False
                     ) -> Float64Training:
    """A case's training in float64 from the weights `start`, by Keras's step on each window (`K`
    micro-batches per worker, `EPOCHS` epochs), except windows whose inputs `skip` says a
    mixed-precision run skips."""
    policy, floatx = keras.mixed_precision.global_policy(), keras.config.floatx()
    keras.mixed_precision.set_global_policy("float64")
    keras.config.set_floatx("float64")  # losses compute in floatx
    try:
        reference = compiled(case)
        for variable, value in zip(reference.trainable_variables, start):
            variable.assign(np.asarray(value, "float64"))
        as64 = lambda v: v.astype("float64") if v.dtype.kind == "f" else v  # noqa: E731
        path, before = 0.0, _flat(start)
        for x, y, w in windows(shards_micro_batches, K, EPOCHS):
            if skip(x):
                continue
            reference.train_on_batch(*tf.nest.map_structure(as64, (x, y)),
                                     sample_weight=None if w is None else as64(w))
            after = _flat(reference.trainable_variables)
            path, before = path + float(np.linalg.norm(after - before)), after
    finally:
        keras.mixed_precision.set_global_policy(policy)
        keras.config.set_floatx(floatx)
    return Float64Training(before, path)


def assert_within_round_off(policy: str, ours, keras_step, training: Float64Training) -> None:
    """distaccum's weights within the dtype's bound of the float64 training, and no further from
    it than `KERAS_ERROR_MULTIPLE` times Keras's own step under the same policy."""
    unit = UNIT_ROUND_OFF[policy]
    distance, keras_distance = training.distance(ours), training.distance(keras_step)
    assert distance <= ROUND_OFF_BOUND * unit, (
        f"{policy}: {distance / unit:.3g} round-off units per unit of path from float64 "
        f"> {ROUND_OFF_BOUND:.3g}")
    assert distance <= KERAS_ERROR_MULTIPLE * max(keras_distance, unit), (
        f"{policy}: {distance / unit:.3g} round-off units per unit of path from float64, Keras's "
        f"step {keras_distance / unit:.3g}")


VALIDATION_SHARD_SIZES = (10, 5)


def binary_model(seed: int = 3) -> keras.Model:
    """Logistic regression on 5 features (one logit)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])


def binary_data(rank: int = 0, size: int = SAMPLES, split: str = "train"):
    """Noisy labels of a linear rule, so that accuracy and AUC are neither 0 nor 1."""
    rng = np.random.default_rng((41 if split == "train" else 51) + rank)
    x = rng.normal(size=(size, 5)).astype("float32")
    y = ((x @ np.array([1.0, -1.0, 0.5, 0.0, 0.2]) + rng.normal(scale=0.8, size=size)) > 0)
    return x, y.astype("int32")[:, None], None


def binary_compile_options() -> dict:
    return {"loss": keras.losses.BinaryCrossentropy(from_logits=True),
            "metrics": ["accuracy", keras.metrics.AUC(from_logits=True, name="auc")]}
