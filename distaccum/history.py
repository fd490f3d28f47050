"""What the training loop reports and where it stands: the records handed to callbacks, the
`History` that `fit` returns, and the `Position` that checkpoints store. What ends a run early
is in `errors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import keras
import tensorflow as tf


@dataclass(frozen=True)
class Position:
    """Where training stands, at an update boundary: enough to resume exactly.

    Attributes:
        update_step: updates done so far (the TensorBoard x-axis).
        epoch: 1-based epoch in progress.
        windows_done: update windows of that epoch already done.
    """

    update_step: int = 0
    epoch: int = 1
    windows_done: int = 0


@dataclass(frozen=True)
class UpdateRecord:
    """Handed to `callback.on_update` after every update.

    Attributes:
        update_step: updates done so far in this `fit` (1 after the first).
        epoch: 1-based epoch of this update.
        micro_steps: micro-batches this worker ran in the window (0 when its data ran out).
        result: the trainer's `UpdateResult` (global sums, as tensors).
        compute_seconds: wall time of this worker's micro-steps in the window but the last.
        communication_seconds: wall time of the update step (the window's last micro-step,
            which it trains in the same call, the allreduce, then the apply).
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

    Loss is the mean of the interval's window losses, each weighing its samples (on every worker),
    as Keras's `fit` averages its batches' losses; metrics
    are the running values of the epoch over every worker's samples.
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
    skipped_updates: int = 0
    metrics: dict = field(default_factory=dict)


class History(keras.callbacks.History):
    """What `fit` returns: Keras's `History` (`history.history["loss"]`, `["val_loss"]`, one value
    per epoch, over all workers) plus distaccum's counters.

    Attributes:
        update_steps: update steps (windows) run; `skipped_updates` of them were not applied
            because their gradient was not finite.
        samples: samples seen by all workers together.
        seconds: wall time of the loop.
    """

    def __init__(self) -> None:
        super().__init__()
        self.update_steps = 0
        self.skipped_updates = 0
        self.samples = 0
        self.seconds = 0.0

    @property
    def loss(self) -> list[float]:
        """Per epoch, the training loss over all workers: its windows' losses, each weighing its
        samples (as Keras's `fit` weighs its batches)."""
        return list(self.history.get("loss", []))

    @property
    def validation(self) -> list[dict]:
        """Per epoch, the validation values by name without `val_` (empty dicts without any)."""
        names = [k for k in self.history if k.startswith("val_")]
        return [{k[len("val_"):]: self.history[k][i] for k in names if i < len(self.history[k])}
                for i in range(len(self.loss))]


def weighted_totals(results: Sequence) -> tuple[float, int]:
    """(Σ window loss × its samples, sample count) over `UpdateResult`s, read once: each window's
    loss weighs as many samples as it has, as each batch's does in the loss Keras's `fit`
    reports for an epoch."""
    if not results:
        return 0.0, 0
    loss_sum = float(tf.add_n([r.window_loss * r.sample_count for r in results]))
    return loss_sum, int(tf.add_n([r.sample_count for r in results]))


def weighted_mean(loss_sum: float, samples: float) -> float:
    return loss_sum / samples if samples else 0.0
