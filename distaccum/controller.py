"""The Controller: cadence of training (epochs, windows, logging, checkpoints, stopping).

Window `u` of an epoch is micro-batches `u*k … u*k+k-1` of every worker. Every worker runs the same
number of windows per epoch (`data`'s `EpochSource.plan`); a worker that has run out contributes an
empty window but still takes part in the update's collective. Each epoch ends
with an update on its last, possibly partial, window: windows never straddle epochs.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, Union

import tensorflow as tf

from distaccum import callbacks as keras_callbacks
from distaccum import data, diagnosis
from distaccum.batch import check_count
from distaccum.errors import NonFiniteGradients, TrainingInterrupted
from distaccum.history import (
    History,
    IntervalRecord,
    Position,
    UpdateRecord,
    weighted_mean,
    weighted_totals,
)

# A dataset, a function of the 1-based epoch returning that epoch's dataset (for shuffles that
# must be reproducible on resume), or `micro_batches(...)` (any `data.EpochSource`).
EpochData = Union[data.EpochData, data.EpochSource]


class StepRunner(Protocol):
    """What the Controller needs from a trainer."""

    accumulation_steps: int
    model: object  # the Keras model callbacks see

    def prepare(self, element_spec, micro_batch_size: int | None = None) -> None: ...

    def micro_step(self, x, y, sample_weight=None) -> None: ...

    def micro_steps(self, micro_batches: Sequence[tuple]) -> None: ...

    def update_step(self, stop_vote: bool = False, cancel_vote: bool = False,
                    bad_micro_batch: int = 0, step: int | None = None,
                    last_micro_batch: tuple | None = None): ...

    def metric_results(self) -> dict[str, float]: ...

    def reset_metrics(self) -> None: ...

    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]: ...

    def learning_rate_at(self, update_step: int) -> float: ...

    def refusing_part(self, x, y, sample_weight=None): ...


# What a micro-batch the model cannot train on raises (a wrong dtype or shape).
_DATA_ERRORS = (tf.errors.InvalidArgumentError, ValueError, TypeError)


@dataclass(frozen=True)
class CadenceOptions:
    """How often things happen, in update steps.

    Attributes:
        log_interval: between `on_log` calls.
        checkpoint_interval: between checkpoints (None: only when stopping on SIGTERM).
        max_consecutive_skips: non-finite updates in a row after which training fails.
    """

    log_interval: int = 10
    checkpoint_interval: int | None = None
    max_consecutive_skips: int = 5

    def __post_init__(self) -> None:
        check_count("log_interval", self.log_interval)
        check_count("max_consecutive_skips", self.max_consecutive_skips)
        check_count("checkpoint_interval", self.checkpoint_interval)


# SIGTERM is what schedulers send. SIGUSR1 is what a launcher passes on unchanged where it would
# answer its own SIGTERM by killing the ranks (Open MPI's mpirun: SIGKILL 0.5 s later);
# `distaccum launch` turns the SIGTERM it gets into SIGUSR1 for such a launcher.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _StopRequest:
    """Records SIGTERM (or SIGUSR1) instead of dying, so the update in flight completes (main
    thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._request) for s in STOP_SIGNALS}
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler Python did not install, left as is
                signal.signal(signum, previous)


def _advance(position: Position, windows: int, updates_per_epoch) -> Position:
    """Where training stands after `windows` more updates of `position`'s epoch."""
    done = position.windows_done + windows
    if done >= updates_per_epoch:
        return Position(position.update_step + windows, position.epoch + 1, 0)
    return Position(position.update_step + windows, position.epoch, done)


def _check_duration(epochs, update_steps) -> None:
    if (epochs is None) == (update_steps is None):
        raise ValueError(
            f"give exactly one of epochs and update_steps. Received: epochs={epochs!r}, "
            f"update_steps={update_steps!r}"
        )
    check_count("epochs", epochs)
    check_count("update_steps", update_steps)


class Controller:
    """Owns the loop and its cadence: epochs, windows, logging, evaluation, checkpoints, stopping.
    Not what a step is (the trainer's), nor how a checkpoint is written (`checkpoint`'s).

    Args:
        trainer: owns `micro_step`, `update_step` and `evaluate`.
        callbacks: `keras.callbacks.Callback`s, run as `callbacks` describes (Keras's hooks with
            global logs; distaccum's `on_update` and `on_log` where defined).
        options: the intervals.
        save_checkpoint: called with the `Position` at checkpoint boundaries and before stopping
            on SIGTERM, on every worker (the function decides who writes).
    """

    def __init__(
        self,
        trainer: StepRunner,
        *,
        callbacks: Sequence = (),
        options: CadenceOptions = CadenceOptions(),
        save_checkpoint: Callable[[Position], None] | None = None,
    ) -> None:
        self._trainer = trainer
        self._callbacks = keras_callbacks.check_callbacks(callbacks)
        self._options = options
        self._save_checkpoint = save_checkpoint
        self._interval: list[UpdateRecord] = []  # since the last on_log
        self._epoch_loss = [0.0, 0.0]  # weighted loss sum and weight sum since the epoch began
        self._interval_started = 0.0
        self._consecutive_skips = 0
        self._checkpointed_step: int | None = None
        self._source: data.EpochSource | None = None  # what run reads
        self._updates_run = 0  # by this `run`: before the first, a failing step is a mismatch

    def run(
        self,
        dataset: EpochData,
        *,
        epochs: int | None = None,
        update_steps: int | None = None,
        validation_dataset: tf.data.Dataset | None = None,
        start: Position = Position(),
    ) -> History:
        """Train until `epochs` epochs or `update_steps` updates in all, starting at `start`.

        Raises:
            TrainingInterrupted: a worker got SIGTERM; every worker stops after the same update.
            NonFiniteGradients: `max_consecutive_skips` updates in a row were not finite.
        """
        _check_duration(epochs, update_steps)
        source = self._source = data.as_epoch_source(dataset)
        self._updates_run = 0
        self._trainer.prepare(source.element_spec, source.micro_batch_size)
        plan = source.plan(self._trainer.accumulation_steps)
        if epochs is not None and plan.updates_per_epoch == data.INFINITE:
            raise ValueError(
                "the dataset repeats forever, so an epoch never ends: pass update_steps instead "
                f"of epochs. Received: epochs={epochs}"
            )
        total = update_steps if update_steps is not None else epochs * plan.updates_per_epoch
        history = History()
        callbacks = keras_callbacks.callback_list(
            self._callbacks, self._trainer.model, history,
            epochs or math.ceil(total / plan.updates_per_epoch), plan.updates_per_epoch)
        position = start
        started = self._interval_started = time.perf_counter()
        self._trainer.model.stop_training = False
        callbacks.on_train_begin()
        with _StopRequest() as stop:
            while position.update_step < total:
                self._trainer.reset_metrics()
                self._epoch_loss = [0.0, 0.0]
                callbacks.on_epoch_begin(position.epoch - 1)
                records, cancelled = self._run_epoch(source, plan, position, total, stop,
                                                     history, callbacks)
                if records:  # as Keras's fit, an epoch stopped midway still ends (validation too)
                    self._end_epoch(position.epoch, records, validation_dataset, history, callbacks)
                position = _advance(position, len(records), plan.updates_per_epoch)
                if cancelled:
                    break
        history.seconds = time.perf_counter() - started
        if history.update_steps:
            # As Keras's fit ends: the optimizer's final values replace the weights (with
            # use_ema, the moving average); every worker holds the same, so every worker does it.
            self._trainer.finalize_variable_values()
        callbacks.on_train_end()
        # So that running the same job again finds it finished instead of redoing the tail.
        self._checkpoint(position)
        return history

    def _checkpoint(self, position: Position) -> None:
        if self._save_checkpoint and self._checkpointed_step != position.update_step:
            self._save_checkpoint(position)
            self._checkpointed_step = position.update_step

    def _run_epoch(self, source, plan, start: Position, total, stop, history, callbacks):
        """The epoch's windows; `(records, cancelled)`, cancelled when a callback stopped it."""
        k = self._trainer.accumulation_steps
        # Resuming mid-epoch: the same epoch's data, from the first window not yet applied.
        iterator = iter(source.epoch(start.epoch, k, start.windows_done))
        # Finite even for a repeating dataset: then update_steps bounds the run.
        windows = int(min(plan.updates_per_epoch - start.windows_done, total - start.update_step))
        records = []
        for done in range(1, windows + 1):
            callbacks.on_train_batch_begin(done - 1)
            first = (start.windows_done + done - 1) * k  # this window's first micro-batch, 0-based
            record = self._run_window(iterator, start, done, stop.requested, first)
            if float(record.result.cancel_votes) > 0:
                return records, True  # nothing was applied: the state is the last update's
            records.append(record)
            self._after_update(record, total, history, callbacks, done - 1)
            position = _advance(start, done, plan.updates_per_epoch)
            interval = self._options.checkpoint_interval
            if float(record.result.stop_votes) > 0:
                self._stop(position, records, total, history, callbacks)
            if interval and record.update_step % interval == 0:
                self._checkpoint(position)
        if start.windows_done + windows == plan.updates_per_epoch and next(iterator, None) is not None:
            raise RuntimeError(
                f"the dataset yielded more than the {plan.micro_batches_per_epoch} micro-batches "
                "counted before training; its size must not change between epochs"
            )
        return records, False

    def _run_window(self, iterator, start: Position, done: int, stop_vote: bool,
                    first: int) -> UpdateRecord:
        """The window's micro-batches but the last in one call, then the update step, which
        trains the last itself (its gradient feeds the reduction directly): two compiled calls
        per window whatever k. A micro-batch that cannot be trained on is not raised here alone,
        which would leave the others waiting in the update: it is reported in the update, so
        that every worker stops there."""
        started = time.perf_counter()
        micro_batches, bad = [], None  # bad: (1-based index in the epoch, error, micro-batch)
        try:  # the input pipeline's error (a wrong dtype or shape) surfaces in `next`
            for _ in range(self._trainer.accumulation_steps):
                micro_batch = next(iterator, None)
                if micro_batch is None:
                    break
                micro_batches.append(data.unpack(micro_batch))
        except _DATA_ERRORS as error:
            bad = (first + len(micro_batches) + 1, error, None)
        last = micro_batches.pop() if micro_batches and bad is None else None
        if micro_batches and bad is None:
            bad = self._stored_micro_steps(micro_batches, first)
        computed = time.perf_counter()
        step = start.update_step + done
        # A callback's stop request (model.stop_training) travels in this update's allreduce.
        votes = (stop_vote, bool(self._trainer.model.stop_training))
        result = None
        if last is not None and bad is None:
            try:
                result = self._trainer.update_step(*votes, 0, step, last_micro_batch=last)
            except _DATA_ERRORS as error:
                # Raised before the collective (the reduction needs this micro-batch's
                # gradient): nothing was reduced or applied, so report it like the others.
                bad = (first + len(micro_batches) + 1, error, last)
        if result is None:
            result = self._trainer.update_step(*votes, bad[0] if bad else 0, step)
        micro_steps = 0 if bad else len(micro_batches) + (last is not None)
        record = UpdateRecord(step, start.epoch, micro_steps, result,
                              computed - started, time.perf_counter() - computed)
        if bad:
            origin = self._source.describe(start.epoch, self._trainer.accumulation_steps, bad[0])
            part = self._trainer.refusing_part(*bad[2]) if bad[2] is not None else None
            # A micro-batch the input pipeline could not give (bad[2] None: a file that does
            # not decode, a source that raised) is the data's fault, whatever the model.
            diagnosis.raise_if_bad(record, bad[:2], origin, part,
                                   first_of_run=self._updates_run == 0 and bad[0] == first + 1
                                   and bad[2] is not None)
        else:  # another worker's report stops this one too
            diagnosis.raise_if_bad(record, None)
        return record

    def _stored_micro_steps(self, micro_batches: list, first: int):
        """Train the window's micro-batches but the last; `(1-based index in the epoch, error,
        micro-batch)` of one that cannot be trained on, else None."""
        try:
            self._trainer.micro_steps(micro_batches)
            return None
        except _DATA_ERRORS as error:
            together = error  # one of them: find which, one call each
        for index, micro_batch in enumerate(micro_batches):
            try:
                self._trainer.micro_step(*micro_batch)
            except _DATA_ERRORS as error:
                return first + index + 1, error, micro_batch
        # Not expected: then the window is still reported, not trained on half-counted metrics.
        return first + 1, together, None

    def _after_update(self, record: UpdateRecord, total: int, history: History, callbacks,
                      window: int) -> None:
        self._updates_run += 1
        keras_callbacks.notify(callbacks, "on_update", record)
        self._interval.append(record)
        samples = float(record.result.sample_count)
        self._epoch_loss[0] += float(record.result.window_loss) * samples
        self._epoch_loss[1] += samples
        if bool(record.result.skipped):
            history.skipped_updates += 1
            self._consecutive_skips += 1
            if self._consecutive_skips >= self._options.max_consecutive_skips:
                raise NonFiniteGradients(
                    f"{self._consecutive_skips} consecutive updates had NaN or Inf gradients "
                    f"(last at update step {record.update_step}); stopping. Lower the learning "
                    "rate, set clip_global_norm, or check the input data"
                )
        else:
            self._consecutive_skips = 0
        callbacks.on_train_batch_end(window, {"loss": weighted_mean(*self._epoch_loss),
                                              **self._trainer.metric_results()})
        if record.update_step % self._options.log_interval == 0 or record.update_step == total:
            self._log(total, history.skipped_updates, callbacks)

    def _stop(self, position: Position, records, total: int, history: History, callbacks) -> None:
        if self._interval:
            self._log(total, history.skipped_updates, callbacks)
        self._checkpoint(position)
        history.update_steps += len(records)
        raise TrainingInterrupted(position, history)

    def _log(self, total_updates: int, skipped_updates: int, callbacks) -> None:
        records, self._interval = self._interval, []
        now = time.perf_counter()
        seconds, self._interval_started = now - self._interval_started, now
        loss_sum, samples = weighted_totals([r.result for r in records])
        last = records[-1]
        keras_callbacks.notify(callbacks, "on_log", IntervalRecord(
            update_step=last.update_step,
            total_update_steps=total_updates,
            epoch=last.epoch,
            loss=weighted_mean(loss_sum, samples),
            samples=samples,
            samples_per_second=samples / seconds if seconds > 0 else 0.0,
            gradient_norm=float(last.result.gradient_norm),
            learning_rate=self._trainer.learning_rate_at(last.update_step),
            compute_seconds=sum(r.compute_seconds for r in records),
            communication_seconds=sum(r.communication_seconds for r in records),
            skipped_updates=skipped_updates,
            metrics=self._trainer.metric_results(),
        ))

    def _end_epoch(self, epoch: int, records, validation_dataset, history: History,
                   callbacks) -> None:
        loss_sum, samples = weighted_totals([r.result for r in records])
        logs = {"loss": weighted_mean(loss_sum, samples), **self._trainer.metric_results()}
        if validation_dataset is not None:
            logs.update({f"val_{k}": v for k, v in self._trainer.evaluate(validation_dataset).items()})
        history.update_steps += len(records)
        history.samples += samples
        callbacks.on_epoch_end(epoch - 1, logs)
