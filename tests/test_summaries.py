"""TensorBoard logs of a real 2-worker run, read back with TensorBoard's own reader."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.util import tensor_util

from conftest import REPO_ROOT, run_script
from distaccum import catalog

pytestmark = pytest.mark.multiworker

DIGITS = str(REPO_ROOT / "distaccum" / "configs" / "digits.yaml")
UPDATES_PER_EPOCH = 12  # ceil(ceil(719 / 32) / 2) for 1437 samples on 2 workers at k = 2


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """2 workers, 2 epochs, learning rate 0: the weights never move, so every logged loss can be
    recomputed from the saved model alone."""
    logdir = tmp_path_factory.mktemp("run")
    run_script(
        "horovodrun", "-m", "distaccum.cli", "train", "--config", DIGITS,
        "--set", "learning_rate=0", "--set", "lr_schedule=constant", "--set", "warmup_steps=0",
        "--set", "epochs=2",
        "--set", f"log_interval={UPDATES_PER_EPOCH}", "--set", f"logdir={logdir}",
    )
    events = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.TENSORS: 0}
    )
    events.Reload()
    return logdir, events


def _scalars(events, tag: str) -> dict[int, float]:
    return {e.step: tensor_util.make_ndarray(e.tensor_proto).item() for e in events.Tensors(tag)}


@pytest.mark.rounding
def test_logged_loss_is_global_mean_over_all_workers_when_interval_is_one_epoch(frozen_run):
    logdir, events = frozen_run
    split = catalog.load_dataset("digits")
    model = keras.saving.load_model(logdir / "model.keras")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected_train = float(loss(split.y_train, model.predict(split.x_train, verbose=0)))
    validation_logits = model.predict(split.x_validation, verbose=0)
    expected_validation = float(loss(split.y_validation, validation_logits))
    expected_accuracy = float(np.mean(np.argmax(validation_logits, 1) == split.y_validation))
    steps = [UPDATES_PER_EPOCH, 2 * UPDATES_PER_EPOCH]
    train = _scalars(events, "train/loss")
    assert sorted(train) == steps
    for step in steps:
        assert train[step] == pytest.approx(expected_train, rel=1e-5)
        assert _scalars(events, "validation/loss")[step] == pytest.approx(expected_validation, rel=1e-5)
        assert _scalars(events, "validation/accuracy")[step] == pytest.approx(expected_accuracy, abs=1e-6)


def test_every_documented_tag_is_logged_at_update_steps(frozen_run):
    _, events = frozen_run
    tags = set(events.Tags()["tensors"])
    expected = {
        "train/loss", "train/learning_rate", "train/samples_per_second",
        "train/gradient_global_norm", "train/skipped_updates", "communication/allreduce_tensors",
        "communication/allreduce_bytes", "time/compute_seconds", "time/communication_seconds",
        "validation/loss", "validation/accuracy", "config",
    }
    assert expected <= tags
    assert _scalars(events, "train/learning_rate") == {12: 0.0, 24: 0.0}
    assert all(v > 0 for v in _scalars(events, "train/samples_per_second").values())
    assert all(v > 0 for v in _scalars(events, "time/compute_seconds").values())


def test_collective_counts_grow_one_group_per_update(frozen_run):
    _, events = frozen_run
    model = catalog.build_model("digits_mlp", 64, seed=0)
    # + loss sum, weight sum, sample count; the accuracy metric's total and count; the votes
    # (stop, cancel, change and each of the 2 ranks' bad micro-batch, one tensor of five)
    tensors_per_update = len(model.trainable_variables) + 3 + 2 + 1
    bytes_per_update = 4 * (model.count_params() + 3 + 2 + 5)
    assert _scalars(events, "communication/allreduce_tensors") == {
        12: 12 * tensors_per_update, 24: 24 * tensors_per_update}
    assert _scalars(events, "communication/allreduce_bytes") == {
        12: 12 * bytes_per_update, 24: 24 * bytes_per_update}


def test_config_is_logged_once_as_text(frozen_run):
    _, events = frozen_run
    [config] = events.Tensors("config")
    text = config.tensor_proto.string_val[0].decode()
    assert config.step == 0 and "learning_rate: 0" in text
    # As applied on 2 workers: digits.yaml gives the global batch, the log says k too.
    assert all(line in text.splitlines() for line in (
        "global_batch_size: 128", "accumulation_steps: 2", "num_workers: 2")), text


def test_resumed_writer_hides_steps_logged_after_checkpoint(tmp_path):
    import time

    from distaccum.history import IntervalRecord
    from distaccum.summaries import TensorBoardWriter

    def log(writer, steps, loss):
        for step in steps:
            writer.on_log(IntervalRecord(step, 10, 1, loss, 1, 1.0, 1.0, 0.1, 0.1, 0.1))
        writer.close()

    log(TensorBoardWriter(str(tmp_path), (0, 0)), range(1, 9), loss=1.0)  # crashed after step 8
    time.sleep(2)  # a restart comes later than the crash: event files sort by creation second
    log(TensorBoardWriter(str(tmp_path), (0, 0), resumed_from=5), range(6, 11), loss=2.0)
    # The accumulator TensorBoard's server uses (the older one never purges tensor data).
    events = plugin_event_accumulator.EventAccumulator(
        str(tmp_path), size_guidance={plugin_event_accumulator.TENSORS: 0})
    events.Reload()
    logged = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
              for e in events.Tensors("train/loss")]
    assert logged == [(s, 1.0) for s in range(1, 6)] + [(s, 2.0) for s in range(6, 11)]
