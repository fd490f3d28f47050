"""The exceptions that end training early, and how an error reads in one line.

The public ones say `distaccum` as their module, the name users catch them by
(`distaccum.BadMicroBatch`), so a traceback names them as the API does, wherever they live.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distaccum.history import History, Position


class TrainingInterrupted(Exception):
    """Training stopped at an update boundary because a worker was asked to (SIGTERM).

    Every worker raises it after the same update; the chief has saved a checkpoint there.
    """

    def __init__(self, position: Position, history: History) -> None:
        super().__init__(f"stopped by SIGTERM after update step {position.update_step}")
        self.position = position
        self.history = history


class NonFiniteGradients(RuntimeError):
    """Too many consecutive updates had NaN or Inf gradients to go on."""


class BadMicroBatch(RuntimeError):
    """A worker could not train on one of its micro-batches (wrong shape or dtype, say). It told
    the others in the update's allreduce, so every worker stops at the same update, applying
    none of that window, and names the rank, the epoch and the micro-batch."""


class ModelDataMismatch(ValueError):
    """Every worker failed on its first micro-batch: the model, its loss or a metric does not fit
    the data (shapes, label format), so any micro-batch would fail alike. Names the part that
    refuses it (a metric, the loss, a layer) when one does; nothing was applied."""


def one_line(error: Exception) -> str:
    """An error's message in one line, without what TensorFlow wraps around it: the op that
    raised it (`{{node ...}}`, `[Op:...]`) and, for an error inside a compiled step or raised
    while tracing one, the "Graph execution error:" or "in user code:" header and the traceback
    of where it was detected (the message itself comes last), and for an error raised in an
    input pipeline's function, the transformation and iterator. TensorFlow quotes a record's raw
    bytes in some messages and then fails to decode its own text (`UnicodeDecodeError`): the
    text is read with the bytes replaced."""
    if isinstance(error, UnicodeDecodeError) and isinstance(error.object, bytes):
        text = error.object.decode("utf-8", "replace")
    else:
        text = str(error)
    text = re.sub(r"\[\[\{\{[^}]*\}\}\]\]|\{\{[^}]*\}\}|\[Op:[^\]]*\]", "", text)
    # A Python error inside an input pipeline's function: what raised it, not where tf.data was.
    text = re.sub(r"Error in user-defined function passed to \S+ transformation with iterator: "
                  r"\S+: ", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0] in ("Graph execution error:", "in user code:"):  # then a traceback
        return lines[-1][:300]
    return lines[0][:300] if lines else type(error).__name__


for _public in (TrainingInterrupted, NonFiniteGradients, BadMicroBatch, ModelDataMismatch):
    _public.__module__ = "distaccum"
