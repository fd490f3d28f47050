"""The Controller: cadence of training (epochs, windows, how many updates, callbacks).

Window `u` of an epoch is micro-batches `u*k … u*k+k-1` of every worker. Every worker runs the same
number of windows per epoch (agreed once, see `data.agree_on_epoch_plan`); a worker that has run
out contributes an empty window but still takes part in the update's collective. Each epoch ends
with an update on its last, possibly partial, window: windows never straddle epochs.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import tensorflow as tf

from distaccum import data


class StepRunner(Protocol):
    """What the Controller needs from a trainer."""

    accumulation_steps: int

    def prepare(self, element_spec) -> None: ...

    def micro_step(self, x, y, sample_weight=None) -> None: ...

    def update_step(self): ...

    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]: ...

    def learning_rate_at(self, update_step: int) -> float: ...


@dataclass(frozen=True)
class UpdateRecord:
    """Handed to `callback.on_update` after every update.

    Attributes:
        update_step: updates done so far in this `fit` (1 after the first).
        epoch: 1-based epoch of this update.
        micro_steps: micro-batches this worker ran in the window (0 when its data ran out).
        result: the trainer's `UpdateResult` (global sums, as tensors).
        compute_seconds: wall time of this worker's micro-steps in the window.
        communication_seconds: wall time of the update step (allreduce, then apply).
    """

    update_step: int
    epoch: int
    micro_steps: int
    result: object
    compute_seconds: float
    communication_seconds: float


@dataclass(frozen=True)
class IntervalRecord:
    """Handed to `callback.on_log` every `log_interval` updates (and after the last update).

    Loss is the sample-weighted mean over every sample of the interval on every worker.
    """

    update_step: int
    total_update_steps: int
    epoch: int
    loss: float
    samples: int
    samples_per_second: float
    gradient_norm: float
    learning_rate: float
    compute_seconds: float
    communication_seconds: float


@dataclass(frozen=True)
class EpochRecord:
    """Handed to `callback.on_epoch_end`.

    Attributes:
        loss: sample-weighted mean training loss of the epoch over all workers.
        validation: `{"loss": ..., "accuracy": ...}` over the whole validation set of all workers,
            or empty without validation data.
    """

    epoch: int
    update_step: int
    loss: float
    samples: int
    validation: dict = field(default_factory=dict)


@dataclass
class History:
    """What `fit` returns.

    Attributes:
        loss: per epoch, the sample-weighted mean training loss over all workers.
        validation: per epoch, the validation metrics (empty dicts without validation data).
        update_steps: updates applied.
        samples: samples seen by all workers together.
        seconds: wall time of the loop.
    """

    loss: list[float] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    update_steps: int = 0
    samples: int = 0
    seconds: float = 0.0

    @property
    def history(self) -> dict[str, list[float]]:
        """Keras-style view: `{"loss": [...], "val_loss": [...], ...}`."""
        view = {"loss": list(self.loss)}
        for metrics in self.validation:
            for name, value in metrics.items():
                view.setdefault(f"val_{name}", []).append(value)
        return view


def weighted_totals(results: Sequence) -> tuple[float, float, int]:
    """(weighted loss sum, weight sum, sample count) over `UpdateResult`s, read once."""
    if not results:
        return 0.0, 0.0, 0
    loss_sum, weight_sum, samples = (
        float(tf.add_n([getattr(r, name) for r in results]))
        for name in ("loss_sum", "weight_sum", "sample_count")
    )
    return loss_sum, weight_sum, int(samples)


def weighted_mean(loss_sum: float, weight_sum: float) -> float:
    return loss_sum / weight_sum if weight_sum else 0.0


def _check_duration(epochs, update_steps) -> None:
    if (epochs is None) == (update_steps is None):
        raise ValueError(
            f"give exactly one of epochs and update_steps. Received: epochs={epochs!r}, "
            f"update_steps={update_steps!r}"
        )
    for name, value in (("epochs", epochs), ("update_steps", update_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1. Received: {name}={value!r}")


class Controller:
    """Owns the loop and its cadence: epochs, windows, when to log and evaluate. Not what a step is.

    Args:
        trainer: owns `micro_step`, `update_step` and `evaluate`.
        callbacks: objects with any of `on_update(UpdateRecord)`, `on_log(IntervalRecord)`,
            `on_epoch_end(EpochRecord)`; called on every worker (a callback that writes files
            belongs on the chief only).
        log_interval: update steps between `on_log` calls.
    """

    def __init__(self, trainer: StepRunner, *, callbacks: Sequence = (), log_interval: int = 10):
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 1:
            raise ValueError(f"log_interval must be an int >= 1. Received: {log_interval!r}")
        self._trainer = trainer
        self._callbacks = list(callbacks)
        self._log_interval = log_interval
        self._interval: list[UpdateRecord] = []
        self._interval_started = 0.0

    def run(
        self,
        dataset: tf.data.Dataset,
        *,
        epochs: int | None = None,
        update_steps: int | None = None,
        validation_dataset: tf.data.Dataset | None = None,
    ) -> History:
        """Train for `epochs` epochs or `update_steps` updates and return the `History`."""
        _check_duration(epochs, update_steps)
        self._trainer.prepare(dataset.element_spec)
        plan = data.agree_on_epoch_plan(dataset, self._trainer.accumulation_steps)
        if epochs is not None and plan.updates_per_epoch == data.INFINITE:
            raise ValueError(
                "the dataset repeats forever, so an epoch never ends: pass update_steps instead "
                f"of epochs. Received: epochs={epochs}"
            )
        total_updates = update_steps if update_steps is not None else epochs * plan.updates_per_epoch
        history = History()
        started = self._interval_started = time.perf_counter()
        for epoch in itertools.count(1):
            if history.update_steps >= total_updates:
                break
            records = self._run_epoch(dataset, plan, epoch, total_updates, history.update_steps)
            self._end_epoch(epoch, records, validation_dataset, history)
        history.seconds = time.perf_counter() - started
        return history

    def _run_epoch(self, dataset, plan: data.EpochPlan, epoch: int, total_updates, done: int):
        iterator = iter(dataset)
        # Finite even for a repeating dataset: then update_steps bounds the run.
        windows = int(min(plan.updates_per_epoch, total_updates - done))
        records = []
        for update_step in range(done + 1, done + windows + 1):
            started = time.perf_counter()
            micro_steps = self._run_window(iterator)
            computed = time.perf_counter()
            result = self._trainer.update_step()
            record = UpdateRecord(
                update_step, epoch, micro_steps, result,
                computed - started, time.perf_counter() - computed,
            )
            records.append(record)
            self._notify("on_update", record)
            self._interval.append(record)
            if update_step % self._log_interval == 0 or update_step == total_updates:
                self._log(total_updates)
        if windows == plan.updates_per_epoch and next(iterator, None) is not None:
            raise RuntimeError(
                f"the dataset yielded more than the {plan.micro_batches_per_epoch} micro-batches "
                "counted before training; its size must not change between epochs"
            )
        return records

    def _run_window(self, iterator) -> int:
        micro_steps = 0
        for micro_batch in itertools.islice(iterator, self._trainer.accumulation_steps):
            self._trainer.micro_step(*data.unpack(micro_batch))
            micro_steps += 1
        return micro_steps

    def _log(self, total_updates: int) -> None:
        records, self._interval = self._interval, []
        now = time.perf_counter()
        seconds, self._interval_started = now - self._interval_started, now
        loss_sum, weight_sum, samples = weighted_totals([r.result for r in records])
        last = records[-1]
        self._notify("on_log", IntervalRecord(
            update_step=last.update_step,
            total_update_steps=total_updates,
            epoch=last.epoch,
            loss=weighted_mean(loss_sum, weight_sum),
            samples=samples,
            samples_per_second=samples / seconds if seconds > 0 else 0.0,
            gradient_norm=float(last.result.gradient_norm),
            learning_rate=self._trainer.learning_rate_at(last.update_step),
            compute_seconds=sum(r.compute_seconds for r in records),
            communication_seconds=sum(r.communication_seconds for r in records),
        ))

    def _end_epoch(self, epoch: int, records, validation_dataset, history: History) -> None:
        loss_sum, weight_sum, samples = weighted_totals([r.result for r in records])
        validation = (
            self._trainer.evaluate(validation_dataset) if validation_dataset is not None else {}
        )
        history.update_steps += len(records)
        history.samples += samples
        history.loss.append(weighted_mean(loss_sum, weight_sum))
        history.validation.append(validation)
        self._notify(
            "on_epoch_end",
            EpochRecord(epoch, history.update_steps, history.loss[-1], samples, validation),
        )

    def _notify(self, event: str, record) -> None:
        for callback in self._callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(record)
