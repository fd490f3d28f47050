"""TensorBoard logging, on the chief only. The x-axis of every scalar is the update step.

Tags (one glossary with the code and the docs):
    train/loss                      sample-weighted mean over all workers, over the log interval
    train/learning_rate             the rate the optimizer used for that update
    train/samples_per_second        all workers together, over the log interval
    train/gradient_global_norm      of the applied (reduced, normalised, unclipped) gradient
    train/skipped_updates           cumulative updates skipped for NaN/Inf gradients
    communication/allreduce_tensors cumulative tensors allreduced by this worker
    communication/allreduce_bytes   cumulative bytes allreduced by this worker
    time/compute_seconds            micro-steps' wall time over the log interval (but each
                                    window's last, which the update step trains)
    time/communication_seconds      update steps' wall time (last micro-step, allreduce, apply)
    train/<metric>                  the epoch's running value over all workers (compiled metrics)
    validation/loss, validation/<metric>   every epoch, over every worker's validation share
    config                          the configuration as YAML text, once per (resumed) session
"""

from __future__ import annotations

import time
from pathlib import Path

import tensorflow as tf
import yaml
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from distaccum.callbacks import Callback
from distaccum.history import IntervalRecord, UpdateRecord


class TensorBoardWriter(Callback):
    """Owns one run's event files. Create it on the chief only; it never communicates.

    Args:
        logdir: directory for the event files.
        allreduce_per_update: `(tensors, bytes)` one update allreduces (`Trainer.allreduce_per_update`).
        resumed_from: the update step a resumed run restarts after (0 for a fresh run).
    """

    def __init__(
        self, logdir: str, allreduce_per_update: tuple[int, int], resumed_from: int = 0
    ) -> None:
        super().__init__()
        _mark_session_start(Path(logdir), resumed_from + 1)
        self._first_step = self._update_step = resumed_from
        self._writer = tf.summary.create_file_writer(logdir)
        self._allreduce_tensors, self._allreduce_bytes = allreduce_per_update

    def write_config(self, config: dict) -> None:
        with self._writer.as_default():
            # At the session's first step: a resumed run may have changed, say, epochs.
            tf.summary.text("config", yaml.safe_dump(config, sort_keys=False), step=self._first_step)
        self._writer.flush()

    def on_log(self, record: IntervalRecord) -> None:
        scalars = {
            "train/loss": record.loss,
            "train/learning_rate": record.learning_rate,
            "train/samples_per_second": record.samples_per_second,
            "train/gradient_global_norm": record.gradient_norm,
            "train/skipped_updates": record.skipped_updates,
            "communication/allreduce_tensors": record.update_step * self._allreduce_tensors,
            "communication/allreduce_bytes": record.update_step * self._allreduce_bytes,
            "time/compute_seconds": record.compute_seconds,
            "time/communication_seconds": record.communication_seconds,
            **{f"train/{name}": value for name, value in record.metrics.items()},
        }
        self._write(scalars, record.update_step)

    def on_update(self, record: UpdateRecord) -> None:
        self._update_step = record.update_step

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        validation = {f"validation/{k[len('val_'):]}": v for k, v in (logs or {}).items()
                      if k.startswith("val_")}
        self._write(validation, self._update_step)

    def _write(self, scalars: dict[str, float], step: int) -> None:
        with self._writer.as_default():
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value, step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _mark_session_start(logdir: Path, first_step: int) -> None:
    """Make TensorBoard drop what an interrupted run logged after its last checkpoint.

    TensorBoard's reader treats every `SessionLog.START` after the first as a restart and purges
    earlier events with step >= its step, so steps a resumed run logs again are not duplicated.
    Its file is named one second in the past so it sorts (TensorBoard reads files in name order)
    before this session's event file and after the interrupted session's.
    """
    path = logdir / f"events.out.tfevents.{int(time.time()) - 1}.distaccum-start-{first_step}"
    with path.open("wb") as handle:
        records = RecordWriter(handle)
        records.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
                      .SerializeToString())
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        records.write(event_pb2.Event(wall_time=time.time(), step=first_step, session_log=start)
                      .SerializeToString())
