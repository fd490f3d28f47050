"""Callbacks: Keras's own, on every worker, with the logs Keras gives them.

`fit(callbacks=[...])` takes `keras.callbacks.Callback` objects (EarlyStopping, ModelCheckpoint,
CSVLogger, ReduceLROnPlateau, TerminateOnNaN, your own). What they see is what Keras's `fit`
gives them, with values over every worker's samples, so every worker's callbacks decide alike:

    on_train_begin / on_train_end
    on_epoch_begin(epoch)                       epoch is 0-based, as in Keras
    on_train_batch_end(window, logs)            once per update step: "loss" and the metrics,
                                                running means of the epoch
    on_epoch_end(epoch, logs)                   "loss", the metrics, "val_loss", "val_<metric>"

distaccum's own reporting uses two more hooks that any such callback may define (subclass
`Callback`): `on_update(UpdateRecord)` after every update, and `on_log(IntervalRecord)` every
`log_interval` updates, on every worker.

Callbacks that write files (ModelCheckpoint, CSVLogger, TensorBoard, BackupAndRestore) run on the
chief only: on every worker they would write the same files at once. Your own callbacks run
everywhere; write files from them on `distaccum.is_chief()` only.

A callback that sets `model.stop_training` on any worker stops all of them: the request travels in
the next update step's allreduce, which then applies nothing, so every worker ends with the state
it had when the callback asked, as Keras's `fit` does.
"""

from __future__ import annotations

from typing import Sequence

import keras

from distaccum import comm

_CHIEF_ONLY = (keras.callbacks.ModelCheckpoint, keras.callbacks.CSVLogger,
               keras.callbacks.TensorBoard, keras.callbacks.BackupAndRestore)


class Callback(keras.callbacks.Callback):
    """A Keras callback that also receives distaccum's records (override what you need)."""

    def on_update(self, record) -> None:
        """After every update step, with its `UpdateRecord`."""

    def on_log(self, record) -> None:
        """Every `log_interval` update steps (and after the last), with an `IntervalRecord`."""


def check_callbacks(callbacks: Sequence) -> list:
    """The callbacks this worker runs (file writers on the chief only)."""
    for callback in callbacks:
        if not isinstance(callback, keras.callbacks.Callback):
            raise TypeError(
                "callbacks must be keras.callbacks.Callback objects (subclass "
                f"distaccum.Callback for on_update/on_log). Received: {callback!r}"
            )
    return [c for c in callbacks if comm.is_chief() or not isinstance(c, _CHIEF_ONLY)]


def callback_list(callbacks: Sequence, model: keras.Model, history, epochs: int,
                  updates_per_epoch) -> keras.callbacks.CallbackList:
    """Keras's `CallbackList` over `callbacks` and `history`, bound to `model`."""
    steps = None if updates_per_epoch == float("inf") else int(updates_per_epoch)
    return keras.callbacks.CallbackList(
        [*callbacks, history], model=model, epochs=epochs, steps=steps, verbose=0)


def notify(callbacks: keras.callbacks.CallbackList, event: str, record) -> None:
    """Call distaccum's hook `event` on the callbacks that define it."""
    for callback in callbacks.callbacks:
        handler = getattr(callback, event, None)
        if handler is not None:
            handler(record)
