"""The main job: a `TrainConfig` turned into a training run through the public API.

Loads the data and model the config names (`sources`: bundled, import paths or files: each
worker's micro-batches), trains with exact accumulation through `Trainer.fit`, writes TensorBoard
logs, checkpoints and the trained model (chief only), and reports.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import keras
import tensorflow as tf

from distaccum import comm, data, devices, elastic, precision, sources
from distaccum.checkpoint import OBJECTIVE, CheckpointError, CheckpointManager, read_array
from distaccum.config import ConfigError, TrainConfig
from distaccum.progress import ProgressReporter, loss_first
from distaccum.history import Position
from distaccum.microbatches import MicroBatches
from distaccum.mixtures import Mixture
from distaccum.summaries import TensorBoardWriter
from distaccum.trainer import Trainer, compiled_arguments


@dataclass(frozen=True)
class JobResult:
    """What the run achieved, as reported in the final summary."""

    update_steps: int
    samples_per_second: float
    validation: dict
    model_path: Path
    logdir: Path


# Mini-batch SGD without momentum rarely trains well; `optimizer_args` can set another value.
SGD_DEFAULTS = {"momentum": 0.9}
# What configures the optimizer `build_optimizer` builds (not a compiled model's own).
OPTIMIZER_SETTINGS = ("learning_rate", "lr_schedule", "warmup_steps", "optimizer_args")
# Beside the checkpoints: the record files' index, so that a restart does not scan them again.
RECORD_INDEX = "record-index.json"


def build_optimizer(config: TrainConfig, model: keras.Model,
                    total_update_steps: int) -> keras.optimizers.Optimizer:
    """The configured optimizer, with its learning rate or schedule (a cosine schedule spans the
    whole run in update steps); with no `optimizer` key, a compiled model's own optimizer as
    compiled, else Adam."""
    if config.optimizer is None and getattr(model, "compiled", False):
        ignored = config.changed(OPTIMIZER_SETTINGS)
        if ignored:
            raise ConfigError(
                f"{ignored[0]}: the model's compiled optimizer ({type(model.optimizer).__name__}) "
                f"trains as compiled when no optimizer is named, so {', '.join(ignored)} would "
                f"not apply; name one (optimizer: {type(model.optimizer).__name__.lower()}) to "
                f"set them. Received: {ignored[0]}={getattr(config, ignored[0])!r}")
        return model.optimizer
    learning_rate = config.learning_rate
    if config.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if config.warmup_steps else config.learning_rate,
            decay_steps=max(total_update_steps - config.warmup_steps, 1),
            warmup_target=config.learning_rate if config.warmup_steps else None,
            warmup_steps=config.warmup_steps,
        )
    name = config.optimizer or "adam"
    arguments = {**(SGD_DEFAULTS if name.lower() == "sgd" else {}), **config.optimizer_args}
    try:
        return keras.optimizers.get({"class_name": name,
                                     "config": {**arguments, "learning_rate": learning_rate}})
    except (ValueError, TypeError) as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(f"optimizer: cannot build it with optimizer_args {config.optimizer_args}"
                          f" ({reason}). Received: optimizer={config.optimizer!r}") from None


def build_trainer(config: TrainConfig, job_data: sources.JobData, total_update_steps: int,
                  accumulation_steps: int) -> Trainer:
    """The configured model (built under the configured dtype policy), optimizer, loss and
    metrics, accumulating `accumulation_steps` micro-batches per update (with
    `global_batch_size`, the trainer keeps it: an elastic job's k follows the worker count)."""
    keras.mixed_precision.set_global_policy(config.precision)
    model = sources.load_model(config, job_data)
    arguments = sources.compile_arguments(config, model)
    optimizer = build_optimizer(config, model, total_update_steps)
    try:
        batch = ({"accumulation_steps": accumulation_steps} if config.global_batch_size is None
                 else {"global_batch_size": config.global_batch_size,
                       "micro_batch_size": config.micro_batch_size})
        trainer = Trainer(model, optimizer, **arguments, **batch,
                          clip_global_norm=config.clip_global_norm,
                          shard_optimizer_state=config.shard_optimizer_state,
                          allreduce_dtype=config.allreduce_dtype,
                          jit_compile={"true": True, "false": False}.get(config.jit_compile, "auto"))
    except (ValueError, TypeError) as error:  # a loss or metric name Keras does not know, or an
        # allreduce_dtype this backend cannot sum: the message names the value
        raise ConfigError(str(error).splitlines()[0]) from None
    # The model holds what trains it: Keras callbacks then find this optimizer, and the saved
    # model.keras continues it (`load_model(..., compile=True)`: its state and iterations).
    model.compile(optimizer=trainer.optimizer, jit_compile=trainer.jit_compile, **arguments)
    return trainer


def prepare_logdir(logdir: str) -> Path:
    """Create the log directory (chief) and check it is writable before any training."""
    path = Path(logdir).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"logdir: not writable ({error.strerror}). Received: logdir={logdir!r}")
    return path


@dataclass(frozen=True)
class BatchShape:
    """How a run splits its global batch: workers × k × micro-batch."""

    num_workers: int
    accumulation_steps: int
    micro_batch_size: int

    @property
    def global_batch_size(self) -> int:
        return self.num_workers * self.accumulation_steps * self.micro_batch_size

    @classmethod
    def of(cls, settings: dict) -> "BatchShape":
        return cls(settings["num_workers"], settings["accumulation_steps"],
                   settings["micro_batch_size"])

    def split(self, other: "BatchShape") -> str:
        """`k=2`, with the micro-batch size when it differs from `other`'s."""
        micro_batch = (f" × micro-batch {self.micro_batch_size}"
                       if self.micro_batch_size != other.micro_batch_size else "")
        return f"k={self.accumulation_steps}{micro_batch}"


def describe_resume(start: Position, shape: BatchShape, previous: BatchShape | None) -> str:
    """Where training resumes, and on what, when the checkpoint was written on another shape."""
    if not start.update_step:
        return "distaccum: starting from scratch (no checkpoint)"
    line = f"distaccum: resuming after update step {start.update_step} (epoch {start.epoch})"
    if previous is None or previous == shape:
        return line
    workers = f"{shape.num_workers} worker{'s' if shape.num_workers > 1 else ''}"
    return (f"{line} on {workers} × {shape.split(previous)} (was "
            f"{previous.num_workers} × {previous.split(shape)}); global batch "
            f"{shape.global_batch_size} unchanged")


def applied_training(trainer: Trainer) -> dict:
    """What trains, as built rather than as asked: the optimizer with its learning rate or
    schedule, each output's loss with its reduction, the metrics. The start-up block prints it
    and TensorBoard's `config` text records it."""
    optimizer = precision.unscaled(trainer.optimizer)
    rate = optimizer._learning_rate  # a schedule, or the variable holding a constant rate
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        config = {k: v for k, v in rate.get_config().items() if k != "name"}
        learning_rate = f"{type(rate).__name__}({', '.join(f'{k}={v}' for k, v in config.items())})"
    else:
        learning_rate = f"{float(optimizer.learning_rate):g}"
    compiled = compiled_arguments(trainer.model)
    metrics = [m for key in ("metrics", "weighted_metrics")
               for m in tf.nest.flatten(compiled.get(key) or [])]
    shares = trainer.optimizer_state_shares
    sharded = "" if shares is None else (
        f", its state sharded over {len(shares)} workers (shares of the weights: "
        f"{', '.join(f'{share:.0%}' for share in shares)})")
    return {
        "optimizer": f"{type(optimizer).__name__} (learning rate {learning_rate}){sharded}",
        "loss": ", ".join(_loss_text(o) for o in trainer.objective.losses),
        "metrics": ", ".join(getattr(m, "name", None) or str(m) for m in metrics) or "none",
        "precision": trainer.model.dtype_policy.name,
    }


def _loss_text(output_loss) -> str:
    """`output: name (reduction, weight w)`; a name Keras resolves by the labels ("ce") keeps
    Keras's default reduction."""
    loss = output_loss.loss
    name, reduction = ((loss, "sum_over_batch_size") if isinstance(loss, str)
                       else (loss.name, loss.reduction))
    weight = f", weight {output_loss.weight:g}" if output_loss.weight != 1 else ""
    return f"{output_loss.output}: {name} ({reduction}{weight})"


def describe_start(config: TrainConfig, shape: BatchShape, updates_per_epoch, total: int,
                   logdir: Path, resumed: str, device_codes: list[int],
                   notes: tuple[str, ...], applied: dict, jit_compiled: bool = False) -> str:
    return "\n".join([
        f"distaccum: num_workers {shape.num_workers}, micro_batch_size {shape.micro_batch_size}, "
        f"accumulation_steps {shape.accumulation_steps}, global_batch_size "
        f"{shape.global_batch_size}",
        f"distaccum: {updates_per_epoch} updates per epoch, {total} update steps in all",
        f"distaccum: optimizer {applied['optimizer']}; loss {applied['loss']}; metrics "
        f"{applied['metrics']}",
        *notes,
        f"distaccum: training on {devices.describe(device_codes)} ({comm.current().name} "
        f"collectives, precision {config.precision}"
        f"{' with loss scaling' if config.precision == 'mixed_float16' else ''}"
        # With one worker no sum travels, so none is rounded to allreduce_dtype.
        f"{f', gradient sums in {config.allreduce_dtype}' if shape.num_workers > 1 else ''}"
        f"{', XLA' if jit_compiled else ''})",
        f"distaccum: TensorBoard logs in {logdir}, trained model to {logdir / 'model.keras'}",
        f"distaccum: checkpoints in {logdir / 'checkpoints'} every {config.checkpoint_interval} "
        f"update steps and on SIGTERM",
        resumed,
    ])


def describe_end(result: JobResult, sharded_state: bool = False) -> str:
    figures = [f"{result.update_steps} update steps", f"{result.samples_per_second:,.0f} samples/s"]
    figures += [f"validation {k} {v:.4f}" for k, v in loss_first(result.validation)]
    uncompiled = (" uncompiled: its optimizer state was sharded over the workers, and the "
                  f"checkpoints in {result.logdir / 'checkpoints'} hold it whole (run again with "
                  "this logdir to continue)") if sharded_state else ""
    return "\n".join([
        f"distaccum: done: {', '.join(figures)}",
        f"distaccum: model saved to {result.model_path}{uncompiled}",
        f"distaccum: view the logs with: tensorboard --logdir {result.logdir}",
    ])


def _resume(trainer: Trainer, manager: CheckpointManager | None,
            settings: dict) -> tuple[Position, dict | None]:
    """The chief loads the latest checkpoint; every worker then gets its state and position.
    Also the checkpoint's settings (the chief's; None elsewhere and on a fresh start). In an
    elastic job the chief keeps them: the workers take the state of the one furthest along when
    training starts (`Controller`), which may be a worker already training."""
    position, restored = Position(), None
    transfer = trainer.slot_transfer
    if manager is not None:
        restored = manager.restore_latest(trainer.training_state.entries(), settings,
                                          legacy=None if transfer else trainer.state_variables)
        if restored is not None:
            position = restored.position
    if comm.elastic():
        return position, restored and restored.settings
    encoded = tf.constant([position.update_step, position.epoch, position.windows_done,
                           restored is not None], tf.int64)
    with comm.collective("the start-up broadcast"):
        [encoded] = comm.current().broadcast([encoded])
    trainer.broadcast_from_chief()
    if transfer is not None and encoded[-1]:  # the other workers' optimizer state, to them
        with comm.collective("the restored optimizer state's broadcast"):
            transfer.scatter(restored and (lambda index: read_array(restored.path, index)))
    return Position(*(int(v) for v in encoded[:-1].numpy())), restored and restored.settings


def _resume_settings(config: TrainConfig, shape: BatchShape) -> dict:
    """The config as this run applies it: what a checkpoint records and a resume checks."""
    return {**config.to_dict(), "num_workers": shape.num_workers,
            "accumulation_steps": shape.accumulation_steps,
            "global_batch_size": shape.global_batch_size, "objective": OBJECTIVE}


def _resize_notes(job_data: sources.JobData, shape: BatchShape,
                  previous: BatchShape | None) -> tuple[str, ...]:
    """What a resume on another shape cannot keep: a dataset function's samples per update
    depend on the worker count (`micro_batches`' do not). In an elastic job, that the count may
    change while it trains."""
    if comm.elastic():
        return ("distaccum: elastic (horovodrun): workers may leave and join while the job "
                "trains; k follows their number, the global batch and each update's samples stay",)
    if previous is None or previous.num_workers == shape.num_workers \
            or not isinstance(job_data.train, data.DatasetEpochs):
        return ()
    return (f"distaccum: warning: the dataset is a function, which every worker shards by "
            f"worker count: on {shape.num_workers} workers (was {previous.num_workers}) updates "
            "keep the global batch but not their samples, so the run is not the one it "
            "continues sample for sample (arrays, .npz and record files keep them)",)


def run(config: TrainConfig, stream: TextIO | None = None) -> JobResult:
    """Train as configured on every worker, resuming from the latest checkpoint in the logdir;
    the chief reports, logs, checkpoints and saves the model.

    Raises:
        TrainingInterrupted: SIGTERM; a checkpoint was saved at the update where all stopped.
    """
    stream = stream or sys.stdout
    comm.init()
    comm.set_collective_timeout(config.collective_timeout)
    shape = BatchShape(comm.num_workers(), config.accumulation_steps_on(comm.num_workers()),
                       config.micro_batch_size)
    chief = comm.is_chief()
    logdir = prepare_logdir(config.logdir) if chief else Path(config.logdir).resolve()
    manager = CheckpointManager(logdir / "checkpoints", keep=config.keep_checkpoints)
    if chief:
        try:
            manager.check_writable()
        except CheckpointError as error:
            raise ConfigError(f"logdir: {error}. Received: logdir={config.logdir!r}") from None
    job_data = sources.load_data(config, logdir / RECORD_INDEX)
    try:
        plan = job_data.train.plan(shape.accumulation_steps)
    except ValueError as error:  # an empty dataset
        raise ConfigError(f"dataset: {error}. Received: dataset={config.dataset!r}") from None
    if comm.elastic():
        try:
            elastic.refuse_unless_exact(config.global_batch_size, job_data.train)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    total = config.update_steps or config.epochs * plan.updates_per_epoch
    trainer = build_trainer(config, job_data, total, shape.accumulation_steps)
    trainer.prepare(job_data.train.element_spec)
    # As applied: the worker count, k and the global batch, what trains (as built), and the
    # samples the order is drawn from (a dataset function's tf.data.Dataset has no count).
    settings = {**_resume_settings(config, shape), "applied": applied_training(trainer)}
    if isinstance(job_data.train, (MicroBatches, Mixture)):
        settings["training_samples"] = job_data.train.num_samples
        if job_data.train.fingerprint:  # a listing of files
            settings["training_files"] = job_data.train.fingerprint
    start, saved = _resume(trainer, manager if chief else None, settings)
    previous = BatchShape.of(saved) if saved and "num_workers" in saved else None
    device_codes = comm.gather_device_codes()

    def save_checkpoint(position: Position) -> None:  # by the chief of the moment
        manager.save_from_every_worker(position, trainer.training_state, settings,
                                       chief=comm.is_chief(), transfer=trainer.slot_transfer)

    def rebuild() -> data.EpochSource:
        """An elastic job's new group: k for its worker count (one that the global batch does
        not allow is a `ConfigError` naming it), the data read anew (the start-up collectives a
        joining process runs), the steps traced for it."""
        nonlocal job_data
        config.accumulation_steps_on(comm.num_workers())
        job_data = sources.load_data(config, logdir / RECORD_INDEX)
        trainer.resize()
        comm.gather_device_codes()
        return job_data.train

    callbacks = []

    def regrouped(position: Position) -> list:
        """A worker that became the chief takes over the progress line and TensorBoard."""
        if not comm.is_chief() or callbacks:
            return []
        callbacks.extend(_chief_callbacks(logdir, trainer, position, total, stream))
        return callbacks

    if chief:
        print(describe_start(config, shape, plan.updates_per_epoch, total, logdir,
                             describe_resume(start, shape, previous), device_codes,
                             job_data.notes + _resize_notes(job_data, shape, previous),
                             settings["applied"], trainer.jit_compile),
              file=stream, flush=True)
        callbacks = _chief_callbacks(logdir, trainer, start, total, stream)
        callbacks[-1].write_config(settings)
    history = trainer.fit(
        job_data.train,
        epochs=config.epochs,
        update_steps=config.update_steps,
        validation_data=job_data.validation,
        callbacks=callbacks,
        log_interval=config.log_interval,
        max_consecutive_skips=config.max_consecutive_skips,
        collective_timeout=config.collective_timeout,
        checkpoint_interval=config.checkpoint_interval,
        save_checkpoint=save_checkpoint,
        start=start,
        rebuild=rebuild,
        regrouped=regrouped,
    )
    result = JobResult(
        update_steps=start.update_step + history.update_steps,
        samples_per_second=history.samples / history.seconds if history.update_steps else 0.0,
        # A run found already complete still reports its model's validation metrics.
        validation=(history.validation[-1] if history.validation
                    else trainer.evaluate(job_data.validation)
                    if job_data.validation is not None else {}),
        model_path=logdir / "model.keras",
        logdir=logdir,
    )
    if comm.is_chief():
        callbacks[-1].close()
        save_model(trainer, result.model_path)
        print(describe_end(result, trainer.slot_transfer is not None), file=stream, flush=True)
    return result


def _chief_callbacks(logdir: Path, trainer: Trainer, start: Position, total: int,
                     stream: TextIO) -> list:
    """The chief's progress line and TensorBoard writer (last), from update `start` on."""
    return [ProgressReporter(total, stream),
            TensorBoardWriter(str(logdir), trainer.allreduce_per_update, start.update_step)]


def save_model(trainer: Trainer, path: Path) -> None:
    """`model.keras`, compiled with its optimizer state, so that `load_model` continues it; with
    sharded optimizer state, uncompiled: the chief holds only its share of that state, which
    Keras would find short of the model's variables and drop with a warning at every load."""
    model = trainer.model
    if trainer.slot_transfer is None:
        model.save(path)
        return
    compiled, model.compiled = model.compiled, False
    try:
        model.save(path)
    finally:
        model.compiled = compiled
