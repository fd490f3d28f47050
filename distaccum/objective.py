"""The objective: what one update minimises, written as ratios of sums so that it accumulates exactly.

Over the samples of an update window on every worker (Keras's loss on that concatenated batch):

    L =  Σ_i λ_i · Σ w·l_i / Σ w      one data loss per model output i, loss weight λ_i; w are the
                                      sample weights (times class weights, times Keras masks),
                                      per sample or per element (a `[batch, time]` padding mask)
      +  Σ_b a_b · n_b / Σ n_b        losses layers add while called (`add_loss`, activity
                                      regularizers): Keras makes them means over the batch (n_b
                                      samples), so their large-batch value is this sample-weighted
                                      mean; exact for such means and for constants
      +  R(θ)                         weight regularizers (`model.losses` from `kernel_regularizer`
                                      and the like): they depend on no sample, so they count once
                                      per update, never once per micro-step or per worker

Every ratio's numerator and denominator are sums over samples: each micro-step adds them up per
*normaliser* (terms that share a denominator share one gradient sum), the update step sums them
over workers and divides once. R is differentiated once, in the update step.

Owns which loss goes with which output, with which weight and which normaliser, and saying when
the model makes training inexact (BatchNormalization). Does not own the sums (`accumulate`) nor
the steps (`trainer`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import keras
import tensorflow as tf

from distaccum import comm

# Normalisers (denominators) by name; data losses with per-element weights get one per output.
SAMPLES = "samples"  # the sample count: unweighted data losses and layers' added losses
SAMPLE_WEIGHT = "sample_weight"  # Σ w over samples: data losses with per-sample weights


@dataclass(frozen=True)
class OutputLoss:
    """The loss of one model output, with its weight in the total (`loss_weights`)."""

    output: str
    loss: Callable
    weight: float = 1.0


@dataclass(frozen=True)
class Term:
    """One micro-batch's contribution to a ratio of the objective: Σ numerator / Σ divisor."""

    normaliser: str
    numerator: tf.Tensor
    divisor: tf.Tensor


def _resolve_loss(loss, output: str):
    if isinstance(loss, str):
        try:
            return keras.losses.get(loss)
        except ValueError:
            raise ValueError(f"unknown Keras loss for output {output!r}. Received: loss={loss!r}") from None
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a Keras loss, its name or a function. Received: loss={loss!r}")
    return loss


def _per_output(values, names: Sequence[str], what: str) -> list:
    """`values` (one for all, a list in output order, or a dict by output name) as a list."""
    if hasattr(values, "keys"):  # a dict, or the proxy a compiled Keras model keeps it in
        values = dict(values)
    if isinstance(values, Mapping):
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"{what} names outputs the model does not have (it has {list(names)}). "
                             f"Received: {what} keys {unknown}")
        return [values.get(name) for name in names]
    if isinstance(values, (list, tuple)):
        if len(values) != len(names):
            raise ValueError(f"{what} must have one entry per model output ({len(names)}: "
                             f"{list(names)}). Received: {len(values)} entries")
        return list(values)
    return [values] * len(names)


def output_names(model: keras.Model) -> list[str]:
    """The model's output names (one name for a model that declares none)."""
    return list(getattr(model, "output_names", None) or ["output"])


def resolve_losses(model: keras.Model, loss, loss_weights=None) -> list[OutputLoss]:
    """One `OutputLoss` per output that has a loss, as `model.compile(loss=, loss_weights=)` says.

    `loss` is a Keras loss object, a loss name, a function `(y_true, y_pred) -> per-sample values`,
    or a list (output order) or dict (by output name) of those; `None` for an output means it is
    not trained on.
    """
    names = output_names(model)
    if loss is None:
        raise ValueError("give a loss (or compile the model with one). Received: loss=None")
    losses = _per_output(loss, names, "loss")
    weights = _per_output(1.0 if loss_weights is None else loss_weights, names, "loss_weights")
    resolved = []
    for name, output_loss, weight in zip(names, losses, weights):
        output_loss = _resolve_loss(output_loss, name)
        if output_loss is None:
            continue
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"loss_weights must be numbers >= 0. Received: {weight!r} for {name!r}")
        resolved.append(OutputLoss(name, output_loss, float(weight)))
    if not resolved:
        raise ValueError(f"no output has a loss. Received: loss={loss!r}")
    return resolved


def unreduced_loss(loss: Callable, y_true, y_pred) -> tf.Tensor:
    """The loss per sample (`[batch]`) or per element (`[batch, time, ...]`), as float32.

    Keras `Loss` objects are asked for `Loss.call`, their unreduced values, after the same dtype
    conversion `Loss.__call__` does; a function such as `keras.losses.mean_squared_error` already
    returns unreduced values.
    """
    if isinstance(loss, keras.losses.Loss):
        y_true = tf.nest.map_structure(lambda t: tf.cast(t, loss.dtype), y_true)
        y_pred = tf.nest.map_structure(lambda t: tf.cast(t, loss.dtype), y_pred)
        values = loss.call(y_true, y_pred)
    else:
        values = loss(y_true, y_pred)
    values = tf.cast(tf.convert_to_tensor(values), tf.float32)
    if values.shape.rank == 0:
        raise ValueError(
            "the loss returned one number per batch; distaccum needs one per sample. "
            f"Pass a keras.losses.Loss object or an unreduced loss function. Received: loss={loss!r}"
        )
    return values


def _as_loss_rank(weight: tf.Tensor, values: tf.Tensor, output: str) -> tf.Tensor:
    """`weight` with trailing axes dropped (size 1) or added so it broadcasts like the loss."""
    while weight.shape.rank > values.shape.rank and weight.shape[-1] == 1:
        weight = tf.squeeze(weight, -1)
    while weight.shape.rank < values.shape.rank:
        weight = weight[..., tf.newaxis]
    try:
        if weight.shape.rank != values.shape.rank:
            raise ValueError
        tf.broadcast_static_shape(weight.shape, values.shape)
    except ValueError:
        raise ValueError(
            f"sample_weight of shape {weight.shape} does not broadcast to the loss of output "
            f"{output!r}, of shape {values.shape} (give one weight per sample, or one per loss "
            "element)"
        ) from None
    return weight


def data_term(output_loss: OutputLoss, y_true, y_pred, sample_weight, per_output_weights: bool) -> Term:
    """One output's Σ λ·w·l and Σ w over a micro-batch.

    With per-sample weights (or none) a sample's loss is the mean over its elements (time steps,
    pixels), as in Keras's mean over the batch; with per-element weights or a Keras mask, each
    element counts with its own weight and the denominator sums them.
    """
    values = unreduced_loss(output_loss.loss, y_true, y_pred)
    mask = getattr(y_pred, "_keras_mask", None)
    weight = None if sample_weight is None else tf.cast(sample_weight, tf.float32)
    if mask is not None:
        mask = _as_loss_rank(tf.cast(mask, tf.float32), values, output_loss.output)
        weight = mask if weight is None else mask * _as_loss_rank(weight, values, output_loss.output)
    if weight is not None:
        weight = _as_loss_rank(weight, values, output_loss.output)
    per_element = weight is not None and values.shape.rank > 1 and (
        mask is not None or any(size != 1 for size in weight.shape[1:]))
    if per_element:
        weight = tf.broadcast_to(weight, tf.shape(values))
        normaliser = f"element_weight:{output_loss.output}"
    else:
        if values.shape.rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
        if weight is None:
            weight = tf.ones_like(values)
            normaliser = SAMPLES
        else:
            weight = tf.reshape(weight, tf.shape(values))
            normaliser = f"{SAMPLE_WEIGHT}:{output_loss.output}" if per_output_weights else SAMPLE_WEIGHT
    numerator = output_loss.weight * tf.reduce_sum(values * weight)
    return Term(normaliser, numerator, tf.reduce_sum(weight))


def weight_regularizers(model: keras.Model) -> list:
    """The trainable variables that carry a regularizer (`kernel_regularizer=...`)."""
    return [v for v in model.trainable_variables if getattr(v, "regularizer", None) is not None]


def regularization(model: keras.Model) -> tf.Tensor:
    """R(θ): the sum of the weight regularizers, as in one Keras training step."""
    terms = [tf.cast(v.regularizer(v), tf.float32) for v in weight_regularizers(model)]
    return tf.add_n(terms) if terms else tf.constant(0.0)


def added_losses(model: keras.Model) -> list[tf.Tensor]:
    """Losses the last call added (`add_loss`, activity regularizers), without weight regularizers.

    Keras's `model.losses` lists the layers' added losses first and the weight regularizers last
    (recomputed on each access), so the added ones are the leading entries.
    """
    losses = model.losses
    return list(losses[: len(losses) - len(weight_regularizers(model))])


class Objective:
    """Owns the split of one micro-batch's loss into `Term`s, and R(θ).

    Args:
        model: the Keras model (its output names, weight regularizers, added losses).
        losses: one `OutputLoss` per trained output (`resolve_losses`).
    """

    def __init__(self, model: keras.Model, losses: Sequence[OutputLoss]) -> None:
        self.model = model
        self.losses = list(losses)
        self._names = output_names(model)

    def terms(self, y_true, y_pred, sample_weight, batch_size: tf.Tensor) -> list[Term]:
        """The micro-batch's terms, merged by normaliser in a fixed order (call after the forward
        pass, inside the same tape)."""
        y_true = dict(zip(self._names, _per_output(y_true, self._names, "y")))
        y_pred = dict(zip(self._names, _per_output(y_pred, self._names, "model output")))
        per_output = isinstance(sample_weight, (Mapping, list, tuple)) or hasattr(sample_weight, "keys")
        weights = dict(zip(self._names, _per_output(sample_weight, self._names, "sample_weight")))
        terms = [
            data_term(output_loss, y_true[output_loss.output], y_pred[output_loss.output],
                      weights[output_loss.output], per_output)
            for output_loss in self.losses
        ]
        added = added_losses(self.model)
        if added:
            count = tf.cast(batch_size, tf.float32)
            mean = tf.add_n([tf.reduce_sum(tf.cast(a, tf.float32)) for a in added])
            terms.append(Term(SAMPLES, mean * count, count))
        return merge(terms)

    def regularization(self) -> tf.Tensor:
        return regularization(self.model)


def merge(terms: Sequence[Term]) -> list[Term]:
    """Terms with the same normaliser added together (their divisors are the same sum: kept once)."""
    merged: dict[str, Term] = {}
    for term in terms:
        if term.normaliser in merged:
            first = merged[term.normaliser]
            merged[term.normaliser] = Term(term.normaliser, first.numerator + term.numerator,
                                           first.divisor)
        else:
            merged[term.normaliser] = term
    return list(merged.values())


def _layers(model) -> list:
    """Every layer of `model`, nested models' layers included."""
    found = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        found.extend(_layers(layer))
    return found


class InexactWarning(UserWarning):
    """Part of the model makes accumulated training differ from large-batch training."""


def warn_if_inexact(model: keras.Model) -> None:
    """Say which layers keep training from being large-batch training sample for sample.

    BatchNormalization in training normalises each micro-batch with that micro-batch's
    statistics: no accumulation can reproduce statistics over the global batch. Random layers
    (Dropout, noise, augmentation: any layer drawing from a `SeedGenerator`) draw per micro-batch,
    so which sample gets which mask follows the split into workers and micro-batches: the same
    in distribution, but a run resumed on another split is not the one it continues bit for bit.
    """
    if not comm.is_chief():
        return
    names = [layer.name for layer in _layers(model)
             if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if names:
        warnings.warn(InexactWarning(
            f"distaccum: BatchNormalization layers ({', '.join(names)}) normalise each "
            "micro-batch by its own statistics, not the global batch's: training is not exactly "
            "large-batch training. LayerNormalization or GroupNormalization (per sample) are "
            "exact; so is BatchNormalization with trainable=False"), stacklevel=3)
    random = [layer.name for layer in model._flatten_layers(include_self=False)
              if getattr(layer, "_seed_generators", None) and getattr(layer, "rate", 1) != 0]
    if random:
        warnings.warn(InexactWarning(
            f"distaccum: random layers ({', '.join(random)}) draw their masks or noise per "
            "micro-batch, so which sample gets which follows the split into workers and "
            "micro-batches: training is large-batch training in distribution, not sample for "
            "sample, and a run resumed on another num_workers or micro_batch_size differs from "
            "the uninterrupted one by more than round-off"), stacklevel=3)
