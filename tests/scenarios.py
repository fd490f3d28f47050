"""Shared test problems and the reference computation every equivalence test compares against.

The reference applies the window definition literally, with no distaccum code: for update window u
of an epoch, concatenate micro-batches u*k … u*k+k-1 of every worker, take one step on that batch
with the sample-weighted mean loss sum(w * l) / sum(w) (Keras's loss with reduction="sum" divided by
the weight sum), and apply it with the optimizer's own `apply_gradients`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

MICRO_BATCH_SIZE = 4
# Worker 1 has fewer samples: at k=3 its second window is empty; both shards end ragged.
SHARD_SIZES = (23, 9)
FEATURES = 5


def make_model(seed: int = 7) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )


def make_optimizer(name: str) -> keras.optimizers.Optimizer:
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=0.1, momentum=0.5)
    if name == "adam_schedule":
        schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)
        return keras.optimizers.Adam(learning_rate=schedule)
    if name in ("adafactor", "adafactor_clipped"):  # a factored second moment; a clip that bites
        return keras.optimizers.Adafactor(
            learning_rate=0.1, global_clipnorm=0.05 if name.endswith("_clipped") else None)
    if name == "adamw_ema":  # weight decay, and moving averages written over the weights
        return keras.optimizers.AdamW(learning_rate=0.05, weight_decay=0.1, use_ema=True,
                                      ema_momentum=0.5, ema_overwrite_frequency=3)
    raise ValueError(name)


def trainer_optimizer(name: str) -> tuple[keras.optimizers.Optimizer, float | None]:
    """`make_optimizer(name)` as a `Trainer` takes it: Keras's `global_clipnorm` becomes the
    Trainer's `clip_global_norm` (the same clip), returned beside the optimizer."""
    optimizer = make_optimizer(name)
    clip, optimizer.global_clipnorm = optimizer.global_clipnorm, None
    return optimizer, clip


def make_shard(rank: int, size: int, weighted: bool = True, seed: int = 3):
    """Deterministic `(x, y, w)` arrays for one worker."""
    rng = np.random.default_rng(seed + 101 * rank)
    x = rng.normal(size=(size, FEATURES)).astype("float32")
    y = (x @ np.arange(1, FEATURES + 1, dtype="float32")[:, None] / 5 + 0.1).astype("float32")
    w = rng.uniform(0.2, 2.0, size=(size,)).astype("float32") if weighted else None
    return x, y, w


@dataclass(frozen=True)
class RecordSet:
    """TFRecord files written by `write_record_files` and what they hold, by sample number (file
    order): `tf.train.Example`s with features `x`, `y`, `w` and the sample's number `id`."""

    pattern: str
    paths: tuple[Path, ...]
    records: np.ndarray  # serialized examples (an object array: bytes kept whole)
    x: np.ndarray
    y: np.ndarray
    w: np.ndarray


def record_features(x, y) -> dict:
    """The `parse_single_example` spec of `write_record_files`'s examples."""
    label = tf.int64 if np.issubdtype(y.dtype, np.integer) else tf.float32
    return {"x": tf.io.FixedLenFeature([x.shape[1]], tf.float32),
            "y": tf.io.FixedLenFeature(list(y.shape[1:]), label),
            "w": tf.io.FixedLenFeature([], tf.float32),
            "id": tf.io.FixedLenFeature([], tf.int64)}


def serialize_examples(x, y, w, ids) -> list[bytes]:
    def values(array):
        flat = np.ravel(array)
        if np.issubdtype(flat.dtype, np.integer):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=flat.tolist()))
        return tf.train.Feature(float_list=tf.train.FloatList(value=flat.tolist()))

    return [tf.train.Example(features=tf.train.Features(feature={
        "x": values(row_x), "y": values(row_y), "w": values(row_w),
        "id": values(np.int64(sample_id))})).SerializeToString()
            for row_x, row_y, row_w, sample_id in zip(x, y, w, ids)]


def write_record_files(directory, sizes, x, y, w) -> RecordSet:
    """TFRecord files `part-<i>.tfrecord` of `sizes[i]` samples each, the rows of `x`, `y`, `w`
    in file order (sample `id` = row)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths, records, start = [], [], 0
    for index, size in enumerate(sizes):
        paths.append(directory / f"part-{index}.tfrecord")
        rows = slice(start, start + size)
        examples = serialize_examples(x[rows], y[rows], w[rows], range(start, start + size))
        with tf.io.TFRecordWriter(str(paths[-1])) as writer:
            for example in examples:
                writer.write(example)
        records += examples
        start += size
    as_objects = np.empty(len(records), dtype=object)
    as_objects[:] = records
    return RecordSet(str(directory / "part-*.tfrecord"), tuple(paths), as_objects, x, y, w)


def take(values, part: slice):
    """Samples `part` of an array, or of a dict of arrays by output (None stays None)."""
    return None if values is None else tf.nest.map_structure(lambda v: v[part], values)


def split_micro_batches(x, y, w, micro_batch_size: int = MICRO_BATCH_SIZE) -> list[tuple]:
    """`(x, y, w)` cut into micro-batches; each may be an array or a dict of arrays by output."""
    return [tuple(take(values, slice(i, i + micro_batch_size)) for values in (x, y, w))
            for i in range(0, len(tf.nest.flatten(x)[0]), micro_batch_size)]


def as_dataset(x, y, w, micro_batch_size: int = MICRO_BATCH_SIZE) -> tf.data.Dataset:
    tensors = (x, y) if w is None else (x, y, w)
    return tf.data.Dataset.from_tensor_slices(tensors).batch(micro_batch_size)


def windows(shards_micro_batches, k: int, epochs: int):
    """Each window's micro-batches of every worker, concatenated, `(x, y, w or None)`, epoch after
    epoch (window rule: micro-batches u*k … u*k+k-1)."""
    count = math.ceil(max(len(m) for m in shards_micro_batches) / k)
    for _ in range(epochs):
        for u in range(count):
            parts = [b for shard in shards_micro_batches for b in shard[u * k:u * k + k]]
            x, y, w = (None if parts[0][i] is None else tf.nest.map_structure(
                lambda *p: np.concatenate(p), *[p[i] for p in parts]) for i in (0, 1, 2))
            yield x, y, w


def reference_training(
    model, optimizer, loss, shards_micro_batches, k: int, epochs: int, densify: bool = False
) -> int:
    """Large-batch training by the window definition: Keras's `loss` (a `Loss` object), under its
    own reduction, on each window's concatenated batch, one optimizer step per window. Returns
    the number of updates applied.

    `densify` hands the optimizer dense gradients, as distaccum does for sparse ones: Keras's
    sparse path (lazy moments, squares of per-occurrence pieces for repeated ids) is not a
    function of the gradient alone.
    """
    updates = 0
    for x, y, w in windows(shards_micro_batches, k, epochs):
        with tf.GradientTape() as tape:
            batch_loss = loss(y, model(x, training=True), sample_weight=w)
        gradients = tape.gradient(batch_loss, model.trainable_variables)
        if densify:
            gradients = [tf.convert_to_tensor(g) for g in gradients]
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        updates += 1
    return updates


def flat(variables) -> np.ndarray:
    """Weights (variables or arrays) as one vector."""
    return np.concatenate([np.asarray(v).ravel() for v in variables])


def distance(trained, reference, start: np.ndarray) -> float:
    """How far `trained`'s weights are from `reference`'s, as a share of how far the reference
    moved from `start` (`flat` weights): the error of a training against its oracle."""
    moved = flat(reference) - start
    return float(np.linalg.norm(flat(trained) - flat(reference)) / np.linalg.norm(moved))


def weights_of(model) -> list[np.ndarray]:
    return [v.numpy() for v in model.trainable_variables]


def assert_weights_close(got, expected, rtol: float = 1e-5) -> None:
    """Every weight of `got` (arrays or variables, tensor by tensor) within `rtol` of `expected`,
    relative to the largest |weight| of the model.

    Why not each element relative to itself: two float32 trainings that add the same terms in
    another order (micro-batch sums, another CPU's kernels) differ by a few units of float32's
    round-off of the terms, whose size is that of the model's weights and gradients, not of the
    element, which may end near 0 (measured: a bias that moved to 6e-4 as a sum of residuals of
    size 1 differed by 4e-8 under XLA's kernels). rtol=1e-5 is 168 round-off units of float32
    (2^-24 each), above what any order adds in a test's few updates and far below what a wrong
    sum, divisor or weight makes.
    """
    assert len(got) == len(expected), (len(got), len(expected))
    expected = [np.asarray(b) for b in expected]
    # The weights' scale, not a counter's: an optimizer's `iterations` (an int) in a training
    # state would widen the tolerance by its count.
    scale = max(float(np.max(np.abs(b))) for b in expected if np.issubdtype(b.dtype, np.floating))
    for a, b in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=rtol * scale,
                                   err_msg=getattr(a, "path", ""))


def padded_reviews(count: int, group: int, vocabulary: int, length: int, seed: int = 0):
    """`count` token-id reviews as a text classifier meets them: words 1…V−1 drawn from a Zipf
    distribution (exponent 1.1, as in natural text), each review padded with id 0 to `length`
    (no mask) and batched by length, so groups of `group` reviews (a window's) alternate short
    reviews (mostly padding) and long ones: how far counting each occurrence moves the global norm
    changes from window to window, which Adam does not cancel. The label says whether "positive"
    words outnumber "negative" ones."""
    rng = np.random.default_rng(seed)
    frequency = 1 / np.arange(1, vocabulary) ** 1.1
    tokens = rng.choice(np.arange(1, vocabulary), size=(count, length),
                        p=frequency / frequency.sum())
    short = (np.arange(count) // group) % 2 == 0
    lengths = np.where(short, rng.integers(2, 5, size=count),
                       rng.integers(length - 2, length + 1, size=count))
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    positive, negative = (np.isin(tokens, words).sum(axis=1) for words in ([4, 6, 8, 10],
                                                                          [5, 7, 9, 11]))
    return tokens.astype("int32"), (positive > negative).astype("float32")[:, None]


def text_classifier(vocabulary: int, width: int, length: int, seed: int = 5) -> keras.Model:
    """Embedding, average pooling and one logit: a model whose embedding gradient is sparse."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((length,), dtype="int32"),
                             keras.layers.Embedding(vocabulary, width),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)])
