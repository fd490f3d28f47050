"""The order in which the optimizer updates the variables: in bounded groups, one after another.

Keras's `optimizer.apply` creates every variable's update at once, and a graph runs whatever is
ready: all the variables' temporaries (Adam makes a few of each variable's size) can be alive
together. In Keras's own step that rarely happens, since backpropagation hands the gradients over
one layer at a time. In an update step every gradient is ready at once (the window's sums), and
the update's temporaries were 1 W of the 4.2 W distaccum held per parameter (docs/design.md).

`in_bounded_groups` adds only control dependencies: each group of variables' updates waits for the
previous group's. The values are those of Keras's one `apply` call, bit for bit: its clipping,
weight decay, moving averages and iteration count run as Keras runs them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import tensorflow as tf

from distaccum import precision

# A group's temporaries stay about this size (a larger variable goes alone): the update's memory
# then no longer grows with the model.
GROUP_BYTES = 32 << 20


@contextlib.contextmanager
def in_bounded_groups(optimizer, limit: int = GROUP_BYTES) -> Iterator[None]:
    """While tracing `optimizer.apply` (or a `LossScaleOptimizer`'s): each variable's
    `update_step`, the per-variable update every Keras optimizer makes, waits for the groups
    before it; a group ends once its variables hold `limit` bytes."""
    optimizer = precision.unscaled(optimizer)
    original = optimizer.update_step
    previous: list[tf.Tensor] = []  # reads of the last group's variables, once updated
    current: list[tf.Tensor] = []
    size = 0

    def update_step(gradient, variable, learning_rate):
        nonlocal previous, current, size
        with tf.control_dependencies(previous):
            original(gradient, variable, learning_rate)
            # A read after the update (the graph orders a variable's reads after its writes).
            current.append(tf.identity(variable))
        size += variable.shape.num_elements() * variable.dtype.size
        if size >= limit:
            previous, current, size = current, [], 0

    optimizer.update_step = update_step
    try:
        yield
    finally:
        del optimizer.update_step
