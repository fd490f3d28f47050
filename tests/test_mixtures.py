"""A weighted mixture of sources: each update holds every source's share to the sample, the
same samples for any worker count with the same global batch, sources turning over on their own,
Keras's large-batch steps, and one line for each bad weight or source."""

from __future__ import annotations

import types
import sys

import keras
import numpy as np
import pytest

import distaccum
from distaccum import comm, order, sources
from distaccum import config as config_module
from distaccum.mixtures import apportion

import scenarios

MICRO_BATCH_SIZE, K = 4, 2
# Two sources of other sizes: x holds the sample's id (source b's from 1000 on).
A_SAMPLES, B_SAMPLES = 100, 30


def _arrays(first: int, count: int):
    ids = np.arange(first, first + count, dtype="float32")
    return np.stack([ids, np.sin(ids)], axis=1), (ids % 3).astype("int64")


def _mixture(weights=(3, 1), micro_batch_size=MICRO_BATCH_SIZE, partitions=order.DEFAULT_PARTITIONS):
    return distaccum.mixture(
        [distaccum.micro_batches(_arrays(0, A_SAMPLES), micro_batch_size, seed=1,
                                 partitions=partitions),
         distaccum.micro_batches(_arrays(1000, B_SAMPLES), micro_batch_size, seed=2,
                                 partitions=partitions)], weights)


@pytest.mark.parametrize("weights, batch", [((3, 1), 32), ((0.7, 0.2, 0.1), 256), ((1, 1), 7),
                                            ((5, 1, 1), 96)])
def test_apportion_gives_each_source_its_share_and_each_partition_its_even_split(weights, batch):
    dealt = apportion(weights, batch, 48)
    exact = np.asarray(weights) / sum(weights) * batch
    assert dealt.sum() == batch and (np.abs(dealt.sum(axis=1) - exact) < 1).all()
    np.testing.assert_array_equal(dealt.sum(axis=0), order.even_split(batch, 48))
    for workers in (1, 2, 3, 4, 6, 8):  # every worker count dividing both: B / N each
        if batch % workers == 0:
            per_worker = dealt.reshape(len(weights), workers, -1).sum(axis=(0, 2))
            assert (per_worker == batch // workers).all()


def _windows(mixture, epoch: int, k: int) -> list[np.ndarray]:
    """Each update's sample ids (x[:, 0]) of this worker's micro-batches."""
    ids = [x[:, 0] for x, _ in mixture.epoch(epoch, k).as_numpy_iterator()]
    return [np.concatenate(ids[u:u + k]) for u in range(0, len(ids), k)]


def test_every_update_holds_each_sources_share_and_a_source_turns_over_on_its_own():
    mixture = _mixture()
    plan = mixture.plan(K)
    assert plan.updates_per_epoch == -(-(A_SAMPLES + B_SAMPLES) // 8) == 17
    run = []
    for epoch in (1, 2):
        updates = _windows(mixture, epoch, K)
        assert len(updates) == 17
        for ids in updates:  # 6 of a's, 2 of b's in every update of 8
            assert (ids < 1000).sum() == 6 and (ids >= 1000).sum() == 2
        run += updates
    # Over the run (34 updates): a (100 samples, 6 per update) turns over every 16 updates,
    # b (30 samples, 2 per update) every 15, each turn every sample once but the 4 a's order
    # leaves out: a turn is its source's epoch, on another order each time.
    for first, per_turn, low, high in ((0, 16, 0, 1000), (1, 15, 1000, 2000)):
        for turn in range(len(run) // per_turn):
            ids = np.concatenate(run[turn * per_turn:(turn + 1) * per_turn])
            mine = ids[(ids >= low) & (ids < high)].tolist()
            assert len(mine) == len(set(mine)) == (96 if low == 0 else 30), (turn, first)
    first_turn_of_a = np.concatenate(run[:16])
    second_turn_of_a = np.concatenate(run[16:32])
    assert not np.array_equal(first_turn_of_a, second_turn_of_a)


def test_same_samples_per_update_on_two_workers_and_a_resumed_epoch_reads_on(monkeypatch):
    one = _windows(_mixture(), 2, 4)
    halves = []
    for rank in (0, 1):
        monkeypatch.setattr(comm, "num_workers", lambda: 2)
        monkeypatch.setattr(comm, "rank", lambda rank=rank: rank)
        mixture = _mixture()
        windows = _windows(mixture, 2, 2)
        assert all(len(w) == 8 for w in windows)  # B / N each, every update
        halves.append(windows)
        resumed = [x[:, 0] for x, _ in mixture.epoch(2, 2, first_update=5).as_numpy_iterator()]
        np.testing.assert_array_equal(np.concatenate(resumed), np.concatenate(windows[5:]))
    for u, ids in enumerate(one):
        np.testing.assert_array_equal(np.sort(ids), np.sort(np.concatenate(
            [halves[0][u], halves[1][u]])))


def _classifier() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])


SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.rounding
def test_training_on_a_mixture_takes_keras_large_batch_steps_on_its_windows():
    mixture = _mixture()
    model = _classifier()
    trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.1), loss=SCCE, accumulation_steps=K)
    history = trainer.fit(mixture, epochs=2)
    everything = tuple(np.concatenate(parts) for parts in zip(_arrays(0, A_SAMPLES),
                                                              _arrays(1000, B_SAMPLES)))
    row_of = {int(i): r for r, i in enumerate(everything[0][:, 0])}
    reference, optimizer = _classifier(), keras.optimizers.SGD(0.1)
    windows = [w for epoch in (1, 2) for w in _windows(mixture, epoch, K)]
    micro_batches = [(everything[0][rows], everything[1][rows], None)
                     for ids in windows for rows in [np.array([row_of[int(i)] for i in ids])]
                     for rows in np.split(rows, range(MICRO_BATCH_SIZE, len(rows),
                                                      MICRO_BATCH_SIZE))]
    updates = scenarios.reference_training(reference, optimizer, SCCE, [micro_batches], K,
                                           epochs=1)
    assert history.update_steps == updates == 34
    scenarios.assert_weights_close(scenarios.weights_of(model), scenarios.weights_of(reference))


@pytest.mark.parametrize("build, message", [
    (lambda: _mixture(weights=(1, 0)), r"^source 1: a weight must be a number > 0\. "
                                       r"Received: weight=0$"),
    (lambda: _mixture(weights=(1, float("nan"))), r"^source 1: a weight must be a number > 0"),
    (lambda: distaccum.mixture([distaccum.micro_batches(_arrays(0, 10), 4),
                                distaccum.micro_batches(_arrays(0, 10), 2)], [1, 1]),
     r"^a mixture's sources need one micro_batch_size and one partitions"),
    (lambda: distaccum.mixture([distaccum.micro_batches(_arrays(0, 10), 4),
                                distaccum.micro_batches((np.zeros((10, 2), "float64"),
                                                         np.zeros(10, "int64")), 4)], [1, 1]),
     r"^source 1 gives samples of .*float64.*, source 0 of .*float32"),
    (lambda: _mixture(weights=(1000, 1)).plan(K),
     r"^source 1: weight 1 gives it 0\.01 of an update's 8 samples, which rounds to none"),
    (lambda: _mixture(weights=(1, 10), micro_batch_size=8).plan(8),
     r"^source 1 holds 30 samples, fewer than the 58 its weight gives it in every update$"),
], ids=["zero", "nan", "micro_batch_size", "forms", "rounds_to_none", "too_few"])
def test_bad_weight_or_sources_are_one_line(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_config_mixes_sources_by_weight_and_refuses_what_cannot_be_mixed(monkeypatch, tmp_path):
    class Rows:  # a random-access source
        arrays = _arrays(1000, B_SAMPLES)

        def __len__(self):
            return B_SAMPLES

        def __getitem__(self, index):
            return self.arrays[0][index], self.arrays[1][index]

    module = types.ModuleType("user_mixture")
    module.rows = Rows
    module.dataset = lambda: __import__("tensorflow").data.Dataset.from_tensor_slices(
        _arrays(0, 8))
    monkeypatch.setitem(sys.modules, "user_mixture", module)
    np.savez(tmp_path / "a.npz", x=_arrays(0, A_SAMPLES)[0], y=_arrays(0, A_SAMPLES)[1])

    def config(dataset):
        return config_module.TrainConfig(dataset=dataset, micro_batch_size=MICRO_BATCH_SIZE,
                                         epochs=1)

    mixed = [{"dataset": str(tmp_path / "a.npz"), "weight": 3},
             {"dataset": "user_mixture:rows", "weight": 1}]
    loaded = sources.load_data(config(mixed))
    assert isinstance(loaded.train, distaccum.Mixture) and loaded.validation is None
    assert loaded.train.num_samples == [A_SAMPLES, B_SAMPLES]
    assert loaded.notes[-1] == (f"distaccum: dataset: a mixture of 2 sources: 75% "
                                f"{tmp_path / 'a.npz'}, 25% user_mixture:rows of every update; "
                                "no validation set (the sources' own are not used: give "
                                "validation_dataset)")
    with pytest.raises(config_module.ConfigError, match=r"^dataset\[1\]: a mixture takes "
                       r"sources read in the order's windows .*Received: "
                       r"dataset\[1\]='user_mixture:dataset'$"):
        sources.load_data(config([mixed[0], {"dataset": "user_mixture:dataset", "weight": 1}]))
    for entry, message in (({"dataset": "digits", "weight": -1},
                            r"^dataset\[1\]\.weight: must be a number > 0"),
                           ({"dataset": "digits"}, r"^dataset\[1\]: a mixture's entry is "),
                           ({"dataset": "nothing", "weight": 1}, r"^dataset\[1\]: must be one of")):
        with pytest.raises(config_module.ConfigError, match=message):
            config([mixed[0], entry])


def test_cli_exits_2_in_one_line_for_a_weight_that_is_not_positive(capsys, tmp_path):
    from distaccum import cli
    code = cli.main(["train", "--set", "dataset=[{dataset: digits, weight: 1}, "
                     "{dataset: digits, weight: 0}]", "--set", "epochs=1",
                     "--set", f"logdir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT and err.count("\n") == 1, err
    assert err.startswith("distaccum: error: dataset[1].weight: must be a number > 0"), err
