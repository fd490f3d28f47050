"""The accumulation math, with no communication in it.

The gradient applied at an update is that of the sample-weighted mean loss over every sample of
the window on every worker:

    L = sum_i(w_i * l_i) / sum_i(w_i)      =>      dL/dθ = sum_i(w_i * dl_i/dθ) / sum_i(w_i)

So each micro-step adds the gradient of the *unnormalised* sum `sum(w * l)` and the weight sum
`sum(w)`; after those sums are added up over workers, one division gives the exact gradient. A mean
of micro-batch means would over-weight small (ragged) micro-batches; a plain sum would scale the
step with k and with the number of workers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import tensorflow as tf


def per_sample_loss(loss: Callable, y_true, y_pred) -> tf.Tensor:
    """One loss value per sample, shape `[batch]`, whatever the loss object's reduction is.

    Keras `Loss` objects are asked for `Loss.call`, their unreduced values, after the same dtype
    conversion `Loss.__call__` does; a plain function such as `keras.losses.mean_squared_error`
    already returns unreduced values. Values with extra axes (per time step, per pixel) are
    averaged over those axes, as Keras does for a sample's share of the mean.
    """
    if isinstance(loss, keras.losses.Loss):
        y_true = tf.nest.map_structure(lambda t: tf.cast(t, loss.dtype), y_true)
        y_pred = tf.nest.map_structure(lambda t: tf.cast(t, loss.dtype), y_pred)
        values = loss.call(y_true, y_pred)
    else:
        values = loss(y_true, y_pred)
    values = tf.convert_to_tensor(values)
    if values.shape.rank == 0:
        raise ValueError(
            "the loss returned one number per batch; distaccum needs one per sample. "
            f"Pass a keras.losses.Loss object or an unreduced loss function. Received: loss={loss!r}"
        )
    if values.shape.rank > 1:
        values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    return values


def as_sample_weights(sample_weight, num_samples: tf.Tensor, dtype) -> tf.Tensor:
    """Sample weights as a `[batch]` vector; ones when the batch has none."""
    if sample_weight is None:
        return tf.ones([num_samples], dtype=dtype)
    return tf.reshape(tf.cast(sample_weight, dtype), [-1])


def mean_gradients(gradient_sums: Sequence[tf.Tensor], weight_sum: tf.Tensor) -> list[tf.Tensor]:
    """Divide summed gradients by the summed weight: the one division per update.

    A window whose weights sum to zero (all sample weights zero) gives zero gradients, not NaN.
    """
    return [tf.math.divide_no_nan(g, tf.cast(weight_sum, g.dtype)) for g in gradient_sums]


class GradientAccumulator:
    """Owns one worker's running sums over the current window.

    Holds, as non-trainable `tf.Variable`s: one gradient sum per trainable variable and three
    window statistics: the weighted loss sum, the weight sum and the sample count. Does not communicate, normalise or apply anything: the trainer
    reduces `totals()` across workers and calls `mean_gradients`.

    Sparse gradients (`tf.IndexedSlices`, e.g. from `keras.layers.Embedding`) are scattered into a
    dense sum (`scatter_add`, which costs only the rows touched); the sum is reduced and applied
    dense, once per update, so the k-fold traffic saving holds for them too. The optimizer thus
    sees the exact dense gradient of the window loss. (Keras's own sparse path differs for
    stateful optimizers: it updates moments of touched rows only and, for ids repeated in a batch,
    squares each occurrence's piece separately, so it is not a function of the gradient alone.)
    A variable that gets no gradient (not used by the loss) keeps a zero sum.
    """

    def __init__(self, variables: Sequence) -> None:
        if not variables:
            raise ValueError("the model has no trainable variables: there is nothing to train")
        self._gradient_sums = [
            tf.Variable(tf.zeros(v.shape, dtype=v.dtype), trainable=False, name="gradient_sum")
            for v in variables
        ]
        # Float32 scalars, so they join the gradients' grouped allreduce.
        self._statistics = [
            tf.Variable(0.0, trainable=False, dtype=tf.float32, name=name)
            for name in ("loss_sum", "weight_sum", "sample_count")
        ]

    def add(
        self, gradients: Sequence, loss_sum: tf.Tensor, weight_sum: tf.Tensor, sample_count
    ) -> None:
        """Add one micro-batch's gradient of `sum(w * l)`, `sum(w * l)`, `sum(w)` and size."""
        for total, gradient in zip(self._gradient_sums, gradients):
            if gradient is None:
                continue
            if isinstance(gradient, tf.IndexedSlices):
                total.scatter_add(gradient)
            else:
                total.assign_add(gradient)
        for total, value in zip(self._statistics, (loss_sum, weight_sum, sample_count)):
            total.assign_add(tf.cast(value, tf.float32))

    def totals(self) -> list[tf.Tensor]:
        """Current values: the gradient sums, then loss sum, weight sum and sample count."""
        return [t.read_value() for t in self._gradient_sums + self._statistics]

    @staticmethod
    def split(totals: Sequence[tf.Tensor]) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        """`totals()` (or their reduction) as (gradient sums, [loss sum, weight sum, count])."""
        return list(totals[:-3]), list(totals[-3:])

    def reset(self) -> None:
        """Start a new window."""
        for total in self._gradient_sums + self._statistics:
            total.assign(tf.zeros_like(total))
