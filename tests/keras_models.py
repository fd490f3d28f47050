"""Real Keras models for the exactness tests, and Keras's own step as their oracle.

Each case is a model builder, its data and how it is compiled. The oracle is Keras's
`train_on_batch` on the concatenation of a window's micro-batches (of every worker); losses that
take sample weights use Keras's `mean_with_sample_weight` reduction, which is distaccum's
definition (sum(w * l) / sum(w)); unweighted ones keep Keras's default.
"""

from __future__ import annotations

import math

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


def sgd() -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(0.05, momentum=0.5)


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
        return regularized_model(seed), regularized_data(rank, size), weighted_mse
    if case == "mixed_float16_overflow":
        x, y, w = regularized_data(rank, size)
        if rank == 1:
            x[5, 0] = OVERFLOW  # rank 1's second micro-batch: window 1 of every epoch overflows
        return regularized_model(seed, activity=False), (x, y, w), weighted_mse
    raise ValueError(case)


def regularized_model(seed: int = 3, activity: bool = True) -> keras.Model:
    """Weight regularizers on two layers and (batch-dependent) an activity regularizer."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.05),
                           activity_regularizer=keras.regularizers.L1(0.02) if activity else None),
        keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L1L2(0.01, 0.03),
                           bias_regularizer=keras.regularizers.L2(0.1)),
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


def keras_reference(model: keras.Model, shards_micro_batches, k: int, epochs: int, **train_options
                    ) -> int:
    """Keras's own `train_on_batch` on each window's concatenated micro-batches of every worker
    (window rule: micro-batches u*k … u*k+k-1). Returns the number of steps taken."""
    windows = math.ceil(max(len(m) for m in shards_micro_batches) / k)
    steps = 0
    for _ in range(epochs):
        for u in range(windows):
            parts = [b for shard in shards_micro_batches for b in shard[u * k:u * k + k]]
            x, y = (tf.nest.map_structure(lambda *p: np.concatenate(p), *[p[i] for p in parts])
                    for i in (0, 1))
            w = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
            model.train_on_batch(x, y, sample_weight=w, **train_options)
            steps += 1
    return steps


def assert_same_weights(got: keras.Model, expected: keras.Model, rtol: float, atol: float) -> None:
    for a, b in zip(got.trainable_variables, expected.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=rtol, atol=atol, err_msg=a.path)


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
