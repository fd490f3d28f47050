"""Mixed precision: loss scaling across an accumulation window.

Under `mixed_float16` small gradients underflow, so Keras scales the loss (`LossScaleOptimizer`):
gradients come out multiplied by the current scale and the optimizer divides them again. With
accumulation, every micro-step of a window scales by the same factor (the scale only changes at an
update), the float32 sums are unscaled once at the update (for clipping and the finiteness
decision), and the optimizer sees the scaled gradient it expects, skipping and halving its scale
exactly when the reduced gradient is not finite: the same decision on every rank.

A micro-step's float16 values are kept the size of those in Keras's step on the whole window
(`large_batch_divisors`), so that they overflow, and the scale halves, no sooner than Keras's.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from distaccum.accumulate import UNDIVIDED


def with_loss_scaling(model: keras.Model, optimizer):
    """The optimizer, in a `LossScaleOptimizer` when the model computes in float16 (as Keras's
    `compile` does): float16 gradients underflow without loss scaling."""
    if model.dtype_policy.name == "mixed_float16" and not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def unscaled(optimizer):
    """The optimizer a `LossScaleOptimizer` wraps (the one holding the learning rate), or
    `optimizer` itself."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def loss_scale(optimizer):
    """The factor `optimizer.scale_loss` multiplies by (None when it does not scale)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.dynamic_scale
    if optimizer.loss_scale_factor is not None:
        return tf.constant(float(optimizer.loss_scale_factor))
    return None


def large_batch_divisors(terms, batch_size, window_samples) -> list[tf.Tensor]:
    """Each term's divisor in Keras's step on the whole window, estimated from one micro-batch:
    its divisor per sample (the mean sample weight, or elements per sample) times
    `window_samples`, the samples of a full window on every worker; 1 for a loss reduced by
    `sum`, which Keras divides by nothing.

    Why: a micro-step differentiates each sum divided by a float32 factor in float16 and
    multiplies back in float32. Dividing by this estimate makes every float16 value (the
    gradient of each output element, each activation's) about the size of that value in the
    large-batch step, so they overflow no sooner than Keras's would (a ragged window's
    smaller divisor makes Keras's larger than ours). Dividing by the micro-batch's own size
    made them k x num_workers times larger, and updates that Keras applies were skipped (on 9
    of 12 seeds of a 2-layer test model at k=3; on none of 16 since). A micro-batch's weight
    gradients are then its share of the window's, smaller by the same factor.
    """
    count = tf.cast(tf.maximum(batch_size, 1), tf.float32)
    window = tf.cast(window_samples, tf.float32)
    # An all-zero-weight micro-batch adds nothing: any positive factor does.
    return [tf.constant(1.0) if term.normaliser == UNDIVIDED
            else tf.where(term.divisor > 0, term.divisor / count * window, window) for term in terms]


def times(gradient, factor):
    """`gradient` (dense, sparse or None) times a float32 scalar, in float32."""
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(tf.cast(gradient.values, tf.float32) * factor, gradient.indices,
                                gradient.dense_shape)
    return tf.cast(gradient, tf.float32) * factor


def apply(optimizer, gradients, variables, finite, scale) -> tf.Tensor:
    """Apply unscaled `gradients` if `finite`; Keras's apply() adds 1 to optimizer.iterations: one
    per update, not per micro-step. Returns whether it applied."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # It skips a non-finite update itself and halves its scale then, so it must see the
        # same decision: a skipped window reaches it as NaN. It divides by its scale again.
        poison = tf.where(finite, 0.0, float("nan"))
        optimizer.apply([g * tf.cast(scale, g.dtype) + tf.cast(poison, g.dtype)
                         for g in gradients], variables)
        return finite
    if scale is not None:
        gradients = [g * tf.cast(scale, g.dtype) for g in gradients]

    def apply_finite():
        optimizer.apply(gradients, variables)
        return tf.constant(True)

    return tf.cond(finite, apply_finite, lambda: tf.constant(False))
