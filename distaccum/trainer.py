"""The Trainer: what one micro-step and one update step are.

Public entry point:

    distaccum.init()
    trainer = distaccum.Trainer(model, optimizer, loss=loss, global_batch_size=256)
    history = trainer.fit(distaccum.micro_batches((x, y), 32), epochs=2)
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Sequence

import keras
import tensorflow as tf

from distaccum import comm, data, diagnosis, precision, rows
from distaccum.config import ALLREDUCE_DTYPES, accumulation_steps_for
from distaccum.accumulate import (
    UNDIVIDED,
    GradientAccumulator,
    MicroBatchSums,
    mean_gradients,
    objective_value,
    window_divisors,
)
from distaccum.controller import CadenceOptions, Controller
from distaccum.metrics import GlobalMetrics
from distaccum.records import Position
from distaccum.objective import (
    InexactWarning,
    Objective,
    output_names,
    resolve_losses,
    warn_if_inexact,
    weight_regularizers,
)


JIT_COMPILE = ("auto", True, False)


class XLAWarning(UserWarning):
    """XLA was asked for, and the model trains without it."""


def resolve_jit_compile(model: keras.Model, jit_compile) -> bool:
    """Whether the steps run under XLA. `"auto"` is Keras's rule for `compile(jit_compile=
    "auto")` under TensorFlow: on when a GPU is present, every layer supports XLA and op
    determinism is off (XLA has no deterministic form of some ops). `True` is overruled, with
    a warning naming them, only by layers that say they do not support XLA."""
    if not any(jit_compile is choice for choice in JIT_COMPILE):
        raise ValueError(f"jit_compile must be 'auto', True or False. Received: "
                         f"jit_compile={jit_compile!r}")
    if jit_compile is False:
        return False
    refusing = [layer.name for layer in model._flatten_layers() if not layer.supports_jit]
    if jit_compile == "auto":
        return (not refusing and bool(tf.config.list_physical_devices("GPU"))
                and not tf.config.is_op_determinism_enabled())
    if refusing:
        warnings.warn(XLAWarning(
            f"jit_compile=True: training without XLA, which layers {', '.join(refusing)} do not "
            "support (supports_jit=False)"), stacklevel=3)
        return False
    return True


def _stand_in(micro_batch, micro_batch_size: int | None):
    """Zeros of the micro-batch's spec, its unknown sizes made known: what XLA compiles for."""
    def zeros(spec):
        if spec is None:
            return None
        shape = [micro_batch_size or 1] + [d if d is not None else 1 for d in spec.shape[1:]]
        return tf.zeros(shape, spec.dtype)

    return tf.nest.map_structure(zeros, micro_batch)


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
        bad_micro_batches: per rank, 0, or the 1-based index in its epoch of a micro-batch it
            could not train on (wrong shape or dtype): then no worker applied this update.
    """

    window_loss: tf.Tensor
    sample_count: tf.Tensor
    gradient_norm: tf.Tensor
    skipped: tf.Tensor
    stop_votes: tf.Tensor
    cancel_votes: tf.Tensor
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


def _check_count(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int. Received: {name}={value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1. Received: {name}={value}")
    return value


def compiled_arguments(model: keras.Model) -> dict:
    """The loss, loss weights, metrics and weighted metrics a model was compiled with, as
    `Trainer` takes them ({} for a model never compiled)."""
    if not getattr(model, "compiled", False):
        return {}
    # The arguments as given to compile (Keras keeps them for get_compile_config).
    arguments = model._compile_config.config
    return {"loss": model.loss, "loss_weights": arguments.get("loss_weights"),
            "metrics": arguments.get("metrics"),
            "weighted_metrics": arguments.get("weighted_metrics")}


def _check_allreduce_dtype(allreduce_dtype, backend) -> tf.DType:
    if allreduce_dtype not in ALLREDUCE_DTYPES:
        raise ValueError(f"allreduce_dtype must be one of {', '.join(ALLREDUCE_DTYPES)}. "
                         f"Received: allreduce_dtype={allreduce_dtype!r}")
    if allreduce_dtype not in backend.summable_dtypes:
        raise ValueError(
            f"allreduce_dtype={allreduce_dtype} is not available on the {backend.name} backend "
            f"(it sums {', '.join(backend.summable_dtypes)}). Received: "
            f"allreduce_dtype={allreduce_dtype!r}")
    return tf.as_dtype(allreduce_dtype)


def _check_optimizer(optimizer) -> None:
    if optimizer is None:
        raise ValueError("give an optimizer (or compile the model with one). Received: optimizer=None")
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"optimizer must be a keras.optimizers.Optimizer. Received: {optimizer!r}")
    if optimizer.gradient_accumulation_steps:
        raise ValueError(
            "build the optimizer without gradient_accumulation_steps: distaccum accumulates "
            "(exactly, and with one allreduce per update) and Keras's own accumulation would "
            "average micro-batch means and count micro-steps. Received: "
            f"gradient_accumulation_steps={optimizer.gradient_accumulation_steps}"
        )


class Trainer:
    """Owns the micro-step and the update step of data-parallel training with accumulation.

    A micro-step runs forward and backward on one micro-batch and adds to this worker's sums; it
    never communicates. An update step reduces the sums over workers in one grouped allreduce
    (beside which sparse gradient sums may travel as rows, `rows`), divides once by the total
    sample weight, optionally clips by global norm, and applies. So `optimizer.iterations` counts
    updates and LR schedules see large-batch steps. `fit` runs a window as two compiled calls:
    its first k-1 micro-batches (`micro_steps`), then the update step, which trains the last
    micro-batch itself and adds its gradient on the way into the allreduce.

    Does not own the loop (epochs, windows, when to log or stop): that is the `Controller`, which
    `fit` uses.

    What is minimised is Keras's loss on the window's samples (see `objective`): every output's
    loss with its `loss_weights`, losses layers add, and weight regularizers once per update.
    Mixed precision: with a `mixed_float16` model the optimizer is wrapped in Keras's
    `LossScaleOptimizer` (as `compile` does); each micro-step scales its loss, the sums stay
    float32, and the scale changes only at updates.

    Args:
        model: a Keras 3 model.
        optimizer: a Keras 3 optimizer, built without `gradient_accumulation_steps`.
        loss: a `keras.losses.Loss`, a loss name, an unreduced function
            `(y_true, y_pred) -> per-sample values`, or a list/dict of those (one per output).
        loss_weights: a list/dict of each output's weight in the total loss (default 1).
        metrics, weighted_metrics: as `model.compile` takes them; their values count every
            worker's samples (see `metrics`).
        global_batch_size: samples per update over all workers; then k = global_batch_size /
            (num_workers × micro_batch_size), which must be whole. The micro-batch size is
            `distaccum.micro_batches`' when `fit` gets one, else give `micro_batch_size`. With
            the same global batch, `micro_batches` data gives update u the same samples on any
            number of workers: a run can resume on more or fewer.
        micro_batch_size: the samples per micro-batch of your own dataset (with
            `global_batch_size` only).
        accumulation_steps: micro-batches per worker per update (k), instead of
            `global_batch_size` (neither: 1).
        clip_global_norm: if set, clip the reduced, normalised gradient to this global norm.
        allreduce_dtype: the type gradient sums travel in between workers: `"float32"` (exact,
            the default), or `"bfloat16"` / `"float16"` (half the bytes; each sum is rounded to
            that type, so updates are within its round-off of exact, and a float16 sum beyond
            65504 overflows and skips the update). Window statistics, metric states and votes
            stay float32; the division and the update run in float32.
        jit_compile: compile the steps with XLA: `"auto"` (Keras's rule: when a GPU is present
            and every layer supports XLA), `True` or `False`. The micro-steps, the evaluation
            step and the update step's compute before and after its allreduce run as XLA
            clusters; the allreduce itself runs between them, as an op XLA cannot compile. A
            model XLA cannot compile trains without it, with one warning naming the op.
        row_exchange: send a sparse gradient's sum (an `Embedding`'s) between workers as the
            rows the window touched, with their indices, whenever that is fewer bytes than the
            dense table, decided each update from recent updates' rows (see `rows`); the sum
            is the same either way. False: always dense, one collective per update.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        *,
        loss,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        global_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        accumulation_steps: int | None = None,
        clip_global_norm: float | None = None,
        allreduce_dtype: str = "float32",
        jit_compile: bool | str = "auto",
        row_exchange: bool = True,
    ) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model. Received: model={model!r}")
        _check_optimizer(optimizer)
        if clip_global_norm is not None and not clip_global_norm > 0:
            raise ValueError(f"clip_global_norm must be > 0. Received: {clip_global_norm!r}")
        self.model = model
        self.optimizer = precision.with_loss_scaling(model, optimizer)
        self.objective = Objective(model, resolve_losses(model, loss, loss_weights))
        self.metrics = (GlobalMetrics(metrics, weighted_metrics, output_names(model))
                        if metrics or weighted_metrics else None)
        if getattr(model, "optimizer", None) is None:
            model.optimizer = self.optimizer  # where Keras callbacks (ReduceLROnPlateau) look
        self.clip_global_norm = clip_global_norm
        self.backend = comm.current()
        self._set_batch(global_batch_size, micro_batch_size, accumulation_steps)
        self.allreduce_dtype = _check_allreduce_dtype(allreduce_dtype, self.backend)
        self._accumulator: GradientAccumulator | None = None
        if not isinstance(row_exchange, bool):
            raise TypeError(f"row_exchange must be True or False. Received: "
                            f"row_exchange={row_exchange!r}")
        self.row_exchange = row_exchange
        self._rows: rows.RowExchange | None = None  # made with the sums, if gradients are sparse
        self._stored_micro_steps = 0  # micro-batches of the current window in the sums
        self._largest_micro_batch = tf.Variable(0.0, trainable=False)  # for loss scaling only
        self._compile_steps(resolve_jit_compile(model, jit_compile))

    def _compile_steps(self, jit_compile: bool) -> None:
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
        self._window_sums = step(self._window_sums_body) if split else self._window_sums_body
        self._apply_totals = step(self._apply_totals_body) if split else self._apply_totals_body

    @classmethod
    def from_compiled(cls, model: keras.Model, **options) -> "Trainer":
        """A trainer with the optimizer, loss, loss weights, metrics and `jit_compile` the model
        was compiled with; `options` are the constructor's others (`global_batch_size`,
        `clip_global_norm`, ...)."""
        if not getattr(model, "compiled", False):
            raise ValueError(f"the model is not compiled: call model.compile(optimizer=..., "
                             f"loss=...) first. Received: model {model.name!r}")
        options.setdefault("jit_compile", model.jit_compile)  # compile's, its "auto" resolved
        return cls(model, model.optimizer, **compiled_arguments(model), **options)

    def _set_batch(self, global_batch_size, micro_batch_size, accumulation_steps) -> None:
        """k as given (1 when nothing is), or from `global_batch_size` once the micro-batch size
        is known (now, if given)."""
        self.global_batch_size = _check_count("global_batch_size", global_batch_size)
        self.micro_batch_size = _check_count("micro_batch_size", micro_batch_size)
        self._accumulation_steps = _check_count("accumulation_steps", accumulation_steps)
        if global_batch_size is None:
            if micro_batch_size is not None:
                raise ValueError("micro_batch_size is what sets k from global_batch_size: give "
                                 f"both, or accumulation_steps. Received: micro_batch_size="
                                 f"{micro_batch_size}, global_batch_size=None")
            self._accumulation_steps = self._accumulation_steps or 1
        elif accumulation_steps is not None:
            raise ValueError(f"give global_batch_size or accumulation_steps, not both. Received: "
                             f"global_batch_size={global_batch_size}, "
                             f"accumulation_steps={accumulation_steps}")
        elif micro_batch_size is not None:
            self._settle_micro_batch_size(micro_batch_size)

    @property
    def accumulation_steps(self) -> int:
        """k: micro-batches per worker per update (known once the micro-batch size is, with
        `global_batch_size`)."""
        if self._accumulation_steps is None:
            self._settle_micro_batch_size(None)
        return self._accumulation_steps

    def _settle_micro_batch_size(self, micro_batch_size: int | None) -> None:
        """With `global_batch_size`, k follows from the micro-batch size: the data's (when
        `micro_batches` made it) or the one given to the constructor; they must agree."""
        if self.global_batch_size is None or (micro_batch_size is None
                                              and self._accumulation_steps is not None):
            return
        if micro_batch_size is None and self.micro_batch_size is None:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} sets k from the micro-batch size: "
                "train on distaccum.micro_batches(...), which knows it, or give Trainer "
                "micro_batch_size=. Received: micro_batch_size=None")
        if None not in (micro_batch_size, self.micro_batch_size) \
                and micro_batch_size != self.micro_batch_size:
            raise ValueError(
                f"the data's micro-batches hold {micro_batch_size} samples, but the Trainer was "
                f"given micro_batch_size={self.micro_batch_size}. Received: "
                f"micro_batch_size={micro_batch_size}")
        self.micro_batch_size = micro_batch_size or self.micro_batch_size
        self._accumulation_steps = accumulation_steps_for(
            self.global_batch_size, self.backend.num_workers(), self.micro_batch_size)

    @property
    def micro_step_traces(self) -> int:
        """How often the micro-step was traced: three times at `prepare` (the first trace creates
        the sums; a window's first micro-step and the others differ), then never, whatever the
        micro-batch sizes."""
        return self._micro_step.experimental_get_tracing_count()

    @property
    def update_step_traces(self) -> int:
        """How often the update step was traced: once at `prepare` with a last micro-batch on
        the dataset's spec, and once more for each other form a run meets (a window that ends
        before its k-th micro-batch: with or without stored micro-batches)."""
        return self._update_step.experimental_get_tracing_count()

    @property
    def allreduce_per_update(self) -> tuple[int, int]:
        """(tensors, bytes) one update step allreduces: the gradient sums (in `allreduce_dtype`),
        and in float32 the statistics per normaliser, the sample count, the metrics' states and
        the votes. With the row exchange (sparse gradients), also each sparse sum's touched rows;
        an update that sends rows allreduces all this but the sparse sums (see `rows`).

        (0, 0) with one worker, where the single-process backend communicates nothing.
        """
        if self._accumulator is None or self.backend.num_workers() == 1:
            return 0, 0
        totals = self._as_sent(self._accumulator.totals()) + self._metric_states()
        # The stop and cancel votes and each rank's bad micro-batch: one float32 tensor.
        small = [2 + self.backend.num_workers()]
        if self._rows is not None:  # the touched rows: one float32 tensor
            small.append(len(self._rows.positions))
        return (len(totals) + len(small),
                sum(int(tf.size(t)) * t.dtype.size for t in totals) + 4 * sum(small))

    def learning_rate_at(self, update_step: int) -> float:
        """The learning rate the optimizer used for update `update_step` (1-based)."""
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        rate = optimizer._learning_rate  # the schedule itself, not its current value
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            return float(rate(update_step - 1))
        return float(keras.ops.convert_to_numpy(rate))

    def prepare(self, element_spec, micro_batch_size: int | None = None) -> None:
        """Build model and optimizer, then make every worker start from rank 0's state. Once.

        `micro_batch_size`: the data's, if it is known (it sets k from `global_batch_size`).
        """
        self._settle_micro_batch_size(micro_batch_size)
        if self._accumulator is not None:
            return
        if not self.model.built:
            self.model.build(tf.nest.map_structure(lambda s: s.shape, element_spec[0]))
        data.check_inputs_match_model(element_spec, self.model)
        self.optimizer.build(self.model.trainable_variables)
        if self.metrics is not None:
            self.metrics.build(self.model, element_spec)
        # Tracing on the dataset's spec (batch axis unknown) finds the objective's normalisers
        # (before XLA's stand-in, whose sizes are all known) and creates the sums; every
        # micro-batch size, the ragged tail's too, runs these graphs.
        micro_batch = data.unpack(element_spec)
        self._trace_micro_step(micro_batch)
        if self.jit_compile and not self._check_xla_compiles(micro_batch):
            self._trace_micro_step(micro_batch)
        if self.accumulation_steps > 2:  # fit's windows: k - 1 micro-batches in one call
            self._micro_steps.get_concrete_function(_stacked_spec(micro_batch), True)
        votes = tf.TensorSpec([2 + self.backend.num_workers()], tf.float32)
        self._update_step.get_concrete_function(votes, micro_batch,
                                                self.accumulation_steps > 1)
        warn_if_inexact(self.model)
        comm.warn_if_gpus_sum_through_host(self.backend)
        if self.allreduce_dtype != tf.float32 and self.backend.num_workers() > 1:
            warnings.warn(
                f"allreduce_dtype={self.allreduce_dtype.name}: gradient sums travel rounded to "
                f"{self.allreduce_dtype.name}, so updates are within its round-off of exact, not "
                "exact (allreduce_dtype=float32 is exact)", InexactWarning, stacklevel=3)
        self.broadcast_from_chief()

    def _trace_micro_step(self, micro_batch) -> None:
        try:
            for first in (True, False):
                self._micro_step.get_concrete_function(*micro_batch, first)
        except (ValueError, TypeError) as error:  # Keras's shape checks, while tracing
            stand_in = _stand_in(micro_batch, self.micro_batch_size)
            raise diagnosis.mismatch(self.refusing_part(*stand_in), error,
                                     diagnosis.DATA_SHAPES, traced=True) from error

    def _check_xla_compiles(self, micro_batch) -> bool:
        """Compile a micro-step for XLA, running nothing; whether XLA stays on. An op XLA has no
        kernel for (a `tf.numpy_function`, a string op) turns XLA off, with one warning naming
        it; any other error is left for the first step to raise, where it names the micro-batch."""
        try:
            self._micro_step.experimental_get_compiler_ir(
                *_stand_in(micro_batch, self.micro_batch_size), True)(stage="hlo")
        except (ValueError, tf.errors.OpError) as error:
            message = str(error)
            if "XLA" not in message:
                return True
            # "... on XLA_CPU_JIT: PyFunc (No registered 'PyFunc' OpKernel ... {{node a/b/PyFunc}}"
            unsupported = re.search(r"on XLA_\w+: (\w+) \(.*?\{\{node ([^}]+)\}\}", message)
            reason = (f"it has no kernel for op {unsupported[1]} (in {unsupported[2]})"
                      if unsupported else next(line.strip() for line in message.splitlines()
                                               if "XLA" in line)[:300])
            warnings.warn(XLAWarning(f"jit_compile: training without XLA, which cannot compile "
                                     f"this model: {reason}"), stacklevel=4)
            self._compile_steps(False)
            return False
        return True

    @property
    def state_variables(self) -> list:
        """Everything training changes: model variables (weights, layers' RNG states, statistics)
        and optimizer variables (`iterations`, moments). What workers share and checkpoints hold."""
        return list(self.model.variables) + list(self.optimizer.variables)

    def broadcast_from_chief(self) -> None:
        """Overwrite model and optimizer state with rank 0's."""
        state = self.state_variables
        with comm.collective("the start-up broadcast"):
            values = self.backend.broadcast_from_chief([v.value for v in state])
        for variable, value in zip(state, values):
            variable.assign(value)

    def micro_step(self, x, y, sample_weight=None) -> None:
        """Forward, backward and accumulate one micro-batch on this worker. No communication."""
        self._micro_step(x, y, sample_weight, self._stored_micro_steps == 0)
        self._stored_micro_steps += 1

    def micro_steps(self, micro_batches: Sequence[tuple]) -> None:
        """`micro_step` on each of `micro_batches` (`(x, y, sample_weight or None)`), in order,
        in one compiled call when they have the same shapes (a loop in the graph: one Python
        round trip instead of one per micro-batch, the `steps_per_execution` idea). If one
        cannot be trained on, its error is raised and the stored sums are left undefined for
        this window: call `micro_step` on them one by one to find it, or report the window bad.
        """
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

    def update_step(self, stop_vote: bool = False, cancel_vote: bool = False,
                    bad_micro_batch: int = 0, step: int | None = None,
                    last_micro_batch: tuple | None = None) -> UpdateResult:
        """Reduce the window over workers, normalise, clip, apply; every worker calls it.

        Args:
            stop_vote: this worker wants training to stop after this update (SIGTERM). The vote
                travels in the same grouped allreduce, so all workers learn of it at once.
            cancel_vote: this worker wants training to stop before this update (a callback set
                `model.stop_training`): if any worker votes so, no worker applies it.
            bad_micro_batch: the 1-based index in this epoch of a micro-batch this worker could
                not train on (0: none); if any worker reports one, no worker applies the update.
            step: this update's number, for messages (a timeout names it).
            last_micro_batch: the window's last micro-batch `(x, y, sample_weight or None)`, if
                not given to `micro_step`: trained in the same compiled call, its sums go
                straight into the reduction instead of through the stored sums (so a window of
                one micro-batch never touches them). If it cannot be trained on (its error is
                raised), nothing was reduced or applied: call `update_step` again without it,
                reporting it as `bad_micro_batch`.
        """
        bad = [0.0] * self.backend.num_workers()
        bad[self.backend.rank()] = float(bad_micro_batch)
        votes = tf.constant([float(stop_vote), float(cancel_vote), *bad])
        with comm.collective(f"update step {step}'s allreduce" if step else
                             "the update step's allreduce"):
            result = UpdateResult(*self._update_step(votes, last_micro_batch,
                                                     self._stored_micro_steps > 0))
        self._stored_micro_steps = 0
        return result

    def refusing_part(self, x, y, sample_weight=None) -> diagnosis.Refusal | None:
        """What in a training step refuses this micro-batch (the model, the loss, a metric), in
        one line, or None; run after a step failed on it (`diagnosis`)."""
        return diagnosis.refusing_part(self.model, self.objective, self.metrics, x, y,
                                       sample_weight)

    def _micro_step_body(self, x, y, sample_weight, first):
        sums = self._micro_batch_sums(x, y, sample_weight)  # the first trace creates the sums
        self._accumulator.add(sums, first=first)

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
        return largest * self.accumulation_steps * self.backend.num_workers()

    def _accumulator_for(self, normalisers: list[str], gradients) -> GradientAccumulator:
        """The stored sums (and, for sparse gradients between workers, the row exchange),
        created on the first trace from its normalisers and gradients."""
        if self._accumulator is None:
            variables = self.model.trainable_variables
            with tf.init_scope():  # created once, outside the traced graph
                self._accumulator = GradientAccumulator(variables, normalisers)
            sparse = [isinstance(g, tf.IndexedSlices) for per in gradients for g in per]
            if self.row_exchange and any(sparse) and self.backend.num_workers() > 1:
                self._rows = rows.RowExchange(self.backend, sparse,
                                              [v.shape for v in variables] * len(normalisers),
                                              self.allreduce_dtype)
        elif self._accumulator.normalisers != normalisers:
            raise ValueError(
                "every micro-batch must have the same structure (sample weights or not, their "
                f"rank). Received: normalisers {normalisers}, first {self._accumulator.normalisers}"
            )
        return self._accumulator

    def _update_step_body(self, votes, last_micro_batch, stored):
        # The only sync point of a window: gradient, loss and weight sums, metric states (and the
        # votes) in one grouped allreduce; sparse sums may go as rows beside it (`rows`).
        sums = self._window_sums(last_micro_batch, stored)
        everything = sums + self._metric_states() + [votes]
        totals = (self.backend.sum_all(everything, "update") if self._rows is None
                  else self._rows.sum_all(everything, "update"))
        return self._apply_totals(totals[:len(sums)], totals[len(sums):-1], totals[-1])

    def _window_sums_body(self, last_micro_batch, stored):
        """The window's sums as they travel, the last micro-batch's trained on the way."""
        last = (self._micro_batch_sums(*last_micro_batch)
                if last_micro_batch is not None else None)
        return self._as_sent(self._accumulator.totals(last, stored=stored))

    def _apply_totals_body(self, totals, metric_states, votes):
        """From every worker's totals: the update, applied unless a vote cancels it."""
        totals = [tf.cast(t, tf.float32) for t in totals]
        cancelled = (votes[1] > 0) | tf.reduce_any(votes[2:] > 0)
        if self.metrics is not None:
            def add_metric_states():
                self.metrics.add_reduced(metric_states)
                return tf.constant(True)

            tf.cond(cancelled, lambda: tf.constant(False), add_metric_states)
        gradient_sums, numerators, divisors, sample_count = self._accumulator.split(totals)
        variables = self.model.trainable_variables
        gradients = mean_gradients(gradient_sums, divisors)
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
        gradient_norm = tf.linalg.global_norm(gradients)
        # Decided on reduced values, hence identically on every worker: no extra collective. The
        # norm is NaN or Inf when any element is (or when it overflows float32, a gradient no
        # update should apply): one pass over the gradient serves the log, clipping and this.
        finite = tf.math.is_finite(gradient_norm) & tf.math.is_finite(window_loss)
        if self.clip_global_norm is not None:
            gradients, _ = tf.clip_by_global_norm(
                gradients, self.clip_global_norm, use_norm=gradient_norm
            )
        tf.cond(cancelled, lambda: tf.constant(False), lambda: precision.apply(
            self.optimizer, gradients, self.model.trainable_variables, finite, scale))
        return (window_loss, sample_count, gradient_norm, tf.logical_not(finite),
                votes[0], votes[1], votes[2:])

    def _as_sent(self, totals: list[tf.Tensor]) -> list[tf.Tensor]:
        """The window's sums as they travel: gradient sums in `allreduce_dtype` (unless nothing
        travels, with one worker), statistics in float32."""
        if self.backend.num_workers() == 1:
            return totals
        count = self._accumulator.gradient_sum_count
        return [tf.cast(t, self.allreduce_dtype) for t in totals[:count]] + totals[count:]

    def _metric_states(self) -> list[tf.Tensor]:
        return self.metrics.window_states() if self.metrics is not None else []

    def metric_results(self) -> dict[str, float]:
        """The metrics over every worker's samples since the epoch began (empty without any)."""
        return self.metrics.results() if self.metrics is not None else {}

    def reset_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.reset()

    def evaluate(self, dataset) -> dict[str, float]:
        """The loss over every worker's `dataset` (as Keras's on all of it), and the metrics.

        `dataset` is this worker's micro-batches: a `tf.data.Dataset`, or `micro_batches(...)`
        (each worker its contiguous share, in order). Every worker must call it (the totals are
        summed across workers in one collective).
        """
        dataset = data.evaluation_dataset(dataset)
        data.check_micro_batch_spec(dataset)
        step = self._evaluation_step.get_concrete_function(*data.unpack(dataset.element_spec))
        totals = tf.zeros(step.structured_outputs.shape)
        for micro_batch in dataset:
            totals += self._evaluation_step(*data.unpack(micro_batch))
        with comm.collective("validation"):
            [totals, *metric_states] = self.backend.sum_all(
                [totals] + self._metric_states(), "validation")
        numerators, divisors, undivided = (tf.unstack(t) for t in tf.split(totals, 3))
        loss = objective_value(numerators, window_divisors(divisors, [float(u) > 0 for u in undivided]))
        results = {"loss": float(loss + self.objective.regularization())}
        if self.metrics is not None:
            results.update(self.metrics.evaluation_results(metric_states))
        return results

    def _evaluation_step_body(self, x, y, sample_weight):
        y_pred = self.model(x, training=False)
        batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
        terms = self.objective.terms(y, y_pred, sample_weight, batch_size)
        if self.metrics is not None:
            self.metrics.update(y, y_pred, sample_weight)
        return tf.stack([t.numerator for t in terms] + [t.divisor for t in terms]
                        + [float(t.normaliser == UNDIVIDED) for t in terms])

    def fit(
        self,
        dataset,
        *,
        epochs: int | None = None,
        update_steps: int | None = None,
        validation_data=None,
        callbacks: Sequence = (),
        class_weight: dict | None = None,
        log_interval: int = 10,
        max_consecutive_skips: int = 5,
        collective_timeout: float = comm.DEFAULT_COLLECTIVE_TIMEOUT,
        checkpoint_interval: int | None = None,
        save_checkpoint=None,
        start: Position = Position(),
    ):
        """Train on this worker's micro-batches.

        Args:
            dataset: `distaccum.micro_batches(...)` (arrays or record files: each worker reads
                its share, in an order no worker count changes), or this worker's own
                `tf.data.Dataset` of micro-batches, `(x, y)` or `(x, y, sample_weight)` (or a
                function of the 1-based epoch returning one).
            epochs: passes over the data; each ends with an update on its last, possibly partial,
                window. Exactly one of `epochs` and `update_steps` is given.
            update_steps: total updates, for a dataset that repeats (or to stop mid-epoch).
            validation_data: this worker's share of the validation set (a dataset of
                micro-batches, or `distaccum.micro_batches(...)`), evaluated every epoch.
            callbacks: `keras.callbacks.Callback`s (EarlyStopping, ModelCheckpoint, ...; see
                `distaccum.callbacks` for what they see and where they run).
            class_weight: `{class id: weight}`, as in Keras: multiplies each sample's weight.
            log_interval: update steps between `on_log` calls.
            max_consecutive_skips: updates in a row whose reduced gradient is NaN or Inf (each is
                skipped by every worker) before training fails with `NonFiniteGradients`.
            collective_timeout: seconds any collective (an update's allreduce, the start-up
                broadcast, validation's sum) may take before this worker stops with one line,
                exit code 1: a vanished node then ends the job instead of hanging it. It must
                exceed the longest wait for a slower worker.
            checkpoint_interval: update steps between calls of `save_checkpoint`.
            save_checkpoint: called with the `Position` on every worker at those steps, before
                stopping on SIGTERM and at the end (see `Controller`).
            start: where to resume (a checkpoint's `Position`): the epoch's updates before it are
                not read again.

        Returns:
            A `History` (a `keras.callbacks.History`: per-epoch loss, metrics and `val_` values
            over all workers) with distaccum's counters.
        """
        options = CadenceOptions(log_interval=log_interval,
                                 checkpoint_interval=checkpoint_interval,
                                 max_consecutive_skips=max_consecutive_skips)
        comm.set_collective_timeout(collective_timeout)
        if class_weight is not None:
            dataset = data.with_class_weight(dataset, class_weight)
        controller = Controller(self, callbacks=callbacks, options=options,
                                save_checkpoint=save_checkpoint)
        return controller.run(dataset, epochs=epochs, update_steps=update_steps,
                              validation_dataset=validation_data, start=start)
