"""The optimizer's update in bounded groups: Keras's values, in an order that bounds memory."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from distaccum import updates

SHAPES = [(64, 32), (32,), (32, 48), (48,), (48, 16)]


def _variables():
    rng = np.random.default_rng(0)
    return [keras.Variable(rng.normal(size=shape).astype("float32")) for shape in SHAPES]


def _gradients(seed):
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(size=shape).astype("float32")) for shape in SHAPES]


OPTIMIZERS = {
    "Adam": lambda: keras.optimizers.Adam(1e-2),
    "AdamW (weight decay)": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
    "SGD, momentum, moving average, global clipping": lambda: keras.optimizers.SGD(
        1e-2, momentum=0.9, use_ema=True, global_clipnorm=1.0),
    "Adafactor": lambda: keras.optimizers.Adafactor(1e-2),
    "loss scaling": lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Lion(1e-3)),
}


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_grouped_update_equals_keras_apply_bit_for_bit(make):
    results = []
    for grouped in (False, True):
        variables, optimizer = _variables(), make()
        optimizer.build(variables)

        @tf.function(autograph=False)
        def step(gradients):
            if grouped:  # every variable a group of its own, the most reordering there is
                with updates.in_bounded_groups(optimizer, limit=1):
                    optimizer.apply(gradients, variables)
            else:
                optimizer.apply(gradients, variables)

        for seed in range(3):
            step(_gradients(seed))
        results.append([v.numpy() for v in [*variables, *optimizer.variables]])
    for plain, grouped in zip(*results):
        np.testing.assert_array_equal(grouped, plain)


def _ancestors(op) -> set:
    """Every op `op` waits for, through its inputs and control inputs."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _writes_by_variable(graph, variables) -> list[list]:
    """Each variable's assign ops in `graph` (found through the captured handle)."""
    handles = {internal.ref(): i for external, internal in graph.captures
               for i, v in enumerate(variables) if external is v.value.handle}
    writes = [[] for _ in variables]
    for op in graph.get_operations():
        if op.type.startswith("Assign") and op.inputs and op.inputs[0].ref() in handles:
            writes[handles[op.inputs[0].ref()]].append(op)
    return writes


@pytest.mark.parametrize("limit, groups", [
    (1, [[0], [1], [2], [3], [4]]),
    # 6 KiB: 64·32 floats (8 KiB) fill a group; 32 + 32·48 floats (6.1 KiB) the next.
    (6 * 1024, [[0], [1, 2], [3, 4]]),
    (updates.GROUP_BYTES, [[0, 1, 2, 3, 4]]),
])
def test_each_group_waits_for_every_update_of_the_group_before(limit, groups):
    variables, optimizer = _variables(), keras.optimizers.Adam(1e-2)
    optimizer.build(variables)

    @tf.function(autograph=False)
    def step(gradients):
        with updates.in_bounded_groups(optimizer, limit=limit):
            optimizer.apply(gradients, variables)

    graph = step.get_concrete_function(_gradients(0)).graph
    writes = _writes_by_variable(graph, variables)
    assert all(writes)
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    for later, later_writes in enumerate(writes):
        before = set().union(*(_ancestors(op) for op in later_writes))
        for earlier, earlier_writes in enumerate(writes[:later]):
            waits = all(op in before for op in earlier_writes)
            assert waits == (group_of[earlier] < group_of[later]), (earlier, later)
