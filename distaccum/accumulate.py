"""The accumulation math, with no communication in it.

The gradient applied at an update is that of the loss over every sample of the window on every
worker, a ratio of sums (`objective`: the numerator sums weighted losses, the divisor is what
the loss's reduction divides by, e.g. the count of loss elements or the sample weights' sum):

    L = sum_i(w_i * l_i) / sum_i(d_i)      =>      dL/dθ = sum_i(w_i * dl_i/dθ) / sum_i(d_i)

So each micro-step adds the gradient of the *unnormalised* sum `sum(w * l)` and its divisor's
part `sum(d)`; after those sums are added up over workers, one division gives the exact gradient.
A mean of micro-batch means would over-weight small (ragged) micro-batches; a plain sum would
scale the step with k and with the number of workers (unless the loss is itself a sum: the
`UNDIVIDED` normaliser, divided by 1 once per window).

An objective with several such ratios (outputs under different reductions, masks, layers' added
losses beside weighted data losses) keeps one gradient sum per distinct denominator
("normaliser") and divides each by its own; in the common case there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import tensorflow as tf

from distaccum.comm.pieces import zero_in_place

# The normaliser of losses reduced by `sum`: Keras's loss on the window is the sum itself.
UNDIVIDED = "sum"


def _mean_of(parts: Sequence[tf.Tensor], divisors: Sequence[tf.Tensor]) -> tf.Tensor:
    """One variable's gradient: each normaliser's sum of it over its divisor, added up (a
    normaliser whose weights sum to zero, all sample weights zero, contributes zero, not NaN)."""
    quotients = [tf.math.divide_no_nan(g, tf.cast(d, g.dtype)) for g, d in zip(parts, divisors)]
    return tf.add_n(quotients) if len(quotients) > 1 else quotients[0]


def window_divisors(divisors: Sequence[tf.Tensor], undivided: Sequence[bool]) -> list[tf.Tensor]:
    """The summed divisors as the window divides by them: 1 for `UNDIVIDED` normalisers."""
    return [tf.ones_like(d) if plain else d for d, plain in zip(divisors, undivided)]


def objective_value(numerators: Sequence[tf.Tensor], divisors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Σ numerator / divisor over normalisers: the window's loss without regularization."""
    return tf.add_n([tf.math.divide_no_nan(n, d) for n, d in zip(numerators, divisors)])


@dataclass(frozen=True)
class MicroBatchSums:
    """What one micro-batch contributes to its window: per normaliser, the gradients of its
    numerator (dense, `tf.IndexedSlices` or None), the numerators and the divisors; and the
    micro-batch's size."""

    gradients: Sequence[Sequence]
    numerators: Sequence
    divisors: Sequence
    sample_count: object


class GradientAccumulator:
    """Owns one worker's running sums over the current window.

    Holds, as non-trainable float32 `tf.Variable`s: per normaliser, one gradient sum per trainable
    variable, a loss numerator and a divisor; and the window's sample count. Does not communicate
    or apply anything: the update step reduces the sums across workers in their own memory and
    divides them there (`mean_in_place`).

    The sums are the only copy of the window's gradient: its first micro-batch overwrites them (no
    pass zeroes them between windows), its last micro-batch is added to them in the update step's
    own call (`store_window`), and the reduction, the division and the optimizer read them there.

    Sparse gradients (`tf.IndexedSlices`, e.g. from `keras.layers.Embedding`) are scattered into a
    dense sum (`scatter_add`, which costs only the rows touched); the sum is reduced and applied
    dense, once per update, so the k-fold traffic saving holds for them too. The optimizer thus
    sees the exact dense gradient of the window loss. (Keras's own sparse path differs for
    stateful optimizers: it updates moments of touched rows only and, for ids repeated in a batch,
    squares each occurrence's piece separately, so it is not a function of the gradient alone.)
    A variable that gets no gradient (not used by the loss) keeps a zero sum.

    Args:
        variables: the trainable variables, in the order gradients come.
        normalisers: names of the objective's denominators, in the order terms come.
    """

    def __init__(self, variables: Sequence, normalisers: Sequence[str] = ("samples",)) -> None:
        if not variables:
            raise ValueError("the model has no trainable variables: there is nothing to train")
        self.normalisers = list(normalisers)
        # Float32 whatever the compute dtype (mixed precision): sums of many micro-batches.
        self._gradient_sums = [
            [tf.Variable(tf.zeros(v.shape, dtype=tf.float32), trainable=False, name="gradient_sum")
             for v in variables]
            for _ in self.normalisers
        ]
        count = len(self.normalisers)
        self._statistics = [
            tf.Variable(0.0, trainable=False, dtype=tf.float32, name=name)
            for name in ["loss_sum"] * count + ["divisor"] * count + ["sample_count"]
        ]

    def add(self, sums: MicroBatchSums, *, first: bool) -> None:
        """Store one micro-batch's sums: added to the window's, or, for the window's `first`
        micro-batch, in place of the previous window's."""
        for totals, gradients in zip(self._gradient_sums, sums.gradients):
            for total, gradient in zip(totals, gradients):
                if gradient is None:
                    if first:
                        zero_in_place(total)
                elif isinstance(gradient, tf.IndexedSlices):
                    if first:
                        zero_in_place(total)
                    total.scatter_add(tf.IndexedSlices(tf.cast(gradient.values, tf.float32),
                                                       gradient.indices, gradient.dense_shape))
                elif first:
                    total.assign(tf.cast(gradient, tf.float32))
                else:
                    total.assign_add(tf.cast(gradient, tf.float32))
        for total, value in zip(self._statistics, _statistics_of(sums)):
            if first:
                total.assign(tf.cast(value, tf.float32))
            else:
                total.assign_add(tf.cast(value, tf.float32))

    @property
    def gradient_sum_variables(self) -> list[tf.Variable]:
        """The stored gradient sums, every normaliser's in turn (a reduction in place writes
        them: `comm.sum_in_place`)."""
        return [t for sums in self._gradient_sums for t in sums]

    def statistics(self) -> list[tf.Tensor]:
        """The stored numerators, then divisors (one per normaliser), then the sample count."""
        return [t.read_value() for t in self._statistics]

    def store_window(self, last: MicroBatchSums | None, *, stored: bool) -> list[tf.Tensor]:
        """The whole window in the stored sums, for a reduction in their own memory: `last`
        added to them (written over them when the window has no `stored` micro-batches; without
        either, zeros). Returns the `statistics()`."""
        if last is not None:
            self.add(last, first=not stored)
        elif not stored:
            for total in self.gradient_sum_variables + self._statistics:
                zero_in_place(total)
        return self.statistics()

    def mean_in_place(self, divisors: Sequence[tf.Tensor],
                      indices: Sequence[int] | None = None) -> list[tf.Tensor]:
        """The one division per update: each normaliser's summed gradients over its summed
        divisor, added up, written over the first normaliser's sums one variable after the
        other: the update's gradient then needs no memory beside the sums but one variable's
        mean while it is written (every variable's mean at once would be one more copy of the
        gradient, the update's peak). Returns each variable's mean (reads of the sums).

        Only the variables at `indices` (default: all), those whose sums were reduced here
        (`shards`).

        Whole variables, not pieces: writing ranges of rows into a variable made TensorFlow
        copy it whole first (measured: 1 W more on the Dense stack of Figure 4)."""
        means: list[tf.Tensor] = []
        first = self._gradient_sums[0]
        for index in range(len(first)) if indices is None else indices:
            with tf.control_dependencies(means[-1:]):
                means.append(first[index].assign(
                    _mean_of([sums[index] for sums in self._gradient_sums], divisors),
                    read_value=True))
        return means

    def split(self, statistics: Sequence[tf.Tensor]):
        """The statistics `store_window` returns (or their reduction) as (numerators, the
        divisors the window divides by, sample count)."""
        count = len(self.normalisers)
        divisors = window_divisors(statistics[count:2 * count],
                                   [n == UNDIVIDED for n in self.normalisers])
        return list(statistics[:count]), divisors, statistics[-1]


def _statistics_of(sums: MicroBatchSums) -> list:
    return [*sums.numerators, *sums.divisors, sums.sample_count]
