"""The exactness case every system trains, and its exact large-batch reference. NumPy only, so
a Keras 2 (tf-keras) script, a Keras 3 script and the reference all read the same arrays.

The case has the shapes that break hand-written accumulation: 2 workers with **uneven shards**
(120 and 83 samples, so rank 0 has 15 micro-batches of 8 and rank 1 has 11, the last of them a
**ragged** 3), **sample weights** (0.2 to 2.0), SGD with **momentum**, and **2 epochs**. The model
is a small MLP: Dense(16, tanh) then Dense(3) logits, sparse categorical cross-entropy on logits.

Large-batch training with global batch `workers × k × b` means, for update `u` of an epoch, one
SGD-with-momentum step on the loss Keras computes on window `u` of every worker joined into one
batch (micro-batches `u·k … u·k+k−1` of each shard, whatever each shard has left; a worker with
nothing left contributes nothing), under the loss's own `reduction`, in float64 here. The case's
loss, `SparseCategoricalCrossentropy(from_logits=True)` as the scripts pass it, has Keras's default
`sum_over_batch_size`: `Σ w·l / n`, n the window's samples (64, and 51 and 24 in each epoch's last
two, partial windows), not `Σ w·l / Σ w`. Each epoch has `ceil(15 / 4) = 4` such updates, so 8 in
all; `iterations` should read 8.
"""

from __future__ import annotations

import math

import numpy as np

WORKERS = 2
SHARD_SIZES = (120, 83)
MICRO_BATCH = 8
ACCUMULATION_STEPS = 4
EPOCHS = 2
FEATURES, HIDDEN, CLASSES = 12, 16, 3
LEARNING_RATE = 0.1
MOMENTUM = 0.9
SEED = 20261128
# The reduction of the case's loss: the scripts leave it unset, so it is Keras's default (the
# distaccum script reports its loss's own; `peer_systems.py` checks the two agree).
REDUCTION = "sum_over_batch_size"


def shard(rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Worker `rank`'s (x float32 [n, 12], y int32 [n], sample_weight float32 [n]), in the order
    it trains on them every epoch (no shuffle)."""
    rng = np.random.default_rng(SEED)
    total = sum(SHARD_SIZES)
    x = rng.normal(size=(total, FEATURES)).astype("float32")
    teacher = rng.normal(size=(FEATURES, CLASSES))
    y = np.argmax(x @ teacher + rng.normal(scale=0.5, size=(total, CLASSES)), axis=1)
    weights = rng.uniform(0.2, 2.0, size=total)
    start = sum(SHARD_SIZES[:rank])
    part = slice(start, start + SHARD_SIZES[rank])
    return x[part], y[part].astype("int32"), weights[part].astype("float32")


def initial_weights() -> list[np.ndarray]:
    """float32 [kernel 12×16, bias 16, kernel 16×3, bias 3]: Keras's order for the two Dense
    layers; every system starts from these."""
    rng = np.random.default_rng(SEED + 1)
    return [rng.normal(scale=0.4, size=(FEATURES, HIDDEN)).astype("float32"),
            rng.normal(scale=0.1, size=HIDDEN).astype("float32"),
            rng.normal(scale=0.4, size=(HIDDEN, CLASSES)).astype("float32"),
            rng.normal(scale=0.1, size=CLASSES).astype("float32")]


def updates_per_epoch() -> int:
    return max(math.ceil(math.ceil(n / MICRO_BATCH) / ACCUMULATION_STEPS) for n in SHARD_SIZES)


def window(update: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every worker's samples of update window `update` (0-based, within an epoch), joined."""
    size = ACCUMULATION_STEPS * MICRO_BATCH
    parts = [tuple(a[update * size:(update + 1) * size] for a in shard(rank))
             for rank in range(WORKERS)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def divisor(reduction: str, w: np.ndarray, elements: int) -> float:
    """What Keras's `reduction` divides the weighted loss sum `Σ w·l` by, on one batch of
    `elements` loss elements with sample weights `w` (`keras.losses.Loss`'s `reduce_values`)."""
    if reduction in ("sum_over_batch_size", "mean"):
        return float(elements)
    if reduction == "mean_with_sample_weight":
        return float(w.sum())
    if reduction == "sum":
        return 1.0
    raise ValueError(f"no large-batch reference for reduction {reduction!r}")


def gradient(weights: list[np.ndarray], x, y, w,
             reduction: str = REDUCTION) -> list[np.ndarray]:
    """Gradient of Σ w·l / D (l: cross-entropy of softmax(logits), one loss element per sample;
    D: what `reduction` divides by, `divisor`) by backpropagation."""
    kernel1, bias1, kernel2, bias2 = weights
    hidden = np.tanh(x @ kernel1 + bias1)
    logits = hidden @ kernel2 + bias2
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    d_logits = probabilities
    d_logits[np.arange(len(y)), y] -= 1.0
    d_logits *= (w / divisor(reduction, w, len(y)))[:, None]
    d_hidden = (d_logits @ kernel2.T) * (1.0 - hidden ** 2)
    return [x.T @ d_hidden, d_hidden.sum(axis=0), hidden.T @ d_logits, d_logits.sum(axis=0)]


def reference(reduction: str = REDUCTION) -> tuple[list[np.ndarray], int]:
    """Final weights of exact large-batch training, in float64, and its number of updates.

    Exact means what Keras computes on each window's concatenated batch under the loss's
    `reduction`, as distaccum trains it: under the default `sum_over_batch_size` that is
    Σ w·l / (the window's loss elements), not Σ w·l / Σ w (`mean_with_sample_weight`); so an
    epoch's partial windows are divided by their own sample counts, not the full window's."""
    weights = [w.astype("float64") for w in initial_weights()]
    velocity = [np.zeros_like(w) for w in weights]
    updates = 0
    for _ in range(EPOCHS):
        for update in range(updates_per_epoch()):
            x, y, w = window(update)
            grads = gradient(weights, x.astype("float64"), y, w.astype("float64"), reduction)
            # Keras's SGD with momentum: v = m·v − lr·g; θ += v.
            velocity = [MOMENTUM * v - LEARNING_RATE * g for v, g in zip(velocity, grads)]
            weights = [p + v for p, v in zip(weights, velocity)]
            updates += 1
    return weights, updates


def relative_error(weights: list[np.ndarray], exact: list[np.ndarray]) -> float:
    """max |θ − θ_exact| / max |θ_exact − θ_initial|: the error against how far training moved
    the weights, so float32 round-off reads about 1e-6 whatever the weights' scale."""
    moved = max(float(np.max(np.abs(e - i))) for e, i in zip(exact, initial_weights()))
    return max(float(np.max(np.abs(np.asarray(w, "float64") - e)))
               for w, e in zip(weights, exact)) / moved
