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


@dataclass(frozen=True)
class UpdateRecord:
    """Handed to `callback.on_update` after every update.

    Attributes:
        update_step: updates done so far in this `fit` (1 after the first).
        epoch: 1-based epoch of this update.
        micro_steps: micro-batches this worker ran in the window (0 when its data ran out).
        result: the trainer's `UpdateResult` (global sums, as tensors).
    """

    update_step: int
    epoch: int
    micro_steps: int
    result: object


@dataclass(frozen=True)
class EpochRecord:
    """Handed to `callback.on_epoch_end`: global sample-weighted mean loss of the epoch."""

    epoch: int
    update_step: int
    loss: float
    samples: int


@dataclass
class History:
    """What `fit` returns.

    Attributes:
        loss: per epoch, the sample-weighted mean training loss over all workers.
        update_steps: updates applied.
        samples: samples seen by all workers together.
        seconds: wall time of the loop.
    """

    loss: list[float] = field(default_factory=list)
    update_steps: int = 0
    samples: int = 0
    seconds: float = 0.0

    @property
    def history(self) -> dict[str, list[float]]:
        """Keras-style view: `{"loss": [...]}`."""
        return {"loss": list(self.loss)}


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
    """Owns the loop: how many epochs and windows, and calling callbacks. Not what a step is.

    Args:
        trainer: owns `micro_step` and `update_step`.
        callbacks: objects with any of `on_update(UpdateRecord)`, `on_epoch_end(EpochRecord)`.
    """

    def __init__(self, trainer: StepRunner, *, callbacks: Sequence = ()) -> None:
        self._trainer = trainer
        self._callbacks = list(callbacks)

    def run(
        self, dataset: tf.data.Dataset, *, epochs: int | None = None, update_steps: int | None = None
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
        started = time.perf_counter()
        for epoch in itertools.count(1):
            if history.update_steps >= total_updates:
                break
            self._run_epoch(dataset, plan, epoch, total_updates, history)
        history.seconds = time.perf_counter() - started
        return history

    def _run_epoch(self, dataset, plan: data.EpochPlan, epoch: int, total_updates, history) -> None:
        iterator = iter(dataset)
        # Finite even for a repeating dataset: then update_steps bounds the run.
        windows = int(min(plan.updates_per_epoch, total_updates - history.update_steps))
        results = []
        for _ in range(windows):
            micro_steps = self._run_window(iterator)
            result = self._trainer.update_step()
            history.update_steps += 1
            results.append(result)
            self._notify("on_update", UpdateRecord(history.update_steps, epoch, micro_steps, result))
        if windows == plan.updates_per_epoch and next(iterator, None) is not None:
            raise RuntimeError(
                f"the dataset yielded more than the {plan.micro_batches_per_epoch} micro-batches "
                "counted before training; its size must not change between epochs"
            )
        loss_sum, weight_sum, samples = (
            float(tf.add_n([getattr(r, name) for r in results]))
            for name in ("loss_sum", "weight_sum", "sample_count")
        )
        history.samples += int(samples)
        history.loss.append(loss_sum / weight_sum if weight_sum else 0.0)
        self._notify(
            "on_epoch_end", EpochRecord(epoch, history.update_steps, history.loss[-1], int(samples))
        )

    def _run_window(self, iterator) -> int:
        micro_steps = 0
        for micro_batch in itertools.islice(iterator, self._trainer.accumulation_steps):
            self._trainer.micro_step(*data.unpack(micro_batch))
            micro_steps += 1
        return micro_steps

    def _notify(self, event: str, record) -> None:
        for callback in self._callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(record)
