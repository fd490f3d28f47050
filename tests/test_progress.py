"""The chief's console output: a bar on a terminal, plain periodic lines elsewhere."""

from __future__ import annotations

import io

from distaccum.history import IntervalRecord, UpdateRecord
from distaccum.progress import ProgressReporter


def _interval(step: int) -> IntervalRecord:
    return IntervalRecord(step, 4, 1, 0.5, 64, 1000.0, 1.0, 0.01, 0.1, 0.1)


def _update(step: int) -> UpdateRecord:
    return UpdateRecord(step, 1, 2, None, 0.1, 0.1)


def _drive(reporter: ProgressReporter) -> None:
    for step in (1, 2, 3, 4):
        reporter.on_update(_update(step))
        if step % 2 == 0:
            reporter.on_log(_interval(step))
    reporter.on_epoch_end(0, {"loss": 0.5, "accuracy": 0.8, "val_loss": 0.25, "val_accuracy": 0.9})


def test_plain_lines_every_log_interval_when_not_a_terminal():
    stream = io.StringIO()
    _drive(ProgressReporter(4, stream, interactive=False))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines == [
        "update 2/4 epoch 1 loss 0.5000 lr 0.01 1,000 samples/s",
        "update 4/4 epoch 1 loss 0.5000 lr 0.01 1,000 samples/s",
        "epoch 1 done: loss 0.5000 validation loss 0.2500 validation accuracy 0.9000",
    ]


def test_bar_redrawn_every_update_when_a_terminal():
    stream = io.StringIO()
    _drive(ProgressReporter(4, stream, interactive=True))
    output = stream.getvalue()
    assert output.count("\r[") == 4
    assert "update 4/4 loss 0.5000 1,000 samples/s" in output
    assert "[" + "#" * 30 + "]" in output
    assert output.endswith("epoch 1 done: loss 0.5000 validation loss 0.2500 validation accuracy 0.9000\n")
