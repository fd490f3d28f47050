"""Keras's own callbacks with 2 real workers (`workers/train_keras_models.py`): decisions taken
alike on every rank from global logs, files written by the chief only, and a stop requested on
one rank that stops both after the same update."""

from __future__ import annotations

import csv
import json

import keras
import pytest

import distaccum
import keras_models as cases
import scenarios

pytestmark = pytest.mark.multiworker

UPDATES_PER_EPOCH = 6  # rank 0: 22 samples in micro-batches of 4, k = 1


def _phase(run, phase: str) -> list[dict]:
    return [json.loads((run / f"{phase}_rank{rank}.json").read_text()) for rank in range(2)]


def test_early_stopping_stops_every_rank_after_the_same_epoch(keras_models_run):
    ranks = _phase(keras_models_run, "callbacks")
    for saved in ranks:
        assert len(saved["history"]["loss"]) == 2  # of 6 epochs asked for
        # The stop voted at the end of epoch 2 travels in epoch 3's first update: not applied.
        assert saved["iterations"] == 2 * UPDATES_PER_EPOCH
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["history"] == ranks[1]["history"]


def test_reduce_lr_on_plateau_lowers_the_rate_alike_on_every_rank(keras_models_run):
    assert [saved["learning_rate"] for saved in _phase(keras_models_run, "callbacks")] == [0.25, 0.25]


@pytest.mark.rounding
def test_model_checkpoint_and_csv_logger_write_on_the_chief_only(keras_models_run):
    assert sorted(p.name for p in keras_models_run.glob("*.keras")) == [
        "rank0-epoch1.keras", "rank0-epoch2.keras"]
    assert not (keras_models_run / "rank1.csv").exists()
    history = _phase(keras_models_run, "callbacks")[0]["history"]
    with (keras_models_run / "rank0.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [0, 1]
    for name in ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"):
        assert [float(row[name]) for row in rows] == pytest.approx(history[name], rel=1e-6)
    saved = keras.saving.load_model(keras_models_run / "rank0-epoch2.keras")
    assert [v.tolist() for v in saved.get_weights()] == _phase(keras_models_run, "callbacks")[0]["weights"]


def test_stop_requested_on_one_rank_stops_both_after_the_same_update(keras_models_run):
    ranks = _phase(keras_models_run, "one_rank")
    for saved in ranks:
        # Rank 1 asked after update 3; update 4 carried the request and applied nothing.
        assert saved["iterations"] == 3
        assert len(saved["history"]["loss"]) == 1
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_plain_object_is_refused_as_a_callback():
    trainer = distaccum.Trainer(cases.binary_model(), keras.optimizers.SGD(0.1),
                                **cases.binary_compile_options())

    class NotACallback:
        def on_update(self, record):
            pass

    with pytest.raises(TypeError, match="keras.callbacks.Callback"):
        trainer.fit(cases.as_dataset(*cases.binary_data()), epochs=1, callbacks=[NotACallback()])


@pytest.mark.rounding
def test_history_and_early_stopping_match_keras_fit_when_one_process_accumulates():
    # Keras's own fit with batches of k micro-batches (12, then the ragged 10) is the oracle:
    # same loss and metrics per epoch, same stop, same restored weights.
    data = cases.binary_data()
    k = 3

    def fit(with_distaccum: bool):
        model = cases.binary_model()
        model.compile(optimizer=keras.optimizers.SGD(0.5), **cases.binary_compile_options())
        stop = keras.callbacks.EarlyStopping(monitor="loss", min_delta=100.0, patience=1,
                                             restore_best_weights=True)
        if with_distaccum:
            history = distaccum.Trainer.from_compiled(model, accumulation_steps=k).fit(
                cases.as_dataset(*data), epochs=5, callbacks=[stop])
        else:
            history = model.fit(data[0], data[1], batch_size=4 * k, epochs=5, callbacks=[stop],
                                shuffle=False, verbose=0)
        return model, history

    ours, our_history = fit(True)
    theirs, their_history = fit(False)
    assert len(our_history.history["loss"]) == 2
    assert set(our_history.history) == set(their_history.history) == {"loss", "accuracy", "auc"}
    for name, values in their_history.history.items():
        assert our_history.history[name] == pytest.approx(values, rel=1e-5), name
    scenarios.assert_weights_close(ours.get_weights(), theirs.get_weights())
