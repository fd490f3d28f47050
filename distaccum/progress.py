"""What the chief prints while training: a live bar on a terminal, plain lines elsewhere.

On a terminal the bar is redrawn after every update; when stdout is a file or a pipe (CI,
Kubernetes logs) one line is printed every `log_interval` updates instead, so logs stay readable.
Under a launcher the lines are used too: mpirun hands ranks a pseudo-terminal even when its own
output goes to a file.
"""

from __future__ import annotations

import sys
from typing import TextIO

from distaccum import comm
from distaccum.callbacks import Callback
from distaccum.history import IntervalRecord, UpdateRecord

_BAR_WIDTH = 30


def loss_first(values: dict) -> list[tuple[str, float]]:
    """`values` as (name, value) pairs, the loss first, then by name (Keras sorts its logs)."""
    return sorted(values.items(), key=lambda item: (item[0] != "loss", item[0]))


class ProgressReporter(Callback):
    """Owns the chief's console output during training. Create it on the chief only."""

    def __init__(
        self, total_update_steps: int, stream: TextIO | None = None, interactive: bool | None = None
    ) -> None:
        super().__init__()
        self._total = total_update_steps
        self._stream = stream or sys.stdout
        if interactive is None:
            interactive = self._stream.isatty() and not comm.launched_by_launcher()
        self._interactive = interactive
        self._last: IntervalRecord | None = None

    def on_update(self, record: UpdateRecord) -> None:
        if not self._interactive:
            return
        filled = _BAR_WIDTH * record.update_step // self._total
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        latest = (
            f" loss {self._last.loss:.4f} {self._last.samples_per_second:,.0f} samples/s"
            if self._last else ""
        )
        self._stream.write(f"\r[{bar}] update {record.update_step}/{self._total}{latest}")
        self._stream.flush()

    def on_log(self, record: IntervalRecord) -> None:
        self._last = record
        if not self._interactive:
            self._print(
                f"update {record.update_step}/{record.total_update_steps} epoch {record.epoch} "
                f"loss {record.loss:.4f} lr {record.learning_rate:.3g} "
                f"{record.samples_per_second:,.0f} samples/s"
            )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        validation = {k[len("val_"):]: v for k, v in logs.items() if k.startswith("val_")}
        metrics = " ".join(f"validation {k} {v:.4f}" for k, v in loss_first(validation))
        self._print(f"epoch {epoch + 1} done: loss {logs.get('loss', 0.0):.4f} {metrics}".rstrip())

    def _print(self, line: str) -> None:
        if self._interactive:
            self._stream.write("\r\033[K")  # clear the bar before a permanent line
        self._stream.write(line + "\n")
        self._stream.flush()
