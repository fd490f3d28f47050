"""Sharded optimizer state's arithmetic: who owns which variable, the rounds the collectives take,
and which optimizer variables are whose, for every Keras optimizer. (Training with it, on real
workers, is in test_multiworker and test_resize.)"""

from __future__ import annotations

import keras
import pytest

from distaccum import shards, state


def test_each_variable_goes_largest_first_to_the_least_loaded_worker():
    sizes = [100, 10, 60, 50, 5, 5]
    owner = shards.owners(sizes, 2)
    assert owner == [0, 0, 1, 1, 0, 1]
    loads = [sum(s for s, o in zip(sizes, owner) if o == rank) for rank in range(2)]
    assert loads == [115, 115]


def test_one_dominant_variable_sets_the_largest_share_and_the_rest_go_elsewhere():
    sizes = [1000, 10, 10, 10]  # an Embedding beside small layers
    assert shards.owners(sizes, 3) == [0, 1, 2, 1]


def test_every_worker_owns_a_variable_when_sizes_tie():
    assert sorted(shards.owners([8, 8, 8, 8], 4)) == [0, 1, 2, 3]


def test_rounds_cover_each_variable_once_with_its_owner_within_the_bound():
    sizes = [40, 8, 8, 30, 8, 8, 8, 100]
    owner = shards.owners(sizes, 2)
    plan = shards.rounds(sizes, owner, 2, limit=32)
    seen = [i for members in plan for part in members for i in part]
    assert sorted(seen) == list(range(len(sizes)))
    for members in plan:
        for rank, part in enumerate(members):
            assert all(owner[i] == rank for i in part)
            assert part == sorted(part)
        # A round holds at most the bound, or one larger variable alone.
        held = [i for part in members for i in part]
        assert sum(sizes[i] for i in held) <= 32 or len(held) == 1
    assert [len(members[0]) + len(members[1]) for members in plan] == [1, 1, 1, 2, 1, 2]


class _Workers:
    """The backend's answers about the job, for ownership alone (no collective runs)."""

    def __init__(self, num_workers, rank=0):
        self._num_workers, self._rank = num_workers, rank

    def num_workers(self):
        return self._num_workers

    def rank(self):
        return self._rank


def test_more_workers_than_variables_is_refused_in_one_line():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="2 trainable variables for 4 workers") as raised:
        shards.ShardedState(_Workers(4), model.trainable_variables)
    assert "\n" not in str(raised.value)


OPTIMIZERS = {
    "SGD": lambda: keras.optimizers.SGD(momentum=0.9),
    "Adam, amsgrad": lambda: keras.optimizers.Adam(amsgrad=True),
    "AdamW, moving averages": lambda: keras.optimizers.AdamW(use_ema=True),
    "Adafactor": keras.optimizers.Adafactor,
    "Lion": keras.optimizers.Lion,
    "Lamb": keras.optimizers.Lamb,
    "Nadam": keras.optimizers.Nadam,
    "RMSprop, centered": lambda: keras.optimizers.RMSprop(centered=True, momentum=0.5),
    "Adagrad": keras.optimizers.Adagrad,
    "Adadelta": keras.optimizers.Adadelta,
    "Adamax": keras.optimizers.Adamax,
    "Ftrl": keras.optimizers.Ftrl,
    "Muon": keras.optimizers.Muon,
    "loss scaling": lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()),
}


def _model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_every_optimizer_variable_is_global_or_one_variables_and_shards_agree(make):
    """Built on all variables or on any share, every optimizer variable is either global (the
    same on every worker) or one variable's, its shape that variable's or less; and a share's
    state lists the whole optimizer's for those variables, in the same order."""
    model = _model()
    variables = model.trainable_variables
    whole = make()
    whole.build(variables)
    everything = state.TrainingState(model, whole, range(len(variables)))
    assert len(everything.entries()) == len(model.variables) + len(whole.variables)
    for slot in everything.slots:
        assert len(slot.shape) <= len(variables[slot.variable].shape)
    assert {v.name for v in everything.global_variables} >= {"iteration"}
    for share in ([0, 3], [1, 2]):
        part = make()
        part.build([variables[i] for i in share])
        sharded = state.TrainingState(model, part, share)
        assert [tuple(v.shape) for v in sharded.global_variables] == [
            tuple(v.shape) for v in everything.global_variables]
        assert [(s.variable, s.position, s.shape) for s in sharded.slots] == [
            (s.variable, s.position, s.shape) for s in everything.slots if s.variable in share]


def test_a_variable_of_more_dimensions_than_the_exchange_describes_is_refused_in_one_line():
    model = keras.Sequential([keras.Input((1,) * 8), keras.layers.Dense(2)])
    model.add_weight(shape=(1,) * 9, name="deep")
    optimizer = keras.optimizers.SGD(momentum=0.9)
    optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="at most 8 dimensions: .*deep has 9") as raised:
        state.TrainingState(model, optimizer, range(3), backend=_Workers(2))
    assert "\n" not in str(raised.value)
