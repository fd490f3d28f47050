"""The main job: a `TrainConfig` turned into a training run through the public API.

Builds the bundled data and model, shards the data across workers, trains with exact
accumulation, writes TensorBoard logs and the trained model (chief only), and reports.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import keras
import tensorflow as tf

from distaccum import catalog, comm, data
from distaccum.config import ConfigError, TrainConfig
from distaccum.progress import ProgressReporter
from distaccum.summaries import TensorBoardWriter
from distaccum.trainer import Trainer


@dataclass(frozen=True)
class JobResult:
    """What the run achieved, as reported in the final summary."""

    update_steps: int
    samples_per_second: float
    validation: dict
    model_path: Path
    logdir: Path


def build_optimizer(config: TrainConfig, total_update_steps: int) -> keras.optimizers.Optimizer:
    """The configured optimizer; a cosine schedule spans the whole run in update steps."""
    learning_rate = config.learning_rate
    if config.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if config.warmup_steps else config.learning_rate,
            decay_steps=max(total_update_steps - config.warmup_steps, 1),
            warmup_target=config.learning_rate if config.warmup_steps else None,
            warmup_steps=config.warmup_steps,
        )
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9)
    return keras.optimizers.Adam(learning_rate=learning_rate)


def worker_datasets(config: TrainConfig, split: catalog.Split):
    """This worker's micro-batches of the training set (reshuffled every epoch) and its share
    of the validation set."""
    # Same seed on every worker: all shuffle identically, so `shard` splits disjointly.
    train = (
        tf.data.Dataset.from_tensor_slices((split.x_train, split.y_train))
        .shuffle(len(split.x_train), seed=config.seed, reshuffle_each_iteration=True)
    )
    validation = tf.data.Dataset.from_tensor_slices((split.x_validation, split.y_validation))
    return (
        data.shard(train).batch(config.micro_batch_size).prefetch(2),
        data.shard(validation).batch(config.micro_batch_size),
    )


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


def describe_start(config: TrainConfig, updates_per_epoch, total: int, logdir: Path) -> str:
    workers = comm.num_workers()
    return "\n".join([
        f"distaccum: num_workers {workers}, micro_batch_size {config.micro_batch_size}, "
        f"accumulation_steps {config.accumulation_steps}, global_batch_size "
        f"{workers * config.accumulation_steps * config.micro_batch_size}",
        f"distaccum: {updates_per_epoch} updates per epoch, {total} update steps in all",
        f"distaccum: TensorBoard logs in {logdir}, trained model to {logdir / 'model.keras'}",
    ])


def describe_end(result: JobResult) -> str:
    metrics = ", ".join(f"validation {k} {v:.4f}" for k, v in result.validation.items())
    return "\n".join([
        f"distaccum: done: {result.update_steps} update steps, "
        f"{result.samples_per_second:,.0f} samples/s, {metrics}",
        f"distaccum: model saved to {result.model_path}",
        f"distaccum: view the logs with: tensorboard --logdir {result.logdir}",
    ])


def run(config: TrainConfig, stream: TextIO | None = None) -> JobResult:
    """Train as configured on every worker; the chief reports, logs and saves the model."""
    stream = stream or sys.stdout
    comm.init()
    chief = comm.is_chief()
    logdir = prepare_logdir(config.logdir) if chief else Path(config.logdir).resolve()
    split = catalog.load_dataset(config.dataset)
    model = catalog.build_model(config.model, split.x_train.shape[1], config.seed)
    train, validation = worker_datasets(config, split)
    plan = data.agree_on_epoch_plan(train, config.accumulation_steps)
    total = config.update_steps or config.epochs * plan.updates_per_epoch
    trainer = Trainer(
        model,
        build_optimizer(config, total),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        accumulation_steps=config.accumulation_steps,
        clip_global_norm=config.clip_global_norm,
    )
    trainer.prepare(train.element_spec)
    callbacks = []
    if chief:
        print(describe_start(config, plan.updates_per_epoch, total, logdir), file=stream, flush=True)
        writer = TensorBoardWriter(str(logdir), trainer.allreduce_per_update)
        writer.write_config(config.to_dict())
        callbacks = [ProgressReporter(total, stream), writer]
    history = trainer.fit(
        train,
        epochs=config.epochs,
        update_steps=config.update_steps,
        validation_data=validation,
        callbacks=callbacks,
        log_interval=config.log_interval,
    )
    result = JobResult(
        update_steps=history.update_steps,
        samples_per_second=history.samples / history.seconds if history.seconds else math.nan,
        validation=history.validation[-1],
        model_path=logdir / "model.keras",
        logdir=logdir,
    )
    if chief:
        writer.close()
        model.save(result.model_path)
        print(describe_end(result), file=stream, flush=True)
    return result
