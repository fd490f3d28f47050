"""The Trainer: what one micro-step and one update step are.

Public entry point:

    distaccum.init()
    trainer = distaccum.Trainer(model, optimizer, loss=loss, accumulation_steps=4)
    history = trainer.fit(dataset, epochs=2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import keras
import tensorflow as tf

from distaccum import comm, data
from distaccum.controller import CadenceOptions, Controller
from distaccum.accumulate import (
    GradientAccumulator,
    as_sample_weights,
    mean_gradients,
    per_sample_loss,
)


@dataclass(frozen=True)
class UpdateResult:
    """What one update step reports, summed over all workers (tensors: reading them syncs).

    Attributes:
        loss_sum: sum of weight × per-sample loss over the window's samples on all workers.
        weight_sum: sum of sample weights over the same samples.
        sample_count: number of those samples.
        gradient_norm: global norm of the reduced gradient, before clipping.
        skipped: true when the reduced gradient was not finite on some worker's window, so no
            worker applied it (the decision is taken on reduced values: the same on every rank).
        stop_votes: how many workers asked to stop after this update (e.g. on SIGTERM).
    """

    loss_sum: tf.Tensor
    weight_sum: tf.Tensor
    sample_count: tf.Tensor
    gradient_norm: tf.Tensor
    skipped: tf.Tensor
    stop_votes: tf.Tensor

    @property
    def loss(self) -> float:
        """The window's sample-weighted mean loss over all workers."""
        return float(self.loss_sum / self.weight_sum) if float(self.weight_sum) else 0.0


def _check_accumulation_steps(accumulation_steps) -> int:
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int):
        raise TypeError(
            f"accumulation_steps must be an int. Received: accumulation_steps={accumulation_steps!r}"
        )
    if accumulation_steps < 1:
        raise ValueError(
            f"accumulation_steps must be >= 1. Received: accumulation_steps={accumulation_steps}"
        )
    return accumulation_steps


def _check_optimizer(optimizer) -> None:
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"optimizer must be a keras.optimizers.Optimizer. Received: {optimizer!r}")
    if optimizer.gradient_accumulation_steps:
        raise ValueError(
            "build the optimizer without gradient_accumulation_steps: distaccum accumulates "
            "(exactly, and with one allreduce per update) and Keras's own accumulation would "
            "average micro-batch means and count micro-steps. Received: "
            f"gradient_accumulation_steps={optimizer.gradient_accumulation_steps}"
        )


class Trainer:
    """Owns the micro-step and the update step of data-parallel training with accumulation.

    A micro-step runs forward and backward on one micro-batch and adds to this worker's sums; it
    never communicates. An update step reduces the sums over workers in one grouped allreduce,
    divides once by the total sample weight, optionally clips by global norm, and applies. So
    `optimizer.iterations` counts updates and LR schedules see large-batch steps.

    Does not own the loop (epochs, windows, when to log or stop): that is the `Controller`, which
    `fit` uses.

    Args:
        model: a Keras 3 model.
        optimizer: a Keras 3 optimizer, built without `gradient_accumulation_steps`.
        loss: a `keras.losses.Loss` or an unreduced loss function `(y_true, y_pred) -> [batch]`.
        accumulation_steps: micro-batches per worker per update (k).
        clip_global_norm: if set, clip the reduced, normalised gradient to this global norm.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        *,
        loss: Callable,
        accumulation_steps: int = 1,
        clip_global_norm: float | None = None,
    ) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model. Received: model={model!r}")
        _check_optimizer(optimizer)
        if not callable(loss):
            raise TypeError(f"loss must be a Keras loss or a function. Received: loss={loss!r}")
        if clip_global_norm is not None and not clip_global_norm > 0:
            raise ValueError(f"clip_global_norm must be > 0. Received: {clip_global_norm!r}")
        self.model = model
        self.optimizer = optimizer
        self.loss = loss
        self.accumulation_steps = _check_accumulation_steps(accumulation_steps)
        self.clip_global_norm = clip_global_norm
        self.backend = comm.current()
        self._accumulator: GradientAccumulator | None = None
        self._micro_step = tf.function(self._micro_step_body)
        self._update_step = tf.function(self._update_step_body)
        self._evaluation_step = tf.function(self._evaluation_step_body)

    @property
    def micro_step_traces(self) -> int:
        """How often the micro-step was traced (one per input signature)."""
        return self._micro_step.experimental_get_tracing_count()

    @property
    def update_step_traces(self) -> int:
        """How often the update step was traced (once)."""
        return self._update_step.experimental_get_tracing_count()

    @property
    def allreduce_per_update(self) -> tuple[int, int]:
        """(tensors, bytes) one update step allreduces: the gradient sums, three statistics and
        the stop vote, all float32-sized.

        (0, 0) with one worker, where the single-process backend communicates nothing.
        """
        if self._accumulator is None or self.backend.num_workers() == 1:
            return 0, 0
        totals = self._accumulator.totals()
        stop_vote_bytes = 4
        return len(totals) + 1, sum(int(tf.size(t)) * t.dtype.size for t in totals) + stop_vote_bytes

    def learning_rate_at(self, update_step: int) -> float:
        """The learning rate the optimizer used for update `update_step` (1-based)."""
        rate = self.optimizer._learning_rate  # the schedule itself, not its current value
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            return float(rate(update_step - 1))
        return float(keras.ops.convert_to_numpy(rate))

    def prepare(self, element_spec) -> None:
        """Build model and optimizer, then make every worker start from rank 0's state. Once."""
        if self._accumulator is not None:
            return
        if not self.model.built:
            self.model.build(tf.nest.map_structure(lambda s: s.shape, element_spec[0]))
        data.check_inputs_match_model(element_spec, self.model)
        variables = self.model.trainable_variables
        self._accumulator = GradientAccumulator(variables)
        self.optimizer.build(variables)
        self.broadcast_from_chief()

    @property
    def state_variables(self) -> list:
        """Everything training changes: model variables (weights, layers' RNG states, statistics)
        and optimizer variables (`iterations`, moments). What workers share and checkpoints hold."""
        return list(self.model.variables) + list(self.optimizer.variables)

    def broadcast_from_chief(self) -> None:
        """Overwrite model and optimizer state with rank 0's."""
        state = self.state_variables
        with comm.collective("the start-up broadcast"):
            values = self.backend.broadcast_from_chief([v.value for v in state])
        for variable, value in zip(state, values):
            variable.assign(value)

    def micro_step(self, x, y, sample_weight=None) -> None:
        """Forward, backward and accumulate one micro-batch on this worker. No communication."""
        self._micro_step(x, y, sample_weight)

    def update_step(self, stop_vote: bool = False) -> UpdateResult:
        """Reduce the window over workers, normalise, clip, apply; every worker calls it.

        Args:
            stop_vote: this worker wants training to stop after this update. The vote travels
                in the same grouped allreduce, so all workers learn of it at the same update.
        """
        with comm.collective("the update step's allreduce"):
            return UpdateResult(*self._update_step(tf.constant(float(stop_vote))))

    def _micro_step_body(self, x, y, sample_weight):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=True)
            losses = per_sample_loss(self.loss, y, y_pred)
            weights = as_sample_weights(sample_weight, tf.shape(losses)[0], losses.dtype)
            # The unnormalised sum: dividing here would make this a mean of micro-batch means.
            loss_sum = tf.reduce_sum(losses * weights)
        gradients = tape.gradient(loss_sum, variables)
        self._accumulator.add(gradients, loss_sum, tf.reduce_sum(weights), tf.size(losses))

    def _update_step_body(self, stop_vote):
        # The only sync point of a window: gradient, loss and weight sums (and the stop vote)
        # in one grouped allreduce.
        totals = self.backend.sum_all(self._accumulator.totals() + [stop_vote])
        totals, stop_votes = totals[:-1], totals[-1]
        gradient_sums, (loss_sum, weight_sum, sample_count) = GradientAccumulator.split(totals)
        gradients = mean_gradients(gradient_sums, weight_sum)
        gradient_norm = tf.linalg.global_norm(gradients)
        # Decided on reduced values, hence identically on every worker: no extra collective.
        finite = tf.math.is_finite(gradient_norm) & tf.math.is_finite(loss_sum)
        skipped = tf.logical_not(finite)
        if self.clip_global_norm is not None:
            gradients, _ = tf.clip_by_global_norm(
                gradients, self.clip_global_norm, use_norm=gradient_norm
            )

        def apply():
            # Keras's apply() adds 1 to optimizer.iterations: one per update, not per micro-step.
            self.optimizer.apply(gradients, self.model.trainable_variables)
            return skipped

        skipped = tf.cond(finite, apply, lambda: skipped)
        self._accumulator.reset()
        return loss_sum, weight_sum, sample_count, gradient_norm, skipped, stop_votes

    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """Sample-weighted mean loss over every worker's `dataset`; accuracy too for class ids.

        Every worker must call it (the totals are summed across workers in one collective).
        """
        data.check_micro_batch_spec(dataset)
        totals = tf.zeros([4])
        for micro_batch in dataset:
            totals += self._evaluation_step(*data.unpack(micro_batch))
        with comm.collective("validation"):
            [totals] = self.backend.sum_all([totals])
        loss_sum, weight_sum, correct, _ = (float(t) for t in totals)
        metrics = {"loss": loss_sum / weight_sum if weight_sum else 0.0}
        if dataset.element_spec[1].dtype.is_integer:
            metrics["accuracy"] = correct / weight_sum if weight_sum else 0.0
        return metrics

    def _evaluation_step_body(self, x, y, sample_weight):
        y_pred = self.model(x, training=False)
        losses = per_sample_loss(self.loss, y, y_pred)
        weights = as_sample_weights(sample_weight, tf.shape(losses)[0], losses.dtype)
        totals = [tf.reduce_sum(losses * weights), tf.reduce_sum(weights)]
        if y.dtype.is_integer:
            hits = tf.cast(tf.argmax(y_pred, axis=-1, output_type=y.dtype) == tf.reshape(y, [-1]),
                           weights.dtype)
            totals.append(tf.reduce_sum(hits * weights))
        else:
            totals.append(tf.constant(0.0))
        totals.append(tf.cast(tf.size(losses), tf.float32))
        return tf.stack(totals)

    def fit(
        self,
        dataset: tf.data.Dataset,
        *,
        epochs: int | None = None,
        update_steps: int | None = None,
        validation_data: tf.data.Dataset | None = None,
        callbacks: Sequence = (),
        log_interval: int = 10,
        max_consecutive_skips: int = 5,
    ):
        """Train on this worker's dataset of micro-batches.

        Args:
            dataset: this worker's micro-batches, `(x, y)` or `(x, y, sample_weight)`.
            epochs: passes over the data; each ends with an update on its last, possibly partial,
                window. Exactly one of `epochs` and `update_steps` is given.
            update_steps: total updates, for a dataset that repeats (or to stop mid-epoch).
            validation_data: this worker's share of the validation set, evaluated every epoch.
            callbacks: objects with any of `on_update`, `on_log`, `on_epoch_end` (see `Controller`).
            log_interval: update steps between `on_log` calls.
            max_consecutive_skips: updates in a row whose reduced gradient is NaN or Inf (each is
                skipped by every worker) before training fails with `NonFiniteGradients`.

        Returns:
            A `History` with per-epoch global mean losses, validation metrics and counters.
        """
        options = CadenceOptions(
            log_interval=log_interval, max_consecutive_skips=max_consecutive_skips
        )
        return Controller(self, callbacks=callbacks, options=options).run(
            dataset, epochs=epochs, update_steps=update_steps, validation_dataset=validation_data
        )
