"""Keras metrics whose values count every worker's samples, not rank 0's shard.

Keras's metrics keep sums as state (totals and counts, confusion-matrix counts for AUC, ...), so the
state over all workers is the sum of the workers' states. Each worker updates a *window* copy of
the metrics on its micro-batches; the update step sends the window's states in its one grouped
allreduce and adds the reduced states to the *running* copy, whose `result()` is then the value
over every worker's samples, identical on every rank. Validation sums its states in the
validation collective. So metrics cost no collective of their own.

Metrics are resolved as `model.compile(metrics=..., weighted_metrics=...)` resolves them (names
such as "accuracy" pick the variant matching the labels; one list, or one per output).
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf
from keras.src.trainers.compile_utils import CompileMetrics  # Keras's own name resolution


def _fresh(metrics):
    """The same metrics with states of their own: metric objects are rebuilt from their config."""
    if isinstance(metrics, keras.metrics.Metric):
        return metrics.__class__.from_config(metrics.get_config())
    if hasattr(metrics, "keys"):
        return {name: _fresh(value) for name, value in dict(metrics).items()}
    if isinstance(metrics, (list, tuple)):
        return [_fresh(m) for m in metrics]
    return metrics


def _dummy(spec) -> tf.Tensor:
    """A one-sample tensor of `spec`'s shape and dtype (unknown sizes become 1)."""
    return tf.zeros([1] + [d or 1 for d in spec.shape[1:]], spec.dtype)


class GlobalMetrics:
    """Owns the window and running copies of the metrics, and their exchange.

    Args:
        metrics, weighted_metrics: as `model.compile` takes them.
        output_names: the model's output names.
    """

    def __init__(self, metrics, weighted_metrics, output_names: Sequence[str]) -> None:
        names = list(output_names) if len(output_names) > 1 else None
        self._running = CompileMetrics(metrics, weighted_metrics, output_names=names)
        self._window = CompileMetrics(_fresh(metrics), _fresh(weighted_metrics), output_names=names)

    def build(self, model: keras.Model, element_spec) -> None:
        """Resolve names and create states, eagerly, from one dummy sample of the data's spec."""
        x, y = (tf.nest.map_structure(_dummy, spec) for spec in element_spec[:2])
        y_pred = model(x, training=False)
        for copy in (self._running, self._window):
            copy.build(y, y_pred)

    def update(self, y_true, y_pred, sample_weight) -> None:
        """Add a micro-batch to this worker's window states (no communication)."""
        self._window.update_state(y_true, y_pred, sample_weight)

    def window_states(self) -> list[tf.Tensor]:
        return [tf.cast(v.value, tf.float32) for v in self._window.variables]

    def add_reduced(self, states: Sequence[tf.Tensor]) -> None:
        """Add the window's states summed over workers to the running states; empty the window."""
        for variable, value in zip(self._running.variables, states):
            variable.assign_add(tf.cast(value, variable.dtype))
        self.drop_window()

    def drop_window(self) -> None:
        """Empty the window states without adding them (a window that was not applied)."""
        for variable in self._window.variables:
            variable.assign(tf.zeros_like(variable))

    @property
    def running_variables(self) -> list:
        """The running states: what every worker holds alike."""
        return list(self._running.variables)

    def results(self) -> dict[str, float]:
        """The running values over every worker's samples since the last `reset`."""
        return {name: float(value) for name, value in self._running.result().items()}

    def reset(self) -> None:
        """Start counting afresh (each epoch, as Keras does)."""
        self._running.reset_state()

    def evaluation_results(self, summed_states: Sequence[tf.Tensor]) -> dict[str, float]:
        """The window copy's values for states summed over workers (validation), then empty it."""
        for variable, value in zip(self._window.variables, summed_states):
            variable.assign(tf.cast(value, variable.dtype))
        results = {name: float(value) for name, value in self._window.result().items()}
        self._window.reset_state()
        return results
