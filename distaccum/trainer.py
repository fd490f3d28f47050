"""The Trainer, distaccum's public class: its arguments, the start-up, `fit` and `evaluate`.

What its compiled steps run is `steps`; whether they run under XLA, `xla`; the loop, the
`Controller`.

    distaccum.init()
    trainer = distaccum.Trainer(model, optimizer, loss=loss, global_batch_size=256)
    history = trainer.fit(distaccum.micro_batches((x, y), 32), epochs=2)
"""

from __future__ import annotations

import warnings
from typing import Sequence

import keras
import tensorflow as tf

from distaccum import comm, data, diagnosis, precision, state, xla
from distaccum.batch import BatchSizes
from distaccum.controller import CadenceOptions, Controller
from distaccum.history import Position
from distaccum.metrics import GlobalMetrics
from distaccum.objective import (
    InexactWarning,
    Objective,
    output_names,
    resolve_losses,
    warn_if_inexact,
)
from distaccum.steps import UpdateResult, WindowSteps


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


def _check_sharding(shard_optimizer_state, optimizer, allreduce_dtype: str) -> None:
    if not isinstance(shard_optimizer_state, bool):
        raise TypeError(f"shard_optimizer_state must be True or False. Received: "
                        f"shard_optimizer_state={shard_optimizer_state!r}")
    if not shard_optimizer_state:
        return
    if comm.elastic():
        raise ValueError(
            "shard_optimizer_state keeps each worker's share of the optimizer state on that "
            "worker alone, so a worker that leaves an elastic job takes it along: train elastic "
            "without it. Received: shard_optimizer_state=True")
    if precision.unscaled(optimizer).global_clipnorm is not None:
        raise ValueError(
            "with shard_optimizer_state the optimizer sees one worker's share of the gradient, "
            "so its global_clipnorm would clip by that share's norm: give the Trainer "
            "clip_global_norm instead. Received: global_clipnorm="
            f"{precision.unscaled(optimizer).global_clipnorm}")
    if allreduce_dtype != "float32":
        raise ValueError(
            "shard_optimizer_state reduce-scatters the sums in float32 (a 16-bit reduce-scatter "
            f"is not built). Received: allreduce_dtype={allreduce_dtype!r}")


def _with_class_weight(rebuild, class_weight):
    """`rebuild`, its data with `class_weight` applied as `fit` applies it to the first."""
    return lambda: data.with_class_weight(rebuild(), class_weight)


class Trainer:
    """Data-parallel training with accumulation: one large-batch update per window of k
    micro-batches on every worker.

    A micro-step runs forward and backward on one micro-batch and adds to this worker's sums; it
    never communicates. An update step reduces the sums over workers in their own memory, one
    grouped allreduce per 32 MiB of them (beside which sparse gradient sums may travel as rows,
    `rows`), divides once by the total
    sample weight, optionally clips by global norm, and applies. So `optimizer.iterations` counts
    updates and LR schedules see large-batch steps. `fit` runs a window as two compiled calls:
    its first k-1 micro-batches (`micro_steps`), then the update step, which trains the last
    micro-batch itself and adds its gradient to the sums on the way into the allreduce.

    Owns the arguments and their checks, the build and the start-up broadcast (`prepare`), and
    the calls a loop makes. Does not own the compiled steps (`steps.WindowSteps`), nor the loop
    (epochs, windows, when to log or stop): that is the `Controller`, which `fit` uses.

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
        shard_optimizer_state: each worker keeps the optimizer state of its share of the
            variables only (whole variables, balanced by size; see `shards`): per worker 1/N of
            Adam's 2 W. An update then reduce-scatters the sums, each worker applies its share,
            and the new weights are allgathered: the bytes of the allreduce. Any Keras optimizer
            stays exact; its `global_clipnorm` would see one share, so it is refused (use
            `clip_global_norm`), as is a 16-bit `allreduce_dtype`.
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
        shard_optimizer_state: bool = False,
    ) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model. Received: model={model!r}")
        _check_optimizer(optimizer)
        if clip_global_norm is not None and not clip_global_norm > 0:
            raise ValueError(f"clip_global_norm must be > 0. Received: {clip_global_norm!r}")
        if not isinstance(row_exchange, bool):
            raise TypeError(f"row_exchange must be True or False. Received: "
                            f"row_exchange={row_exchange!r}")
        _check_sharding(shard_optimizer_state, optimizer, allreduce_dtype)
        self.model = model
        self.optimizer = precision.with_loss_scaling(model, optimizer)
        self.objective = Objective(model, resolve_losses(model, loss, loss_weights))
        self.metrics = (GlobalMetrics(metrics, weighted_metrics, output_names(model))
                        if metrics or weighted_metrics else None)
        if getattr(model, "optimizer", None) is None:
            model.optimizer = self.optimizer  # where Keras callbacks (ReduceLROnPlateau) look
        backend = comm.current()
        self.training_state: state.TrainingState | None = None  # made by `prepare`
        self._element_spec = None  # the data's, given to `prepare`
        self._batch = BatchSizes(backend.num_workers(), global_batch_size=global_batch_size,
                                 micro_batch_size=micro_batch_size,
                                 accumulation_steps=accumulation_steps)
        self._steps = WindowSteps(
            model, self.optimizer, self.objective, self.metrics, backend,
            accumulation_steps=lambda: self.accumulation_steps,
            clip_global_norm=clip_global_norm,
            allreduce_dtype=allreduce_dtype,
            row_exchange=row_exchange, jit_compile=xla.resolve_jit_compile(model, jit_compile),
            shard_optimizer_state=shard_optimizer_state)

    @property
    def backend(self) -> comm.Backend:
        """The workers' communication backend (`comm.init()`'s)."""
        return self._steps.backend

    @property
    def jit_compile(self) -> bool:
        """Whether the steps run under XLA: `jit_compile` resolved, and False after `prepare`
        found that XLA cannot compile the model."""
        return self._steps.jit_compile

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

    @property
    def accumulation_steps(self) -> int:
        """k: micro-batches per worker per update (known once the micro-batch size is, with
        `global_batch_size`)."""
        return self._batch.accumulation_steps

    @property
    def global_batch_size(self) -> int | None:
        return self._batch.global_batch_size

    @property
    def micro_batch_size(self) -> int | None:
        return self._batch.micro_batch_size

    @property
    def micro_step_traces(self) -> int:
        """How often the micro-step was traced: three times at `prepare` (the first trace creates
        the sums; a window's first micro-step and the others differ), then never, whatever the
        micro-batch sizes."""
        return self._steps.micro_step_traces

    @property
    def update_step_traces(self) -> int:
        """How often the update step was traced: once at `prepare` with a last micro-batch on
        the dataset's spec, and once more for each other form a run meets (a window that ends
        before its k-th micro-batch: with or without stored micro-batches)."""
        return self._steps.update_step_traces

    @property
    def gradient_sums(self) -> int:
        """How many model-sized gradient sums each worker keeps (each W of float32): one per
        distinct denominator of the loss, usually one (docs/design.md, "Accumulation: sums per
        denominator"). 0 before the first step (`prepare`) creates them."""
        accumulator = self._steps.accumulator
        return 0 if accumulator is None else len(accumulator.normalisers)

    @property
    def allreduce_per_update(self) -> tuple[int, int]:
        """(tensors, bytes) one update step allreduces: the gradient sums (in `allreduce_dtype`),
        and in float32 the statistics per normaliser, the sample count, the metrics' states and
        the votes. With the row exchange (sparse gradients), also each sparse sum's touched rows;
        an update that sends rows allreduces all this but the sparse sums (see `rows`).

        (0, 0) with one worker, where the single-process backend communicates nothing. With
        sharded optimizer state the same sums are reduce-scattered instead, and the new weights
        allgathered (`shards`).
        """
        return self._steps.allreduce_per_update()

    def learning_rate_at(self, update_step: int) -> float:
        """The learning rate the optimizer used for update `update_step` (1-based)."""
        rate = precision.unscaled(self.optimizer)._learning_rate  # the schedule, not its value
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            return float(rate(update_step - 1))
        return float(keras.ops.convert_to_numpy(rate))

    def prepare(self, element_spec, micro_batch_size: int | None = None) -> None:
        """Build model and optimizer, then make every worker start from rank 0's state. Once.

        `micro_batch_size`: the data's, if it is known (it sets k from `global_batch_size`).
        """
        self._batch.settle(micro_batch_size)
        if self._steps.accumulator is not None:
            return
        self._element_spec = element_spec
        if not self.model.built:
            self.model.build(tf.nest.map_structure(lambda s: s.shape, element_spec[0]))
        data.check_inputs_match_model(element_spec, self.model)
        owned = self._steps.owned_variables()
        if self._steps.sharded is not None and self.optimizer.built:
            raise ValueError(
                "shard_optimizer_state builds the optimizer on this worker's share of the "
                "variables: give one that has not been built (or used) yet. Received: "
                f"optimizer {self.optimizer.name!r}, built")
        self.optimizer.build(owned)
        sharded = self._steps.sharded
        if sharded is None:
            self.training_state = state.TrainingState(self.model, self.optimizer,
                                                      range(len(owned)))
        else:
            with comm.collective("the optimizer state's layout"):
                self.training_state = state.TrainingState(self.model, self.optimizer,
                                                          sharded.owned, self.backend)
        if self.metrics is not None:
            self.metrics.build(self.model, element_spec)
        self._steps.trace(data.unpack(element_spec), self.micro_batch_size)
        warn_if_inexact(self.model)
        comm.warn_if_gpus_sum_through_host(self.backend)
        travelling = self._steps.allreduce_dtype
        if travelling != tf.float32 and self.backend.num_workers() > 1:
            warnings.warn(
                f"allreduce_dtype={travelling.name}: gradient sums travel rounded to "
                f"{travelling.name}, so updates are within its round-off of exact, not "
                "exact (allreduce_dtype=float32 is exact)", InexactWarning, stacklevel=3)
        self.broadcast_from_chief()

    @property
    def state_variables(self) -> list:
        """What every worker holds alike, and rank 0's values of which it takes at start-up:
        model variables (weights, layers' RNG states, statistics) and optimizer variables
        (`iterations`, moments); with sharded optimizer state only those of the optimizer's
        that belong to no one variable (`state.global_state`). Checkpoints hold
        `training_state.entries()`."""
        if self._steps.sharded is None:
            return list(self.model.variables) + list(self.optimizer.variables)
        return self.training_state.model_variables + self.training_state.global_variables

    @property
    def optimizer_state_shares(self) -> list[float] | None:
        """With sharded optimizer state, per rank the share of the trainable weights (in bytes)
        whose optimizer state it keeps; else None."""
        if self._steps.sharded is None:
            return None
        owned = self._steps.sharded.owned_bytes()
        return [b / sum(owned) for b in owned]

    @property
    def slot_transfer(self) -> state.SlotTransfer | None:
        """With sharded optimizer state, what moves the other workers' state to and from the
        chief's checkpoints; else None."""
        if self._steps.sharded is None:
            return None
        return state.SlotTransfer(self.backend, self.training_state)

    def finalize_variable_values(self) -> None:
        """As Keras's `fit` ends: the optimizer's final values replace the weights (with
        `use_ema`, the moving averages), on every worker; with sharded state each owner
        replaces its own and shares them."""
        self.optimizer.finalize_variable_values(self._steps.owned_variables())
        # Keras replaces weights only with use_ema: otherwise every worker holds them already.
        if self._steps.sharded is not None and precision.unscaled(self.optimizer).use_ema:
            with comm.collective("the final weights' allgather"):
                self._steps.sharded.share_weights("final_weights")

    def broadcast_from_chief(self) -> None:
        """Overwrite model and optimizer state with rank 0's (`comm.broadcast_in_place`: in groups
        of at most 32 MiB, a larger variable alone; no copy of the whole state is ever made). In
        an elastic job the `Controller` does it instead: from the worker furthest along."""
        if self.backend.num_workers() == 1 or self.backend.elastic:
            return
        with comm.collective("the start-up broadcast"):
            comm.broadcast_in_place(self.backend, self.state_variables)

    @property
    def synchronized_variables(self) -> list:
        """What an elastic job's workers take from the one furthest along when they regroup:
        `state_variables` and the metrics' running states."""
        running = self.metrics.running_variables if self.metrics is not None else []
        return self.state_variables + running

    def resize(self) -> None:
        """Train on as many workers as there are now (an elastic job's new group): the same
        global batch, k following, the steps traced anew; the window in progress is dropped.

        Raises:
            ValueError: the global batch cannot be split over this many workers.
        """
        self._batch = self._batch.on(self.backend.num_workers())
        self._steps.drop_window()
        self._steps.retrace(data.unpack(self._element_spec), self.micro_batch_size)

    def micro_step(self, x, y, sample_weight=None) -> None:
        """Forward, backward and accumulate one micro-batch on this worker. No communication."""
        self._steps.micro_step(x, y, sample_weight)

    def micro_steps(self, micro_batches: Sequence[tuple]) -> None:
        """`micro_step` on each of `micro_batches` (`(x, y, sample_weight or None)`), in order,
        in one compiled call when they have the same shapes (a loop in the graph: one Python
        round trip instead of one per micro-batch, the `steps_per_execution` idea). If one
        cannot be trained on, its error is raised and the stored sums are left undefined for
        this window: call `micro_step` on them one by one to find it, or report the window bad.
        """
        self._steps.micro_steps(micro_batches)

    def update_step(self, stop_vote: bool = False, cancel_vote: bool = False,
                    bad_micro_batch: int = 0, step: int | None = None,
                    last_micro_batch: tuple | None = None,
                    change_vote: bool = False) -> UpdateResult:
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
                not given to `micro_step`: trained in the same compiled call, its gradient added
                to the stored sums as it is computed (one call per window less). If it cannot
                be trained on (its error is raised), nothing was reduced or applied: call
                `update_step` again without it, reporting it as `bad_micro_batch`.
            change_vote: this worker heard that workers will join or leave (an elastic job):
                every worker regroups after this update.
        """
        bad = [0.0] * self.backend.num_workers()
        bad[self.backend.rank()] = float(bad_micro_batch)
        votes = tf.constant([float(stop_vote), float(cancel_vote), float(change_vote), *bad])
        with comm.collective(f"update step {step}'s allreduce" if step else
                             "the update step's allreduce"):
            return self._steps.update_step(votes, last_micro_batch)

    def refusing_part(self, x, y, sample_weight=None) -> diagnosis.Refusal | None:
        """What in a training step refuses this micro-batch (the model, the loss, a metric), in
        one line, or None; run after a step failed on it (`diagnosis`)."""
        return self._steps.refusing_part(x, y, sample_weight)

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
        totals = self._steps.evaluation_totals(dataset)
        with comm.collective("validation"):
            [totals, *metric_states] = self.backend.sum_all(
                [totals] + self._steps.metric_states(), "validation")
        results = {"loss": self._steps.evaluation_loss(totals)}
        if self.metrics is not None:
            results.update(self.metrics.evaluation_results(metric_states))
        return results

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
        rebuild=None,
        regrouped=None,
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
            rebuild, regrouped: in an elastic job, what the workers train on once they have
                rejoined, and what a worker adds once they have regrouped (see `Controller`).

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
            if rebuild is not None:
                rebuild = _with_class_weight(rebuild, class_weight)
        controller = Controller(self, callbacks=callbacks, options=options,
                                save_checkpoint=save_checkpoint, rebuild=rebuild,
                                regrouped=regrouped)
        return controller.run(dataset, epochs=epochs, update_steps=update_steps,
                              validation_dataset=validation_data, start=start)
