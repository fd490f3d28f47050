"""Checkpoints: atomic, verified, the last few kept, damaged ones refused or skipped with a warning."""

from __future__ import annotations

import json
import threading
import types

import keras
import numpy as np
import pytest

import scenarios
from distaccum import checkpoint, state
from distaccum.checkpoint import OBJECTIVE, CheckpointError, CheckpointManager
from distaccum.comm import pieces
from distaccum.config import ConfigError
from distaccum.history import Position

SETTINGS = {"accumulation_steps": 2, "micro_batch_size": 4, "num_workers": 1,
            "global_batch_size": 8, "seed": 0}


def _state(seed: int = 7):
    model = scenarios.make_model(seed)
    optimizer = keras.optimizers.Adam(0.01)
    optimizer.build(model.trainable_variables)
    optimizer.iterations.assign(seed)
    return list(model.variables) + list(optimizer.variables)


def _values(variables) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in variables]


def test_restore_gives_back_bitwise_state_and_position_when_saved(tmp_path):
    manager = CheckpointManager(tmp_path)
    saved = _state(seed=7)
    manager.save(Position(12, 2, 3), saved, SETTINGS)
    target = _state(seed=8)
    restored = manager.restore_latest(target, SETTINGS)
    assert restored.position == Position(12, 2, 3)
    for got, expected in zip(_values(target), _values(saved)):
        np.testing.assert_array_equal(got, expected)


def test_large_variables_are_written_in_pieces_as_npz_of_whole_arrays(tmp_path, monkeypatch):
    # 64-byte pieces: every kernel is read in ranges of its rows, and no whole copy of one is made.
    monkeypatch.setattr(pieces, "GROUP_BYTES", 64)
    manager = CheckpointManager(tmp_path)
    saved = _state(seed=7)
    assert max(len(pieces.pieces_of(v)) for v in saved) > 1
    path = manager.save(Position(12, 2, 3), saved, SETTINGS)
    with np.load(path / "state.npz") as arrays:  # what np.savez would have written
        for i, expected in enumerate(_values(saved)):
            np.testing.assert_array_equal(arrays[f"arr_{i}"], expected)
    target = _state(seed=8)
    manager.restore_latest(target, SETTINGS)
    for got, expected in zip(_values(target), _values(saved)):
        np.testing.assert_array_equal(got, expected)


def test_only_last_checkpoints_are_kept_when_saving_many(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    variables = _state()
    for step in (5, 10, 15, 20, 25):
        manager.save(Position(step, 1, step), variables, SETTINGS)
    assert [p.name for p in manager.checkpoints()] == [
        "update-000000015", "update-000000020", "update-000000025"]
    assert not list(tmp_path.glob(".staging-*"))


def test_restore_returns_none_when_directory_is_empty(tmp_path):
    assert CheckpointManager(tmp_path).restore_latest(_state(), SETTINGS) is None


def test_truncated_latest_falls_back_to_previous_with_warning(tmp_path, capsys):
    manager = CheckpointManager(tmp_path)
    older, newer = _state(seed=7), _state(seed=9)
    manager.save(Position(5, 1, 5), older, SETTINGS)
    latest = manager.save(Position(10, 1, 10), newer, SETTINGS)
    state = latest / "state.npz"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    target = _state(seed=8)
    restored = manager.restore_latest(target, SETTINGS)
    assert restored.position.update_step == 5
    for got, expected in zip(_values(target), _values(older)):
        np.testing.assert_array_equal(got, expected)
    warning = capsys.readouterr().err
    assert "update-000000010" in warning and "checksum" in warning


def test_restore_refuses_when_every_checkpoint_is_damaged(tmp_path):
    manager = CheckpointManager(tmp_path)
    latest = manager.save(Position(5, 1, 5), _state(), SETTINGS)
    (latest / "meta.json").write_text("{ not json")
    target = _state(seed=8)
    before = _values(target)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        manager.restore_latest(target, SETTINGS)
    for got, expected in zip(_values(target), before):  # nothing half-assigned
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("num_workers, k, micro_batch_size", [(2, 1, 4), (4, 1, 2), (1, 8, 1)],
                         ids=["2x1x4", "4x1x2", "1x8x1"])
def test_restore_accepts_other_workers_and_micro_batches_when_global_batch_is_the_same(
        tmp_path, num_workers, k, micro_batch_size):
    manager = CheckpointManager(tmp_path)
    manager.save(Position(5, 1, 5), _state(seed=7), SETTINGS)
    resized = {**SETTINGS, "num_workers": num_workers, "accumulation_steps": k,
               "micro_batch_size": micro_batch_size}
    target = _state(seed=8)
    restored = manager.restore_latest(target, resized)
    assert restored.position == Position(5, 1, 5) and restored.settings == SETTINGS
    for got, expected in zip(_values(target), _values(_state(seed=7))):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("saved", [SETTINGS, {k: v for k, v in SETTINGS.items()
                                              if k != "global_batch_size"}],
                         ids=["global_batch_size_saved", "first_format_derives_it"])
def test_restore_refuses_checkpoint_of_other_global_batch_naming_the_one_to_set(tmp_path, saved):
    manager = CheckpointManager(tmp_path)
    manager.save(Position(5, 1, 5), _state(), saved)
    with pytest.raises(ConfigError, match=r"global_batch_size=8; resuming needs the same \(set "
                       r"global_batch_size=8 to resume .*Received: global_batch_size=16"):
        manager.restore_latest(_state(), {**SETTINGS, "accumulation_steps": 4,
                                          "global_batch_size": 16})


def test_restore_refuses_data_of_another_size_and_takes_a_checkpoint_without_the_count(tmp_path):
    manager = CheckpointManager(tmp_path)
    counted = {**SETTINGS, "dataset": "my_project.data:load_rows", "training_samples": 426}
    manager.save(Position(5, 1, 5), _state(), counted)
    with pytest.raises(ConfigError, match=r"^dataset: the checkpoint in .* was trained on 426 "
                       r"samples, this dataset holds 425 samples; .*Received: dataset=.my_project"):
        manager.restore_latest(_state(), {**counted, "training_samples": 425})
    assert manager.restore_latest(_state(), counted).position == Position(5, 1, 5)
    uncounted = {k: v for k, v in counted.items() if k != "training_samples"}
    manager.save(Position(10, 1, 10), _state(), uncounted)  # written before the count was kept
    assert manager.restore_latest(_state(), counted).position == Position(10, 1, 10)


def test_restore_refuses_other_files_of_the_same_count_and_image_options(tmp_path):
    manager = CheckpointManager(tmp_path)
    listed = {**SETTINGS, "dataset": "/data/train/", "training_samples": 20,
              "training_files": "0123456789abcdef", "image_options": {"image_size": [8, 8]}}
    manager.save(Position(5, 1, 5), _state(), listed)
    with pytest.raises(ConfigError, match=r"^dataset: the checkpoint in .* was trained on files "
                       r"listed as 0123456789abcdef \(a digest\), this dataset holds files "
                       r"listed as fedcba9876543210 \(a digest\); resuming needs the same data"):
        manager.restore_latest(_state(), {**listed, "training_files": "fedcba9876543210"})
    with pytest.raises(ConfigError, match=r"^image_options: the checkpoint .* was written with "
                       r"image_options=\{'image_size': \[8, 8\]\}"):
        manager.restore_latest(_state(), {**listed, "image_options": {"image_size": [9, 9]}})
    assert manager.restore_latest(_state(), listed).position == Position(5, 1, 5)


def test_restore_refuses_checkpoint_of_other_model_shape(tmp_path, capsys):
    manager = CheckpointManager(tmp_path)
    manager.save(Position(5, 1, 5), _state()[:-1], SETTINGS)
    with pytest.raises(CheckpointError, match="variables saved"):
        manager.restore_latest(_state(), SETTINGS)


def test_check_writable_names_directory_when_it_is_a_file(tmp_path):
    blocker = tmp_path / "checkpoints"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="not writable.*checkpoints"):
        CheckpointManager(blocker).check_writable()


def test_checkpoint_of_the_sum_of_weights_rule_resumes_with_one_line_saying_the_objective_changed(
        tmp_path, capsys):
    manager = CheckpointManager(tmp_path)
    now = {**SETTINGS, "objective": OBJECTIVE}
    manager.save(Position(5, 1, 5), _state(), SETTINGS)  # written before the record existed
    assert manager.restore_latest(_state(), now).position == Position(5, 1, 5)
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("distaccum: warning: the checkpoint in ") and "\n" not in warning
    assert "divided by the sum of their weights" in warning and "Keras reduction" in warning
    manager.save(Position(10, 1, 10), _state(), now)
    assert manager.restore_latest(_state(), now).position == Position(10, 1, 10)
    assert capsys.readouterr().err == ""


def test_checkpoint_refuses_another_loss_and_takes_a_missing_loss_args_as_none(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(Position(5, 1, 5), _state(), {**SETTINGS, "loss": "mse"})  # before loss_args
    assert manager.restore_latest(_state(), {**SETTINGS, "loss": "mse", "loss_args": {}})
    with pytest.raises(ConfigError, match=r"^loss_args: the checkpoint .* written with "
                                          r"loss_args=\{\}.*Received: loss_args=\{'reduction': 'sum'\}"):
        manager.restore_latest(_state(), {**SETTINGS, "loss": "mse",
                                          "loss_args": {"reduction": "sum"}})
    with pytest.raises(ConfigError, match=r"^loss: .*loss='mse'.*Received: loss='mae'"):
        manager.restore_latest(_state(), {**SETTINGS, "loss": "mae", "loss_args": {}})


def test_resume_with_another_learning_rate_is_refused_naming_both(tmp_path):
    # Issue 35, row 6: the checkpoint's rate went on while the config asked another.
    manager = CheckpointManager(tmp_path)
    manager.save(Position(5, 1, 5), _state(), {**SETTINGS, "learning_rate": 0.003})
    with pytest.raises(ConfigError, match=r"^learning_rate: .* written with "
                                          r"learning_rate=0.003.*Received: learning_rate=0.0001"):
        manager.restore_latest(_state(), {**SETTINGS, "learning_rate": 0.0001})


def _as_format_1(path) -> None:
    """Mark a checkpoint as the first format wrote it (model, then `optimizer.variables`)."""
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format": 1}))


def test_format_1_checkpoint_restores_model_then_optimizer_variables_when_not_sharded(tmp_path):
    manager = CheckpointManager(tmp_path)
    saved = _state(seed=7)  # model, then optimizer.variables: the first format's order
    _as_format_1(manager.save(Position(5, 1, 5), saved, SETTINGS))
    target = _state(seed=8)
    # In today's order the same variables would not fit: the first format's order is used.
    restored = manager.restore_latest(target[::-1], SETTINGS, legacy=target)
    assert restored.position == Position(5, 1, 5)
    for got, expected in zip(_values(target), _values(saved)):
        np.testing.assert_array_equal(got, expected)


def test_format_1_checkpoint_is_refused_naming_the_way_when_sharded(tmp_path):
    manager = CheckpointManager(tmp_path)
    _as_format_1(manager.save(Position(5, 1, 5), _state(), SETTINGS))
    with pytest.raises(CheckpointError, match="format 1.*resume it once without, then switch "
                                              "it on"):
        manager.restore_latest(_state(), SETTINGS)


class _Pair:
    """One of two workers in this process: `gather_all` meets the other's call (a barrier)
    and gives each both tensors, as a real allgather would."""

    def __init__(self, rank: int, meeting: dict) -> None:
        self._rank, self._meeting = rank, meeting

    def rank(self) -> int:
        return self._rank

    def num_workers(self) -> int:
        return 2

    def gather_all(self, tensors, name):
        self._meeting[self._rank] = tensors
        self._meeting["barrier"].wait()
        both = [self._meeting[0], self._meeting[1]]
        self._meeting["barrier"].wait()
        return [[worker[i] for worker in both] for i in range(len(tensors))]

    def broadcast(self, tensors, root=0):
        return [from_all[root] for from_all in self.gather_all(tensors, "broadcast")]


def test_another_workers_slot_is_written_whole_from_its_ranges_of_rows(tmp_path, monkeypatch):
    """Sharded state: a slot worker 1 holds travels to the chief in ranges of its rows (here
    64 bytes each) and lands in the checkpoint as one array, bit for bit; restored, it travels
    back to worker 1 the same way."""
    monkeypatch.setattr(state, "TRANSFER_BYTES", 64)
    remote = np.arange(50 * 3, dtype=np.float32).reshape(50, 3) * 1.5
    slot = state.Slot(0, 0, remote.shape, "float32", owner=1)
    meeting = {"barrier": threading.Barrier(2)}
    held = {0: {}, 1: {(0, 0): keras.Variable(remote)}}
    transfers = [state.SlotTransfer(_Pair(rank, meeting), types.SimpleNamespace(
        model_variables=[], global_variables=[], slots=[slot], local=held[rank], rank=rank))
        for rank in (0, 1)]
    other = threading.Thread(target=lambda: [None for _ in transfers[1].gather()])
    other.start()
    path = CheckpointManager(tmp_path).save(Position(1, 1, 1), [state.Elsewhere(slot)],
                                            SETTINGS, transfers[0].gather())
    other.join()
    np.testing.assert_array_equal(checkpoint.read_array(path, 0), remote)
    reads = []
    held[1][0, 0].assign(np.zeros_like(remote))
    other = threading.Thread(target=lambda: transfers[1].scatter(None))
    other.start()
    transfers[0].scatter(lambda index: reads.append(index) or checkpoint.read_array(path, index))
    other.join()
    np.testing.assert_array_equal(held[1][0, 0].numpy(), remote)
    assert reads == [0]  # the slot read from the file once, not once per range
