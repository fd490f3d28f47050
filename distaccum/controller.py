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
from distaccum import comm, data, diagnosis, elastic
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
                    last_micro_batch: tuple | None = None, change_vote: bool = False): ...

    def resize(self) -> None: ...

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
        rebuild: in an elastic job, what the workers train on once they have rejoined, with
            the trainer resized (run on every worker alike, its collectives those a joining
            process runs before `run`); without it, the trainer is resized and the data kept
            (`micro_batches` are read by the worker count of the moment).
        regrouped: in an elastic job, called with the `Position` once the workers have
            regrouped; the callbacks it returns join this worker's (a new chief's writers).

    In an elastic job (`comm.elastic()`) the loop also regroups the workers when some join or
    leave (see `elastic`): after an update whose change vote says so, and at once when a
    collective fails; training goes on from the last update every worker applied.
    """

    def __init__(
        self,
        trainer: StepRunner,
        *,
        callbacks: Sequence = (),
        options: CadenceOptions = CadenceOptions(),
        save_checkpoint: Callable[[Position], None] | None = None,
        rebuild: Callable[[], data.EpochSource] | None = None,
        regrouped: Callable[[Position], Sequence] | None = None,
    ) -> None:
        self._trainer = trainer
        self._rebuild = rebuild
        self._regrouped = regrouped
        self._regroup_pending = False  # workers join or leave before the next window
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
        synchronized = False
        if comm.elastic():
            elastic.refuse_unless_exact(self._trainer.global_batch_size, source)
            try:
                position = self._synchronize(history, start if comm.is_chief() else None,
                                             survivor=False)
            except comm.WorkersChanged:  # another change while this worker joined
                position = self._regroup(start if comm.is_chief() else None, history,
                                         callbacks, survivor=False)
            synchronized = True
        callbacks.on_train_begin()
        with _StopRequest() as stop:
            while position.update_step < total:
                if not synchronized:  # a synchronized epoch's counts are the group's
                    self._trainer.reset_metrics()
                    self._epoch_loss = [0.0, 0.0]
                synchronized = False
                callbacks.on_epoch_begin(position.epoch - 1)
                epoch = position.epoch
                position, ran, cancelled = self._run_epoch(plan, position, total, stop, history,
                                                           callbacks)
                if ran:  # as Keras's fit, an epoch stopped midway still ends (validation too)
                    self._end_epoch(epoch, validation_dataset, history, callbacks)
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

    def _run_epoch(self, plan, start: Position, total, stop, history, callbacks):
        """The epoch's windows from `start`: `(position, updates run, cancelled)`, cancelled when
        a callback stopped it."""
        position, ran, iterator = start, 0, None
        # Finite even for a repeating dataset: then update_steps bounds the run.
        while position.epoch == start.epoch and position.update_step < total:
            if self._regroup_pending:
                position = self._regroup(position, history, callbacks)
                iterator = None
                continue  # the state taken may be an update further on, the next epoch's
            if iterator is None:  # from the first window not yet applied
                iterator = iter(self._source.epoch(position.epoch, self._trainer.accumulation_steps,
                                                   position.windows_done))
            callbacks.on_train_batch_begin(position.windows_done)
            try:
                record = self._run_window(iterator, position, stop.requested)
            except comm.WorkersChanged:  # the survivors' state is the last update's
                self._regroup_pending = True
                continue
            if float(record.result.cancel_votes) > 0:
                return position, ran, True  # nothing was applied: the state is the last update's
            ran += 1
            self._after_update(record, total, history, callbacks, position.windows_done)
            position = _advance(position, 1, plan.updates_per_epoch)
            self._regroup_pending = float(record.result.change_votes) > 0
            interval = self._options.checkpoint_interval
            if float(record.result.stop_votes) > 0:
                self._stop(position, total, history, callbacks)
            if interval and record.update_step % interval == 0:
                self._checkpoint(position)
        if position.epoch > start.epoch and iterator is not None \
                and next(iterator, None) is not None:
            raise RuntimeError(
                f"the dataset yielded more than the {plan.micro_batches_per_epoch} micro-batches "
                "counted before training; its size must not change between epochs"
            )
        return position, ran, False

    def _progress(self, position: Position, history: History) -> elastic.Progress:
        return elastic.Progress(position, *self._epoch_loss, history.update_steps,
                                history.samples, history.skipped_updates,
                                self._consecutive_skips)

    def _synchronize(self, history: History, position: Position | None, survivor: bool
                     ) -> Position:
        """Take the state and the counters of the worker furthest along (`elastic`); where
        training stands. `position`: this worker's, None when it holds none of the run's."""
        progress, _ = elastic.synchronize(
            self._trainer.synchronized_variables,
            None if position is None else self._progress(position, history), survivor)
        self._epoch_loss = [progress.epoch_loss_sum, progress.epoch_samples]
        history.update_steps, history.samples = progress.update_steps, progress.samples
        history.skipped_updates = progress.skipped_updates
        self._consecutive_skips = progress.consecutive_skips
        return progress.position

    def _regroup(self, position: Position | None, history: History, callbacks,
                 survivor: bool = True) -> Position:
        """Workers joined or left: rejoin, rebuild what holds the worker count, and take the
        state of the worker furthest along; where training stands. A change while regrouping
        starts it again. `position`: this worker's (None: it holds none of the run's)."""
        started = time.perf_counter()
        workers = comm.num_workers()
        while True:
            try:
                comm.rejoin()
                if self._rebuild is None:
                    self._trainer.resize()
                else:
                    self._source = self._rebuild()
                position = self._synchronize(history, position, survivor)
                break
            except comm.WorkersChanged:
                continue
        for callback in self._regrouped(position) if self._regrouped else ():
            callback.set_model(self._trainer.model)
            callbacks.callbacks.append(callback)
            callback.on_train_begin()
        self._regroup_pending = False
        if comm.is_chief():
            print(f"distaccum: {workers} → {comm.num_workers()} workers after update step "
                  f"{position.update_step}: k={self._trainer.accumulation_steps}, the same global "
                  f"batch; regrouped in {time.perf_counter() - started:.1f} s", flush=True)
        return position

    def _run_window(self, iterator, position: Position, stop_vote: bool) -> UpdateRecord:
        """The window after `position`: its micro-batches but the last in one call, then the
        update step, which trains the last itself (its gradient feeds the reduction directly):
        two compiled calls per window whatever k. A micro-batch that cannot be trained on is not
        raised here alone, which would leave the others waiting in the update: it is reported in
        the update, so that every worker stops there."""
        started = time.perf_counter()
        first = position.windows_done * self._trainer.accumulation_steps  # 0-based
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
        step = position.update_step + 1
        # A callback's stop request (model.stop_training) travels in this update's allreduce,
        # and so does rank 0's news that workers will join or leave.
        votes = dict(stop_vote=stop_vote, cancel_vote=bool(self._trainer.model.stop_training),
                     step=step, change_vote=comm.announced_change())
        result = None
        if last is not None and bad is None:
            try:
                result = self._trainer.update_step(**votes, last_micro_batch=last)
            except _DATA_ERRORS as error:
                # Raised before the collective (the reduction needs this micro-batch's
                # gradient): nothing was reduced or applied, so report it like the others.
                bad = (first + len(micro_batches) + 1, error, last)
        if result is None:
            result = self._trainer.update_step(**votes, bad_micro_batch=bad[0] if bad else 0)
        micro_steps = 0 if bad else len(micro_batches) + (last is not None)
        record = UpdateRecord(step, position.epoch, micro_steps, result,
                              computed - started, time.perf_counter() - computed)
        if bad:
            k = self._trainer.accumulation_steps
            origin = self._source.describe(position.epoch, k, bad[0])
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
        history.update_steps += 1
        history.samples += int(samples)
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

    def _stop(self, position: Position, total: int, history: History, callbacks) -> None:
        if self._interval:
            self._log(total, history.skipped_updates, callbacks)
        self._checkpoint(position)
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

    def _end_epoch(self, epoch: int, validation_dataset, history: History, callbacks) -> None:
        logs = {"loss": weighted_mean(*self._epoch_loss), **self._trainer.metric_results()}
        if validation_dataset is not None:
            try:
                logs.update({f"val_{k}": v for k, v in
                             self._trainer.evaluate(validation_dataset).items()})
            except comm.WorkersChanged:  # a joining worker starts at the next epoch's windows
                self._regroup_pending = True
                if comm.is_chief():
                    print(f"distaccum: warning: epoch {epoch}'s validation was cut short by a "
                          "worker leaving; training goes on", flush=True)
        callbacks.on_epoch_end(epoch - 1, logs)
