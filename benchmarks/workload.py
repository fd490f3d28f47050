"""The measured workload, shared by the benchmark workers: threads, data, models and baselines.

Imports TensorFlow, so only the measured processes (`workers.py`) use it.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import distaccum
from distaccum import catalog, comm

from common import MICRO_BATCH_SIZE

IMAGE_SHAPE = (64, 64, 3)


def configure_threads() -> None:
    """One intra-op and one inter-op thread per process, before TensorFlow runs any op.

    Two workers on a 2-core machine then use one core each instead of fighting over both, and the
    single-process figures compare like with like.
    """
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def classification_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_optimizer() -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)


def synthetic_model(seed: int = 0) -> keras.Model:
    """The bundled ≈2.1 M-parameter MLP: 8.4 MB of gradients, enough for traffic to matter."""
    return catalog.build_model("synthetic_mlp", catalog.SYNTHETIC_FEATURES, seed)


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with tf.data's autotuning off.

    These pipelines have nothing to tune, and with it on, deleting an iterator (what `fit` does
    when it returns) sometimes waits out the tuner's current period, which grows with the
    iterator's age: 0.05 s after a 0.1 s run, 19 s after a 22 s one. The benchmarks time many
    short `fit`s, so that would be counted against them, while a hand-written loop's one
    long-lived iterator never pays it.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def synthetic_micro_batches(micro_batch_size: int = MICRO_BATCH_SIZE) -> tf.data.Dataset:
    """This worker's share of the synthetic training set as micro-batches, repeating forever.

    Only full micro-batches, so the samples of a run are exactly workers × micro-batch × steps.
    """
    split = catalog.load_dataset("synthetic")
    samples = distaccum.shard(tf.data.Dataset.from_tensor_slices((split.x_train, split.y_train)))
    micro_batches = samples.batch(micro_batch_size, drop_remainder=True).repeat().prefetch(2)
    return without_autotune(micro_batches)


def first_micro_batch(micro_batch_size: int = MICRO_BATCH_SIZE) -> tuple[tf.Tensor, tf.Tensor]:
    """One fixed synthetic micro-batch, for single-process timings that must exclude input."""
    split = catalog.load_dataset("synthetic")
    x, y = split.x_train[:micro_batch_size], split.y_train[:micro_batch_size]
    return tf.constant(x), tf.constant(y)


def synthetic_trainer(accumulation_steps: int, *, communicate: bool = True,
                      allreduce_dtype: str = "float32", precision: str = "float32"
                      ) -> distaccum.Trainer:
    """A distaccum Trainer on a fresh synthetic model.

    Args:
        accumulation_steps: k.
        communicate: False gives the compute limit, baseline (b): distaccum's own micro-step and
            update step with the single-process (identity) backend, so the run differs from the
            real one by the allreduce alone.
        allreduce_dtype: the type gradient sums travel in.
        precision: the Keras dtype policy the model is built under.
    """
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = synthetic_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    trainer = distaccum.Trainer(model, make_optimizer(), loss=classification_loss(),
                                accumulation_steps=accumulation_steps,
                                allreduce_dtype=allreduce_dtype)
    if not communicate:
        trainer.backend = comm.SingleProcessBackend()
    return trainer


def conv_model(layers: int, filters: int) -> keras.Model:
    """An activation-heavy model: every 3×3 convolution keeps a full 64×64×filters map per
    sample for the backward pass, while the weights stay tiny."""
    keras.utils.set_random_seed(0)
    convolutions = [
        keras.layers.Conv2D(filters, 3, padding="same", activation="relu") for _ in range(layers)
    ]
    return keras.Sequential([
        keras.Input(IMAGE_SHAPE), *convolutions,
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(catalog.NUM_CLASSES),
    ])


def random_images(batch_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Images and class ids for the conv model; memory, not learning, is measured with them."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch_size, *IMAGE_SHAPE)).astype("float32")
    labels = rng.integers(0, catalog.NUM_CLASSES, size=batch_size).astype("int32")
    return tf.constant(images), tf.constant(labels)


class AllreduceEveryMicroBatch:
    """Baseline (a): the usual hand-written accumulation loop on Horovod.

    The blog recipe: a GradientTape per micro-batch, the gradients averaged over workers right
    away (`hvd.grouped_allreduce`, one collective for all tensors), summed in `tf.Variable`s, and
    their mean over the k micro-batches applied every k. Both steps are `tf.function`s. It moves
    k times the bytes distaccum moves per update: what distaccum's k-fold cut is measured against.

    Args:
        model, optimizer, loss: as for a Keras training step (a mean-reduced `loss`).
        hvd: the initialised `horovod.tensorflow` module.
    """

    def __init__(self, model: keras.Model, optimizer, loss, hvd) -> None:
        self._model = model
        self._optimizer = optimizer
        self._loss = loss
        self._hvd = hvd
        self._variables = model.trainable_variables
        optimizer.build(self._variables)
        self._sums = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False)
                      for v in self._variables]
        self._micro_step = tf.function(self._micro_step_body)
        self._apply = tf.function(self._apply_body)

    def run(self, iterator, accumulation_steps: int, updates: int) -> None:
        """`updates` windows of `accumulation_steps` micro-batches taken from `iterator`."""
        for _ in range(updates):
            for _ in range(accumulation_steps):
                self._micro_step(*next(iterator))
            self._apply(tf.constant(float(accumulation_steps)))

    def _micro_step_body(self, x, y):
        with tf.GradientTape() as tape:
            loss = self._loss(y, self._model(x, training=True))
        gradients = tape.gradient(loss, self._variables)
        averaged = self._hvd.grouped_allreduce(gradients, op=self._hvd.Average)
        for total, gradient in zip(self._sums, averaged):
            total.assign_add(gradient)

    def _apply_body(self, accumulation_steps):
        self._optimizer.apply([total / accumulation_steps for total in self._sums], self._variables)
        for total in self._sums:
            total.assign(tf.zeros_like(total))
