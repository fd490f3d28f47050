"""Which part of a training step refuses a micro-batch: the model, the loss or a metric.

A step is one compiled call, so its error names an op deep inside it (`data.shape = [32] does not
start with segment_ids.shape = [320]`), not what the user wrote. Run again eagerly, one part at a
time, the refusing part is known, and the innermost Keras object on the error's traceback (a
layer, a loss, a metric) names it. Nothing changes: the forward pass runs in inference mode and the
metrics update under a `keras.StatelessScope`. It runs only after a step has failed.

`raise_if_bad` turns the bad micro-batches workers reported in an update into one error on every
worker: `BadMicroBatch`, or `ModelDataMismatch` when every worker failed on its first.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf
from keras.src.losses.losses import LossFunctionWrapper  # how Keras wraps a loss function

from distaccum.errors import BadMicroBatch, ModelDataMismatch, one_line
from distaccum.history import UpdateRecord

# Why a failure is the model's and not one micro-batch's, as `mismatch` says it.
FIRST_MICRO_BATCH = "Every rank failed on its first micro-batch"
DATA_SHAPES = "The training step cannot be built for the data's shapes"


@dataclass(frozen=True)
class Refusal:
    """What refused a micro-batch (`the metric 'auc' (AUC)`), the shapes it was given, and its
    error; `str()` is the one line: `... fails on y (32,) and model output (32, 10): ...`."""

    part: str
    shapes: str
    error: BaseException

    def __str__(self) -> str:
        return f"{self.part} fails on {self.shapes}: {_error(self.error)}"


def refusing_part(model: keras.Model, objective, metrics, x, y, sample_weight) -> Refusal | None:
    """What refuses the micro-batch `(x, y, sample_weight)`, or None when the forward pass, the
    loss and the metrics all take it (the failure was elsewhere: the backward pass, say)."""
    filtering = keras.config.is_traceback_filtering_enabled()
    keras.config.disable_traceback_filtering()  # Keras's filter drops the frames that name it
    try:
        try:
            y_pred = model(x, training=False)
        except Exception as error:  # noqa: BLE001 (what the step raised, whatever its type)
            return Refusal(_layer(error, model), f"input {_shapes(x)}", error)
        shapes = f"y {_shapes(y)} and model output {_shapes(y_pred)}"
        try:
            objective.terms(y, y_pred, sample_weight, tf.shape(tf.nest.flatten(x)[0])[0])
        except Exception as error:  # noqa: BLE001
            return Refusal(_loss(error, objective), shapes, error)
        if metrics is not None:
            try:
                with keras.StatelessScope():
                    metrics.update(y, y_pred, sample_weight)
            except Exception as error:  # noqa: BLE001
                return Refusal(_named(error, keras.metrics.Metric, "metric"), shapes, error)
        return None
    finally:
        if filtering:
            keras.config.enable_traceback_filtering()


def mismatch(refusal: Refusal | None, error: BaseException, why: str, *,
             traced: bool = False) -> ModelDataMismatch:
    """The error for a model, loss or metrics that cannot take the data: what refuses it, then
    `why` that is so for any batch. `traced`: `error` was raised while the step was built from
    the data's spec, so it, not the refusal found on a stand-in micro-batch, says the shapes."""
    if refusal is None:
        what = f"the training step fails: {_error(error)}"
    else:
        what = f"{refusal.part} fails: {_error(error)}" if traced else str(refusal)
    return ModelDataMismatch(f"{what.rstrip('.')}. {why}, so the model, loss or metrics do not fit "
                             "the data's shapes or label format; nothing was trained")


def raise_if_bad(record: UpdateRecord, own, origin: str = "", part: Refusal | None = None,
                 first_of_run: bool = False) -> None:
    """`BadMicroBatch` on every worker when any reported one in this update (none applied it);
    `own` is this worker's (micro-batch, error), if it was one of them, `origin` where that
    micro-batch was read from (a record file, say), if known, `part` what in the step refused it
    (`refusing_part`), and `first_of_run` whether it was the first this run trained.
    `ModelDataMismatch` instead when every worker failed on that first micro-batch: then the
    model, loss or metrics do not fit the data, whatever the batch."""
    reports = [int(n) for n in record.result.bad_micro_batches.numpy()]
    if not any(reports):
        return
    if first_of_run and own and all(n == own[0] for n in reports):
        raise mismatch(part, own[1], FIRST_MICRO_BATCH)
    where = ", ".join(f"rank {rank}: micro-batch {n} of epoch {record.epoch}"
                      for rank, n in enumerate(reports) if n)
    why = (f" (here: {part})" if part else
           f" (here: {type(own[1]).__name__}: {one_line(own[1])})" if own else "")
    why += f"; it holds {origin}" if own and origin else ""
    raise BadMicroBatch(f"{where} (counted from 1) cannot be trained on; every rank stopped at "
                        f"update step {record.update_step} without applying it{why}")


def _innermost(error: BaseException, kind: type):
    """The innermost object of `kind` whose method is on `error`'s traceback, or None."""
    found, frame = None, error.__traceback__
    while frame is not None:
        candidate = frame.tb_frame.f_locals.get("self")
        if isinstance(candidate, kind) and not type(candidate).__module__.startswith(
                "keras.src.trainers"):  # Keras's containers of the compiled losses and metrics
            found = candidate
        frame = frame.tb_next
    return found


def _named(error: BaseException, kind: type, role: str) -> str:
    """`the metric 'auc' (AUC)`, or `the metrics` when no single one is on the traceback."""
    return _name(_innermost(error, kind), role)


def _name(found, role: str) -> str:
    return f"the {role}s" if found is None else f"the {role} {found.name!r} ({type(found).__name__})"


def _loss(error: BaseException, objective) -> str:
    """`the loss 'focal' (FocalLoss)`; a loss given as a function (a name resolves to one) by
    its name alone (Keras wraps it in its `LossFunctionWrapper`); a loss not on the traceback as
    an object: the objective's losses by name."""
    found = _innermost(error, keras.losses.Loss)
    if type(found) is LossFunctionWrapper:
        return f"the loss {found.name!r}"
    if found is not None:
        return _name(found, "loss")
    names = [getattr(o.loss, "name", None) or getattr(o.loss, "__name__", repr(o.loss))
             for o in objective.losses]
    return f"the loss {', '.join(map(repr, names))}"


def _layer(error: BaseException, model: keras.Model) -> str:
    found = _innermost(error, keras.layers.Layer)
    if found is None or found is model:
        return "the model"
    return f"the model's layer {found.name!r} ({type(found).__name__})"


def _shapes(structure) -> str:
    shapes = tf.nest.map_structure(lambda t: tuple(t.shape), structure)
    return str(shapes)


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {one_line(error)}"
