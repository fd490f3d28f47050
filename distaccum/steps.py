"""A window's compiled steps: the micro-step, and the update step (reduce → normalise → clip →
apply), with the sums that carry a window from one to the other.

The `Trainer` is the public face (its arguments, `prepare`, `fit`); this module is what its
compiled calls run, in the order a window runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import keras
import tensorflow as tf

from distaccum import comm, data, diagnosis, precision, rows, shards, updates, xla
from distaccum.accumulate import (
    UNDIVIDED,
    GradientAccumulator,
    MicroBatchSums,
    objective_value,
    window_divisors,
)
from distaccum.config import ALLREDUCE_DTYPES
from distaccum.metrics import GlobalMetrics
from distaccum.objective import Objective, weight_regularizers


# The update's votes before each rank's bad micro-batch: stop, cancel, change.
VOTES = 3


@dataclass(frozen=True)
class UpdateResult:
    """What one update step reports, summed over all workers (tensors: reading them syncs).

    Attributes:
        window_loss: the objective over the window's samples on all workers (data losses, added
            losses and weight regularization, as Keras's loss on that batch).
        sample_count: number of those samples.
        gradient_norm: global norm of the reduced gradient, before clipping.
        skipped: true when the reduced gradient was not finite on some worker's window, so no
            worker applied it (the decision is taken on reduced values: the same on every rank).
        stop_votes: how many workers asked to stop after this update (e.g. on SIGTERM).
        cancel_votes: how many workers' callbacks asked to stop before it: then no worker
            applied this update, and training ends with the previous update's state.
        change_votes: how many workers heard that workers will join or leave (an elastic
            job): then every worker regroups after this update (`Controller`).
        bad_micro_batches: per rank, 0, or the 1-based index in its epoch of a micro-batch it
            could not train on (wrong shape or dtype): then no worker applied this update.
    """

    window_loss: tf.Tensor
    sample_count: tf.Tensor
    gradient_norm: tf.Tensor
    skipped: tf.Tensor
    stop_votes: tf.Tensor
    cancel_votes: tf.Tensor
    change_votes: tf.Tensor
    bad_micro_batches: tf.Tensor

    @property
    def loss(self) -> float:
        """The window's loss over all workers."""
        return float(self.window_loss)


def _stacked_spec(micro_batch):
    """The spec of micro-batches stacked on a new leading axis."""
    return tuple(None if part is None else tf.nest.map_structure(
        lambda spec: tf.TensorSpec([None, *spec.shape], spec.dtype), part) for part in micro_batch)


def _same_shapes(micro_batches: Sequence[tuple]) -> bool:
    """Whether the micro-batches stack: every tensor of each shaped as the first's (the ragged
    tail of an epoch is not)."""
    shapes = [[(tuple(t.shape), t.dtype) for t in tf.nest.flatten(batch) if t is not None]
              for batch in micro_batches]
    return all(s == shapes[0] for s in shapes[1:])


def _checked_allreduce_dtype(allreduce_dtype, backend) -> tf.DType:
    if allreduce_dtype not in ALLREDUCE_DTYPES:
        raise ValueError(f"allreduce_dtype must be one of {', '.join(ALLREDUCE_DTYPES)}. "
                         f"Received: allreduce_dtype={allreduce_dtype!r}")
    if allreduce_dtype not in backend.summable_dtypes:
        raise ValueError(
            f"allreduce_dtype={allreduce_dtype} is not available on the {backend.name} backend "
            f"(it sums {', '.join(backend.summable_dtypes)}). Received: "
            f"allreduce_dtype={allreduce_dtype!r}")
    return tf.as_dtype(allreduce_dtype)


class WindowSteps:
    """Owns the compiled steps of a window and the sums they keep between calls: this worker's
    gradient sums per normaliser (`GradientAccumulator`), the row exchange for sparse sums, and
    how many micro-batches the sums hold.

    A micro-step runs forward and backward on one micro-batch and adds to the sums; it never
    communicates. The update step trains the window's last micro-batch into the sums, reduces
    them in their own memory with the statistics, the metrics' states and the votes
    (`comm.sum_in_place`), divides once per normaliser in place, optionally clips, and applies (in
    bounded groups, `updates`) unless a vote cancels.

    Does not own the arguments' checks, the model's build or the start-up broadcast (`Trainer`),
    nor the loop (`Controller`).
    """

    def __init__(self, model: keras.Model, optimizer, objective: Objective,
                 metrics: GlobalMetrics | None, backend: comm.Backend, *,
                 accumulation_steps: Callable[[], int], clip_global_norm: float | None,
                 allreduce_dtype: str, row_exchange: bool, jit_compile: bool,
                 shard_optimizer_state: bool = False) -> None:
        self.model = model
        self.optimizer = optimizer
        self.objective = objective
        self.metrics = metrics
        self.backend = backend
        self._accumulation_steps = accumulation_steps  # known once the micro-batch size is
        self.clip_global_norm = clip_global_norm
        self.allreduce_dtype = _checked_allreduce_dtype(allreduce_dtype, backend)
        self.row_exchange = row_exchange
        self.shard_optimizer_state = shard_optimizer_state
        self.sharded: shards.ShardedState | None = None  # made by `owned_variables`
        self.accumulator: GradientAccumulator | None = None  # made by the first trace
        self._rows: rows.RowExchange | None = None  # made with the sums, if gradients are sparse
        self._stored_micro_steps = 0  # micro-batches of the current window in the sums
        self._largest_micro_batch = tf.Variable(0.0, trainable=False)  # for loss scaling only
        self._compile(jit_compile)

    def _compile(self, jit_compile: bool) -> None:
        """The step functions, with XLA or without. No AutoGraph: the steps have no
        data-dependent Python control flow, and errors about the user's data (a weight shape,
        say) then reach them as they were raised, in one line."""
        self.jit_compile = jit_compile

        def step(body, jit=jit_compile):
            return tf.function(body, autograph=False, jit_compile=jit)

        self._micro_step = step(self._micro_step_body)
        self._micro_steps = step(self._micro_steps_body)
        self._evaluation_step = step(self._evaluation_step_body)
        # The allreduce cannot be compiled: with workers to reduce over, the update step is one
        # call that runs XLA's two clusters around it (or, without XLA, one graph). Alone, there
        # is nothing to reduce and the whole step is one cluster (4% faster at k = 1).
        split = jit_compile and self.backend.num_workers() > 1
        self._update_step = step(self._update_step_body, jit=jit_compile and not split)
        self._stored_window = (step(self._stored_window_body) if split
                               else self._stored_window_body)
        # With sharded state the apply has collectives in it (the norm, the new weights'
        # allgather): it runs beside XLA's clusters, not in one.
        self._apply_totals = (
            step(self._apply_totals_body, jit=not self.shard_optimizer_state) if split
            else self._apply_totals_body)

    def owned_variables(self) -> list:
        """The trainable variables whose optimizer state this worker keeps: with
        `shard_optimizer_state` between workers its share (`shards.ShardedState`, made here,
        before the optimizer is built on them), else all of them."""
        variables = self.model.trainable_variables
        if not self.shard_optimizer_state or self.backend.num_workers() == 1:
            return variables
        if self.sharded is None:
            self.sharded = shards.ShardedState(self.backend, variables)
        return self.sharded.owned_variables

    def trace(self, micro_batch, micro_batch_size: int | None) -> None:
        """Trace every step on the dataset's spec (`data.unpack`ed), before any runs.

        The first trace, with the batch axis unknown, finds the objective's normalisers (before
        XLA's stand-in, whose sizes are all known) and creates the sums; every micro-batch
        size, the ragged tail's too, then runs these graphs. Under XLA, a model it cannot
        compile turns XLA off here (`xla.compiles`).
        """
        self._trace_micro_step(micro_batch, micro_batch_size)
        if self.jit_compile and not xla.compiles(
                self._micro_step, *xla.stand_in(micro_batch, micro_batch_size), True):
            self._compile(False)
            self._trace_micro_step(micro_batch, micro_batch_size)
        if self._accumulation_steps() > 2:  # fit's windows: k - 1 micro-batches in one call
            self._micro_steps.get_concrete_function(_stacked_spec(micro_batch), True)
        votes = tf.TensorSpec([VOTES + self.backend.num_workers()], tf.float32)
        self._update_step.get_concrete_function(votes, micro_batch,
                                                self._accumulation_steps() > 1)

    def drop_window(self) -> None:
        """Forget the window in progress (an elastic job's workers changed before its update):
        its next micro-step starts the sums afresh, and its metrics' states are emptied."""
        self._stored_micro_steps = 0
        if self.metrics is not None:
            self.metrics.drop_window()

    def retrace(self, micro_batch, micro_batch_size: int | None) -> None:
        """New step functions for a new worker count (an elastic job's), traced before any runs:
        a window's sample count, the votes and whether there is anything to reduce are the
        worker count's. The sums and the optimizer are kept."""
        self._compile(self.jit_compile)
        self.trace(micro_batch, micro_batch_size)

    def _trace_micro_step(self, micro_batch, micro_batch_size: int | None) -> None:
        try:
            for first in (True, False):
                self._micro_step.get_concrete_function(*micro_batch, first)
        except (ValueError, TypeError) as error:  # Keras's shape checks, while tracing
            stand_in = xla.stand_in(micro_batch, micro_batch_size)
            raise diagnosis.mismatch(self.refusing_part(*stand_in), error,
                                     diagnosis.DATA_SHAPES, traced=True) from error

    def refusing_part(self, x, y, sample_weight=None) -> diagnosis.Refusal | None:
        return diagnosis.refusing_part(self.model, self.objective, self.metrics, x, y,
                                       sample_weight)

    @property
    def micro_step_traces(self) -> int:
        return self._micro_step.experimental_get_tracing_count()

    @property
    def update_step_traces(self) -> int:
        return self._update_step.experimental_get_tracing_count()

    def micro_step(self, x, y, sample_weight=None) -> None:
        self._micro_step(x, y, sample_weight, self._stored_micro_steps == 0)
        self._stored_micro_steps += 1

    def micro_steps(self, micro_batches: Sequence[tuple]) -> None:
        if len(micro_batches) <= 1 or not _same_shapes(micro_batches):
            for micro_batch in micro_batches:
                self.micro_step(*micro_batch)
            return
        x, y, sample_weight = micro_batches[0]
        stacked = tuple(
            None if part is None else tf.nest.map_structure(
                lambda *tensors: tf.stack(tensors), *[batch[i] for batch in micro_batches])
            for i, part in enumerate((x, y, sample_weight)))
        self._micro_steps(stacked, self._stored_micro_steps == 0)
        self._stored_micro_steps += len(micro_batches)

    def update_step(self, votes: tf.Tensor, last_micro_batch: tuple | None) -> UpdateResult:
        result = UpdateResult(*self._update_step(votes, last_micro_batch,
                                                 self._stored_micro_steps > 0))
        self._stored_micro_steps = 0
        return result

    def _micro_step_body(self, x, y, sample_weight, first):
        sums = self._micro_batch_sums(x, y, sample_weight)  # the first trace creates the sums
        self.accumulator.add(sums, first=first)

    def _micro_steps_body(self, stacked, first):
        def micro_batch(i):
            return [None if part is None else tf.nest.map_structure(lambda t: t[i], part)
                    for part in stacked]

        start = 0
        if first:
            self._micro_step_body(*micro_batch(0), True)
            start = 1

        def micro_step(i):
            self._micro_step_body(*micro_batch(i), False)
            return i + 1

        count = tf.shape(tf.nest.flatten(stacked[0])[0])[0]
        # One iteration at a time: the sums are then added in the order separate calls add them.
        tf.while_loop(lambda i: i < count, micro_step, [tf.constant(start)], parallel_iterations=1)

    def _micro_batch_sums(self, x, y, sample_weight) -> MicroBatchSums:
        """Forward and backward on one micro-batch (metrics updated): its sums. Creates the
        stored sums on the first trace."""
        variables = self.model.trainable_variables
        with tf.GradientTape(persistent=True) as tape:
            y_pred = self.model(x, training=True)
            batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
            terms = self.objective.terms(y, y_pred, sample_weight, batch_size)
            # Unnormalised sums: dividing by their own divisors would make a mean of micro-batch
            # means. Under loss scaling, float16 gradients of a sum overflow where those of
            # Keras's batch mean do not: differentiate sum / (Keras's divisor, estimated) and
            # multiply back in float32.
            shrinks = [None] * len(terms)
            if precision.loss_scale(self.optimizer) is not None:
                shrinks = precision.large_batch_divisors(terms, batch_size,
                                                         self._window_samples(batch_size))
            scaled = [self.optimizer.scale_loss(term.numerator if shrink is None
                                                else term.numerator / shrink)
                      for term, shrink in zip(terms, shrinks)]
        if self.metrics is not None:
            self.metrics.update(y, y_pred, sample_weight)
        gradients = [[g if shrink is None else precision.times(g, shrink)
                      for g in tape.gradient(value, variables)]
                     for value, shrink in zip(scaled, shrinks)]
        del tape
        self._accumulator_for([term.normaliser for term in terms], gradients)
        return MicroBatchSums(gradients, [t.numerator for t in terms],
                              [t.divisor for t in terms], batch_size)

    def _window_samples(self, batch_size) -> tf.Tensor:
        """Samples in a full window on every worker: k x num_workers x the largest micro-batch
        this worker has trained on (the first of an epoch is full; a ragged tail is smaller)."""
        largest = self._largest_micro_batch.assign(
            tf.maximum(self._largest_micro_batch, tf.cast(batch_size, tf.float32)))
        return largest * self._accumulation_steps() * self.backend.num_workers()

    def _accumulator_for(self, normalisers: list[str], gradients) -> GradientAccumulator:
        """The stored sums (and, for sparse gradients between workers, the row exchange),
        created on the first trace from its normalisers and gradients."""
        if self.accumulator is None:
            variables = self.model.trainable_variables
            with tf.init_scope():  # created once, outside the traced graph
                self.accumulator = GradientAccumulator(variables, normalisers)
            if self.sharded is not None:
                self.sharded.add_sums(self.accumulator.gradient_sum_variables)
            sparse = [isinstance(g, tf.IndexedSlices) for per in gradients for g in per]
            if self.row_exchange and any(sparse) and self.backend.num_workers() > 1:
                self._rows = rows.RowExchange(
                    self.backend, sparse, [v.shape for v in variables] * len(normalisers),
                    self.allreduce_dtype, self.sharded and self.sharded.sum_in_place)
        elif self.accumulator.normalisers != normalisers:
            raise ValueError(
                "every micro-batch must have the same structure (sample weights or not, their "
                f"rank). Received: normalisers {normalisers}, first {self.accumulator.normalisers}"
            )
        return self.accumulator

    def _update_step_body(self, votes, last_micro_batch, stored):
        # The window lands in the stored sums (the last micro-batch added on the way), which the
        # reduction and the division then work in: no other copy of the gradient is made. The
        # only sync point of a window: gradient, loss and weight sums, metric states and the
        # votes, summed in place in bounded groups (`comm.sum_in_place`); sparse sums may go as
        # rows beside them instead (`rows`).
        statistics = self._stored_window(last_micro_batch, stored)
        others = statistics + self.metric_states() + [votes]
        sums = self.accumulator.gradient_sum_variables
        # The window's sparse accesses (the micro-batches' gathers, their rows added to the
        # sums) are over: from here on every access is dense, and must not copy.
        comm.pieces.shared_reads(self.model.trainable_variables + sums)
        if self._rows is not None:
            others = self._rows.sum_in_place(sums, others, "update")
        elif self.sharded is not None:  # each worker gets its own variables' sums
            others = self.sharded.sum_in_place(sums, others, "update")
        elif self.backend.num_workers() > 1:
            others = comm.sum_in_place(self.backend, sums, others, "update", self.allreduce_dtype)
        return self._apply_totals(others[:len(statistics)], others[len(statistics):-1],
                                  others[-1])

    def _stored_window_body(self, last_micro_batch, stored):
        """The window in the stored sums, the last micro-batch trained on the way; its
        statistics."""
        last = (self._micro_batch_sums(*last_micro_batch)
                if last_micro_batch is not None else None)
        return self.accumulator.store_window(last, stored=stored)

    def _apply_totals_body(self, statistics, metric_states, votes):
        """From the window's sums and statistics over every worker: the update, applied unless
        a vote cancels it. The mean gradient is divided in the sums' memory (`mean_in_place`)."""
        cancelled = (votes[1] > 0) | tf.reduce_any(votes[VOTES:] > 0)
        if self.metrics is not None:
            def add_metric_states():
                self.metrics.add_reduced(metric_states)
                return tf.constant(True)

            tf.cond(cancelled, lambda: tf.constant(False), add_metric_states)
        numerators, divisors, sample_count = self.accumulator.split(statistics)
        # This worker's share of the variables (all of them unless the state is sharded).
        owned = None if self.sharded is None else self.sharded.owned
        variables = self.model.trainable_variables
        if owned is not None:
            variables = [variables[i] for i in owned]
        gradients = self.accumulator.mean_in_place(divisors, owned)
        scale = precision.loss_scale(self.optimizer)
        if scale is not None:
            gradients = [g / scale for g in gradients]
        window_loss = objective_value(numerators, divisors)
        if weight_regularizers(self.model):
            # R(θ) depends on no sample: its gradient joins once per update, after the division.
            with tf.GradientTape() as tape:
                penalty = self.objective.regularization()
            extra = tape.gradient(penalty, variables)
            gradients = [g if e is None else g + tf.convert_to_tensor(e)
                         for g, e in zip(gradients, extra)]
            window_loss += penalty
        gradients = [tf.cast(g, v.dtype) for g, v in zip(gradients, variables)]
        gradient_norm = (tf.linalg.global_norm(gradients) if self.sharded is None
                         else self.sharded.global_norm(gradients))
        # Decided on reduced values, hence identically on every worker: no extra collective (but
        # the sharded norm's sum of the shards' squares, which every worker gets alike). The
        # norm is NaN or Inf when any element is (or when it overflows float32, a gradient no
        # update should apply): one pass over the gradient serves the log, clipping and this.
        finite = tf.math.is_finite(gradient_norm) & tf.math.is_finite(window_loss)
        if self.clip_global_norm is not None:
            gradients, _ = tf.clip_by_global_norm(
                gradients, self.clip_global_norm, use_norm=gradient_norm
            )
        with updates.in_bounded_groups(self.optimizer):
            applied = tf.cond(cancelled, lambda: tf.constant(False), lambda: precision.apply(
                self.optimizer, gradients, variables, finite, scale))
        if self.sharded is not None:  # every worker's new weights, from their owners
            with tf.control_dependencies([applied]):
                shared = self.sharded.share_weights()
            with tf.control_dependencies(shared):
                window_loss = tf.identity(window_loss)
        return (window_loss, sample_count, gradient_norm, tf.logical_not(finite),
                votes[0], votes[1], votes[2], votes[VOTES:])

    def metric_states(self) -> list[tf.Tensor]:
        return self.metrics.window_states() if self.metrics is not None else []

    def allreduce_per_update(self) -> tuple[int, int]:
        """(tensors, bytes) one update step allreduces (`Trainer.allreduce_per_update`)."""
        if self.accumulator is None or self.backend.num_workers() == 1:
            return 0, 0
        # Counted from shapes: the sums are not read (that would copy them).
        sums = self.accumulator.gradient_sum_variables
        states = self.metric_states()
        # Per normaliser a numerator and a divisor, and the sample count; the stop, cancel and
        # change votes and each rank's bad micro-batch (one tensor); the touched rows (one tensor).
        small = ([1] * (2 * len(self.accumulator.normalisers) + 1)
                 + [VOTES + self.backend.num_workers()])
        if self._rows is not None:
            small.append(len(self._rows.positions))
        return (len(sums) + len(states) + len(small),
                sum(v.shape.num_elements() for v in sums) * self.allreduce_dtype.size
                + sum(int(tf.size(t)) * t.dtype.size for t in states) + 4 * sum(small))

    def evaluation_totals(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """This worker's loss statistics over `dataset` (metrics updated), as
        `evaluation_loss` reads them once summed over workers."""
        step = self._evaluation_step.get_concrete_function(*data.unpack(dataset.element_spec))
        totals = tf.zeros(step.structured_outputs.shape)
        for micro_batch in dataset:
            totals += self._evaluation_step(*data.unpack(micro_batch))
        return totals

    def _evaluation_step_body(self, x, y, sample_weight):
        y_pred = self.model(x, training=False)
        batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
        terms = self.objective.terms(y, y_pred, sample_weight, batch_size)
        if self.metrics is not None:
            self.metrics.update(y, y_pred, sample_weight)
        return tf.stack([t.numerator for t in terms] + [t.divisor for t in terms]
                        + [float(t.normaliser == UNDIVIDED) for t in terms])

    def evaluation_loss(self, totals: tf.Tensor) -> float:
        """Keras's loss on the whole validation set, from `evaluation_totals` summed over
        workers (numerators, divisors and which are undivided, per term)."""
        numerators, divisors, undivided = (tf.unstack(t) for t in tf.split(totals, 3))
        loss = objective_value(numerators,
                               window_divisors(divisors, [float(u) > 0 for u in undivided]))
        return float(loss + self.objective.regularization())
