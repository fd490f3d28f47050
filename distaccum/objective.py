"""The objective: what one update minimises, written as ratios of sums so that it accumulates exactly.

Over the samples of an update window on every worker, the loss is Keras's on that concatenated
batch, each output's under its own loss's `reduction`:

    L =  Σ_i λ_i · Σ w·l_i / D_i     one data loss per model output i, loss weight λ_i; w are the
                                     sample weights (class weights included) times Keras's mask,
                                     l_i the unreduced loss, D_i what its reduction divides by:
           sum_over_batch_size, mean   the count of loss elements in the window (with a Keras
                                       mask: its valid elements, as `apply_mask` rescales them)
           mean_with_sample_weight     Σ w as given (`[batch, 1]` weights on a `[batch, time]`
                                       loss sum over the batch only); the count when unweighted
           sum                         1: nothing
      +  Σ_b a_b · n_b / Σ n_b       losses layers add while called (`add_loss`, activity
                                     regularizers): Keras makes them means over the batch (n_b
                                     samples), so their large-batch value is this sample-weighted
                                     mean; exact for such means and for constants
      +  R(θ)                        weight regularizers (`model.losses` from `kernel_regularizer`
                                     and the like): they depend on no sample, so they count once
                                     per update, never once per micro-step or per worker

Every ratio's numerator and denominator are sums over samples: each micro-step adds them up per
*normaliser* (terms that share a denominator share one gradient sum, and each gradient sum is a
full copy of the weights), the update step sums them over workers and divides once. R is
differentiated once, in the update step. Where micro-batches differ in shape (sequences padded to
other lengths), no concatenated batch exists: the count of loss elements is then the window's.

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
from keras.src.losses.loss import squeeze_or_expand_to_same_rank  # Keras's own shape rule
from keras.src.trainers.compile_utils import get_loss  # Keras's own loss resolution (compile's)

from distaccum import comm
from distaccum.accumulate import UNDIVIDED

# Normalisers (denominators) by name; the others are one per output (`data_term`).
SAMPLES = "samples"  # the sample count: unreduced losses of a fixed size per sample, added losses
SAMPLE_WEIGHT = "sample_weight"  # Σ w as given: mean_with_sample_weight, one weight for all outputs
MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")
REDUCTIONS = (*MEAN_REDUCTIONS, "mean_with_sample_weight", "sum")
# Keras chooses among its cross-entropies by the labels' shape, so these resolve per call.
_RESOLVED_BY_LABELS = ("crossentropy", "ce")


@dataclass(frozen=True)
class OutputLoss:
    """The loss of one model output, with its weight in the total (`loss_weights`)."""

    output: str
    loss: Callable
    weight: float = 1.0


@dataclass(frozen=True)
class Term:
    """One micro-batch's contribution to a ratio of the objective: Σ numerator / Σ divisor
    (divided by nothing under the `UNDIVIDED` normaliser)."""

    normaliser: str
    numerator: tf.Tensor
    divisor: tf.Tensor


def _resolve_loss(loss, output: str):
    """The Keras `Loss` `compile` makes of `loss` (a function gets Keras's default reduction),
    or the name itself for the cross-entropy Keras picks by the labels."""
    if loss is None:
        return None
    if isinstance(loss, str) and loss.lower() in _RESOLVED_BY_LABELS:
        return loss
    if not isinstance(loss, str) and not callable(loss):
        raise TypeError(f"loss must be a Keras loss, its name or a function. Received: loss={loss!r}")
    try:
        resolved = get_loss(loss, None, None)
    except ValueError:
        raise ValueError(f"unknown Keras loss for output {output!r}. Received: loss={loss!r}") from None
    if resolved.reduction not in REDUCTIONS:
        raise ValueError(
            f"loss {resolved.name!r} for output {output!r} has reduction={resolved.reduction!r}, "
            "which leaves nothing to minimise: pass the unreduced function (Keras's default "
            f"reduction) or a reduction among {', '.join(REDUCTIONS)}. "
            f"Received: reduction={resolved.reduction!r}")
    return resolved


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

    `loss` is a Keras loss object (its `reduction` is kept), a loss name, a function `(y_true,
    y_pred) -> unreduced values` (with Keras's default reduction, as `compile` wraps it), or a list (output order) or dict (by output name) of those; `None` for an output means it is
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


def unreduced_loss(loss: keras.losses.Loss, y_true, y_pred
                   ) -> tuple[tf.Tensor, tf.Tensor | None]:
    """The loss per sample (`[batch]`) or per element (`[batch, time, ...]`) as float32, and the
    Keras mask that applies to it (the prediction's and the loss's own, as `Loss.__call__` merges
    them), or None.

    The `Loss` is asked for `Loss.call`, its unreduced values, after the same dtype conversion
    `Loss.__call__` does.
    """
    in_mask = getattr(y_pred, "_keras_mask", None)
    y_true = tf.nest.map_structure(lambda t: tf.cast(t, loss.dtype), y_true)
    y_pred = tf.nest.map_structure(lambda t: tf.cast(t, loss.dtype), y_pred)
    values = loss.call(y_true, y_pred)
    out_mask = getattr(values, "_keras_mask", None)
    masks = [m for m in (in_mask, out_mask) if m is not None]
    mask = None if not masks else masks[0] if len(masks) == 1 else masks[0] & masks[1]
    values = tf.cast(tf.convert_to_tensor(values), tf.float32)
    if values.shape.rank == 0:
        raise ValueError(
            "the loss returned one number per batch; distaccum needs one per sample. "
            f"Pass a keras.losses.Loss object or an unreduced loss function. Received: loss={loss!r}"
        )
    return values, mask


def _as_loss_rank(weight: tf.Tensor, values: tf.Tensor, output: str) -> tf.Tensor:
    """`weight` as Keras's rule left it, with trailing axes dropped (size 1) or added where
    Keras's rule stops (a `[batch]` weight on a `[batch, time]` loss weighs as `[batch, 1]`), so
    it broadcasts like the loss; one error naming both shapes where it cannot."""
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


def _merged(weight, other, output: str):
    """`weight` times `other` (a mask, or the loss values) after Keras's rank rule: what
    `reduce_weighted_values` multiplies. Returns (the product's weight, the other as shaped)."""
    other, weight = squeeze_or_expand_to_same_rank(other, weight)
    return _as_loss_rank(weight, other, output), other


def data_term(output_loss: OutputLoss, y_true, y_pred, sample_weight, shared_weights: bool,
              ragged: set) -> Term:
    """One output's λ·Σ w·l over a micro-batch and the sum its reduction divides by (module
    docstring), merging mask and weights as Keras's `reduce_weighted_values` does.

    `shared_weights`: one sample weight for every output (their Σ w is then one normaliser).
    `ragged`: outputs whose loss has been traced without a fixed size per sample (added to here);
    their element count is a normaliser of its own, the others' is the sample count times it.
    """
    loss = get_loss(output_loss.loss, y_true, y_pred)
    values, mask = unreduced_loss(loss, y_true, y_pred)
    name = output_loss.output
    weight = None if sample_weight is None else tf.cast(sample_weight, tf.float32)
    if mask is not None:
        mask = tf.cast(mask, tf.float32)
        if weight is None:
            weight = mask
        else:
            weight, mask = _merged(weight, mask, name)
            weight = weight * mask
    if weight is not None:
        weight, values = _merged(weight, values, name)
        values = values * weight
    numerator = output_loss.weight * tf.reduce_sum(values)
    if loss.reduction == "sum":
        return Term(UNDIVIDED, numerator, tf.zeros([]))
    if loss.reduction in MEAN_REDUCTIONS and mask is not None:
        # apply_mask: valid elements weigh (mask size / valid) and the mean divides by the loss
        # size, over the window's batch: Σ w·l · (mask size / loss size) / Σ valid.
        ratio = tf.cast(tf.size(mask), tf.float32) / tf.cast(tf.size(values), tf.float32)
        return Term(f"mask:{name}", numerator * ratio, tf.reduce_sum(mask))
    if loss.reduction == "mean_with_sample_weight" and weight is not None:
        normaliser = SAMPLE_WEIGHT if shared_weights and mask is None else f"{SAMPLE_WEIGHT}:{name}"
        return Term(normaliser, numerator, tf.reduce_sum(weight))
    per_sample = values.shape[1:]
    if per_sample.is_fully_defined() and name not in ragged:
        return Term(SAMPLES, numerator / per_sample.num_elements(),
                    tf.cast(tf.shape(values)[0], tf.float32))
    ragged.add(name)
    return Term(f"elements:{name}", numerator, tf.cast(tf.size(values), tf.float32))


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
        # Outputs traced with a loss of no fixed size per sample: they keep their own element
        # count in every later trace (a stand-in of known shapes must not change the sums).
        self._ragged: set[str] = set()

    def terms(self, y_true, y_pred, sample_weight, batch_size: tf.Tensor) -> list[Term]:
        """The micro-batch's terms, merged by normaliser in a fixed order (call after the forward
        pass, inside the same tape)."""
        y_true = dict(zip(self._names, _per_output(y_true, self._names, "y")))
        y_pred = dict(zip(self._names, _per_output(y_pred, self._names, "model output")))
        per_output = isinstance(sample_weight, (Mapping, list, tuple)) or hasattr(sample_weight, "keys")
        weights = dict(zip(self._names, _per_output(sample_weight, self._names, "sample_weight")))
        terms = [
            data_term(output_loss, y_true[output_loss.output], y_pred[output_loss.output],
                      weights[output_loss.output], not per_output, self._ragged)
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
