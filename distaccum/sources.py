"""Where the job's model, data, loss, metrics and optimizer come from: what a config names.

A config names each by what a user has: a bundled name (`catalog`), an import path
`package.module:name` (found on `PYTHONPATH`, or under `--workdir`; for data, a function
returning a `tf.data.Dataset`, a random-access source, or a tuple of two of them), or files
(`.keras` for a model, `.npz` for data, a glob of TFRecord files with a `parse` function, a
folder of images per class ending in `/`). Every
value is resolved here, on every worker, before any training, and
every bad one is a `ConfigError`: one line naming the key and the value.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import keras
import numpy as np
import tensorflow as tf
from keras.src.losses.losses import LossFunctionWrapper  # how Keras's compile wraps a function

from distaccum import catalog, comm, data, imagefolders, randomaccess, recordfiles
from distaccum.microbatches import MicroBatches, micro_batches
from distaccum.mixtures import Mixture
from distaccum.trainer import compiled_arguments
from distaccum.config import (BUNDLED_DATASETS, BUNDLED_MODELS, ConfigError, TrainConfig,
                              is_import_path, is_table_pattern, source_kind)

# The metrics of the bundled models, which produce class logits.
BUNDLED_METRICS = ("accuracy",)
# Beside the record index: the kept listing of folders of images.
IMAGE_LISTING = "image-listing.json"
# Keys of an .npz dataset: required, then optional.
NPZ_REQUIRED = ("x", "y")
NPZ_OPTIONAL = ("sample_weight", "x_val", "y_val")


@dataclass(frozen=True)
class JobData:
    """A job's data as the training loop reads it: this worker's micro-batches of the training
    set, its share of the validation set (None without one), and what the start-up block says
    about them."""

    train: MicroBatches | Mixture | data.DatasetEpochs
    validation: MicroBatches | tf.data.Dataset | None
    notes: tuple[str, ...] = ()


def import_object(key: str, value: str):
    """The object an import path names; a `ConfigError` naming the key and the value if the
    module does not import or has no such name."""
    module_name, _, name = value.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - whatever the user's module raises, one line
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{key}: module {module_name!r} does not import ({reason}; is its "
                          f"directory on PYTHONPATH or --workdir?). Received: {key}={value!r}"
                          ) from None
    if not hasattr(module, name):
        raise ConfigError(f"{key}: module {module_name!r} has no {name!r}. Received: "
                          f"{key}={value!r}")
    return getattr(module, name)


def _call(key: str, value: str, function, arguments: dict):
    if not callable(function):
        raise ConfigError(f"{key}: not callable. Received: {key}={value!r}")
    try:
        return function(**arguments)
    except Exception as error:  # noqa: BLE001 - the user's code: say where it failed, in one line
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ConfigError(f"{key}: calling it failed ({type(error).__name__}: {reason}). "
                          f"Received: {key}={value!r}") from None


def load_data(config: TrainConfig, index_file: Path | None = None) -> JobData:
    """The training and validation data the config's `dataset` (and `validation_dataset`,
    `parse`) name, as this worker's micro-batches. Record files are indexed (kept in
    `index_file`); every other worker must call this too."""
    train, validation, notes = _load("dataset", config.dataset, config, index_file)
    if config.validation_dataset is not None:
        # A validation folder labels its images with the training folder's classes.
        classes = getattr(getattr(train, "samples", None), "class_names", None)
        validation, _, more = _load("validation_dataset", config.validation_dataset, config,
                                    index_file, shuffled=False, class_names=classes)
        notes += more
    return JobData(train, validation, tuple(notes))


def _load(key: str, value, config: TrainConfig, index_file: Path | None,
          shuffled: bool = True, class_names=None):
    """(data, the validation data it came with or None, notes) for one config key: the
    training data when `shuffled`, else a validation set."""
    if isinstance(value, list):
        return _from_mixture(config, index_file)
    kind = source_kind(value, config.parse)
    if kind in ("records", "tables"):
        return _from_files(key, value, config, index_file)
    if kind == "folder":
        return _from_image_folder(key, value, config, class_names, index_file)
    if kind == "function":
        return _from_function(key, value, config, shuffled)
    if kind == "bundled" and shuffled:
        split = catalog.load_dataset(value)
        arrays = [(split.x_train, split.y_train), (split.x_validation, split.y_validation)]
    elif kind == "npz":
        arrays = _read_npz(key, value)
    else:
        raise ConfigError(f"{key}: not a bundled training set ({', '.join(BUNDLED_DATASETS)}), "
                          "an import path (package.module:function), an .npz file, a folder "
                          "of images ending in /, Parquet or Arrow IPC files, or (with parse:) "
                          f"a glob of TFRecord files. Received: {key}={value!r}")
    batches = [None if a is None else _micro_batches(key, value, a, config) for a in arrays]
    return batches[0], batches[1], []


def _from_mixture(config: TrainConfig, index_file: Path | None):
    """A mixture's sources, each loaded as `dataset` would be (validation data they come with
    is not used: give validation_dataset)."""
    parts, notes = [], []
    for key, value in config.training_sources():
        train, _, more = _load(key, value, config, index_file)
        if not isinstance(train, MicroBatches):
            raise ConfigError(f"{key}: a mixture takes sources read in the order's windows "
                              "(arrays, record or table files, folders of images, random-access "
                              "sources), not a tf.data.Dataset, whose samples per update cannot "
                              f"be dealt. Received: {key}={value!r}")
        parts.append(train)
        notes += more
    weights = [entry["weight"] for entry in config.dataset]
    try:
        mixed = Mixture(parts, weights)
    except ValueError as error:  # sources of other forms: one line naming the mixture
        raise ConfigError(f"dataset: {error}") from None
    shares = ", ".join(f"{w / sum(weights):.0%} {value}"
                       for w, (_, value) in zip(weights, config.training_sources()))
    unvalidated = "" if config.validation_dataset else (
        "; no validation set (the sources' own are not used: give validation_dataset)")
    return mixed, None, notes + [f"distaccum: dataset: a mixture of {len(parts)} sources: "
                                 f"{shares} of every update{unvalidated}"]


def _micro_batches(key: str, value: str, source, config: TrainConfig,
                   index_file: Path | None = None, parse=None, columns=None) -> MicroBatches:
    """`micro_batches`, its errors as one line naming the config key at fault."""
    try:
        return micro_batches(source, config.micro_batch_size, parse=parse, columns=columns,
                             seed=config.seed, partitions=config.partitions,
                             shuffle_buffer=config.shuffle_buffer, index_file=index_file)
    except recordfiles.RecordFileError as error:
        raise ConfigError(f"{key}: {error}. Received: {key}={value!r}") from None
    except recordfiles.ParseError as error:
        if config.parse is None:  # tables' columns: the message starts "columns: "
            raise ConfigError(str(error)) from None
        raise ConfigError(f"parse: {error}. Received: parse={config.parse!r}") from None
    except ValueError as error:  # the worker count does not divide partitions, say
        message = str(error).splitlines()[0]
        at_fault = "partitions" if message.startswith("num_workers") else key
        raise ConfigError(f"{at_fault}: {message}") from None


def _from_files(key: str, value: str, config: TrainConfig, index_file: Path | None):
    """TFRecord files, or Parquet or Arrow IPC files (tables), indexed."""
    parse = None if config.parse is None else import_object("parse", config.parse)
    table = is_table_pattern(value)
    batches = _micro_batches(key, value, value, config, index_file, parse,
                             config.columns if table else None)
    files = batches.samples.files
    kept = len(files.paths) - files.scanned
    how = (f"index kept from an earlier run ({files.seconds:.1f} s)" if not files.scanned else
           f"indexed in {files.seconds:.1f} s" + (f" ({kept} files from the kept index)" if kept
                                                  else ""))
    kind = (f"table files, {sum(files.sizes):,} rows in {len(batches.samples.sizes):,} row "
            "groups" if table else f"record files, {sum(files.sizes):,} records")
    note = f"distaccum: {key}: {len(files.paths)} {kind}, {how}"
    if table:  # a row group is decoded whole: say what holding them costs
        held = config.partitions // comm.num_workers() * batches.samples.group_bytes
        note += (f"; a worker holds about one decoded row group per partition it reads, up to "
                 f"{held / 2**20:,.1f} MB (smaller row groups hold less)")
    return batches, None, [note]


def _from_image_folder(key: str, value: str, config: TrainConfig, class_names,
                       index_file: Path | None):
    """A folder of class subfolders of images, listed (on every worker: one collective)."""
    listing = None if index_file is None else index_file.with_name(IMAGE_LISTING)
    try:
        folder = imagefolders.ImageFolder(value, class_names=class_names, listing_file=listing,
                                          **config.image_options)
    except imagefolders.ImageFolderError as error:
        if error.in_options:  # the message names the option and its value
            raise ConfigError(f"image_options: {error}") from None
        raise ConfigError(f"{key}: {error}. Received: {key}={value!r}") from None
    how = ("listing kept from an earlier run" if folder.listing_kept else "listed") + \
        f" in {folder.listing_seconds:.1f} s"
    notes = [f"distaccum: {key}: {len(folder.paths):,} images in {len(folder.class_names)} "
             f"classes, {how}"]
    notes += [f"distaccum: warning: {key}: class folder {name!r} holds no image; it keeps label "
              f"{folder.class_names.index(name)}, as in Keras" for name in folder.empty_classes]
    return _micro_batches(key, value, folder, config), None, notes


def _from_function(key: str, value: str, config: TrainConfig, shuffled: bool):
    """What a dataset function returns, by its type: a `tf.data.Dataset` of samples, a
    random-access source (`randomaccess`), or a tuple of two of them (training, validation)."""
    returned = _call(key, value, import_object(key, value), config.dataset_args)
    samples, validation = returned if isinstance(returned, tuple) else (returned, None)
    if validation is not None:
        validation = _validation(key, value, validation, config)
    if randomaccess.is_random_access(samples):
        return (_micro_batches(key, value, samples, config, columns=config.columns), validation,
                [])
    if config.columns is not None:
        raise ConfigError(f"columns: is for Parquet or Arrow IPC files and random-access sources "
                          f"of rows; {key}={value!r} returns a {type(samples).__name__}, which "
                          f"would ignore it. Received: columns={config.columns!r}")
    _check_samples(key, value, "training", samples)
    if not shuffled:
        return data.shard(samples).batch(config.micro_batch_size), None, []
    if int(samples.cardinality()) == tf.data.INFINITE_CARDINALITY:
        raise ConfigError(f"{key}: the training data repeats forever; return one pass over it "
                          f"(distaccum repeats it per epoch). Received: {key}={value!r}")
    train = data.DatasetEpochs(data.shuffled_shards(samples, config.micro_batch_size,
                                                    config.seed, config.shuffle_buffer))
    note = (f"distaccum: {key}: a tf.data.Dataset: every worker reads all of its data and keeps "
            f"1/{comm.num_workers()}; record files and random-access sources are read 1/N per "
            "worker (README: Data at scale)")
    return train, validation, [note] if comm.num_workers() > 1 else []


def _validation(key: str, value: str, returned, config: TrainConfig):
    """A dataset function's validation data: this worker's share, in micro-batches."""
    if randomaccess.is_random_access(returned):
        return _micro_batches(key, value, returned, config, columns=config.columns)
    _check_samples(key, value, "validation", returned)
    return data.shard(returned).batch(config.micro_batch_size)


def _read_npz(key: str, value: str) -> list:
    """[(x, y[, sample_weight]), (x_val, y_val) or None] from an .npz file."""
    try:
        with np.load(value) as arrays:
            found = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: cannot read the .npz file ({error}). Received: "
                          f"{key}={value!r}") from None
    missing = [name for name in NPZ_REQUIRED if name not in found]
    if missing or ("x_val" in found) != ("y_val" in found):
        raise ConfigError(f"{key}: an .npz dataset holds x and y (and optionally sample_weight, "
                          f"x_val with y_val); missing {missing or ['x_val or y_val']}. "
                          f"Received: {key}={value!r}")
    train = (found["x"], found["y"]) + ((found["sample_weight"],) if "sample_weight" in found
                                        else ())
    if any(len(array) != len(found["x"]) for array in train):
        raise ConfigError(f"{key}: x, y and sample_weight must have as many rows. Received: "
                          f"{key}={value!r} with {[len(a) for a in train]}")
    return [train, (found["x_val"], found["y_val"]) if "x_val" in found else None]


def _check_samples(key: str, value: str, which: str, dataset) -> None:
    spec = getattr(dataset, "element_spec", None)
    if not isinstance(dataset, tf.data.Dataset) or not isinstance(spec, tuple) or len(spec) not in (2, 3):
        received = spec if isinstance(dataset, tf.data.Dataset) else type(dataset).__name__
        raise ConfigError(f"{key}: the {which} data must be a tf.data.Dataset of (x, y) or "
                          f"(x, y, sample_weight) samples, or a random-access source (__len__ "
                          f"and __getitem__), got {received}. Received: {key}={value!r}")


def load_model(config: TrainConfig, job_data: JobData) -> keras.Model:
    """The model the config's `model` names, built under the configured `precision` (set as the
    global policy before); compiled settings kept (.keras files and factories that compile). A
    model the precision would not apply to is refused: under float32 no layer may compute in 16
    bits; under a mixed policy some must compute in it (a .keras file keeps the policies it was
    saved with, a factory may set its own; layers kept in float32 on purpose, such as logits,
    may stay)."""
    model = _built_model(config, job_data)
    # The layers that hold weights compute in their own policy, whatever the model's says.
    layers = model._flatten_layers(include_self=False)
    policies = sorted({layer.dtype_policy.name for layer in layers if layer.weights}
                      or {model.dtype_policy.name})
    if (policies != ["float32"] if config.precision == "float32"
            else config.precision not in policies):
        found = " and ".join(policies)
        raise ConfigError(
            f"precision: the model computes in {found} (a .keras file keeps the policy it was "
            f"saved with), so {config.precision} would not apply; build or save it under "
            f"{config.precision}, or set precision: {policies[0]}. Received: "
            f"precision={config.precision!r} for model={config.model!r}")
    return model


def _built_model(config: TrainConfig, job_data: JobData) -> keras.Model:
    value = config.model
    if value in BUNDLED_MODELS:
        features = tf.nest.flatten(job_data.train.element_spec[0])[0].shape[-1]
        return catalog.build_model(value, features, config.seed)
    if value.endswith(".keras"):
        if not Path(value).is_file():
            raise ConfigError(f"model: no such file. Received: model={value!r}")
        try:
            return keras.saving.load_model(value)
        except Exception as error:  # noqa: BLE001 - any unreadable model file, one line
            raise ConfigError(f"model: cannot load the .keras file ({type(error).__name__}). "
                              f"Received: model={value!r}") from None
    if is_import_path(value):
        keras.utils.set_random_seed(config.seed)
        model = _call("model", value, import_object("model", value), config.model_args)
        if not isinstance(model, keras.Model):
            raise ConfigError(f"model: the factory must return a keras.Model, returned a "
                              f"{type(model).__name__}. Received: model={value!r}")
        return model
    raise ConfigError(f"model: not a bundled model ({', '.join(BUNDLED_MODELS)}), an import path "
                      f"(package.module:factory) or a .keras file. Received: model={value!r}")


def _loss(config: TrainConfig, compiled: dict) -> tuple:
    """(loss, loss_weights): the config's `loss`, else the model's compiled one, else the bundled
    models' cross-entropy on logits; with `loss_args` applied. The compiled `loss_weights` stay
    whichever loss applies (the config has no key for them)."""
    loss_weights = compiled.get("loss_weights")
    if config.loss is not None:
        loss = import_object("loss", config.loss) if is_import_path(config.loss) else config.loss
    elif compiled.get("loss") is not None:
        loss = compiled["loss"]
    elif config.model in BUNDLED_MODELS:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        raise ConfigError(f"loss: required, since the model is not compiled with one (a Keras "
                          f"loss name or package.module:name). Received: loss=None for model="
                          f"{config.model!r}")
    return (with_loss_args(loss, config.loss_args) if config.loss_args else loss), loss_weights


# What Keras's `Loss` itself takes; a function's other keywords are its own.
_LOSS_OPTIONS = ("reduction", "name", "dtype")


def with_loss_args(loss, loss_args: dict) -> keras.losses.Loss:
    """`loss` (a Keras loss name, function, `Loss` class or object) as a `Loss` with `loss_args`:
    a class is constructed with them, an object rebuilt from its config with them changed, and
    a function wrapped as Keras's `compile` wraps it, its own keywords passed to it (Keras's
    `LossFunctionWrapper`). A `ConfigError` in one line when they do not fit."""
    received = f"Received: loss_args={loss_args!r} for loss={loss!r}"
    if isinstance(loss, (Mapping, list, tuple)) or hasattr(loss, "keys"):
        raise ConfigError(f"loss_args: the model has one loss per output; set each in the model's "
                          f"compile instead. {received}")
    try:
        if isinstance(loss, str):
            loss = keras.losses.get(loss)
        if isinstance(loss, type) and issubclass(loss, keras.losses.Loss):
            return loss(**loss_args)
        if isinstance(loss, keras.losses.Loss):
            return type(loss).from_config({**loss.get_config(), **loss_args})
        own = {k: v for k, v in loss_args.items() if k not in _LOSS_OPTIONS}
        unknown = sorted(set(own) - set(inspect.signature(loss).parameters))
        if unknown:
            raise TypeError(f"{getattr(loss, '__name__', loss)!r} takes no {', '.join(unknown)}")
        return LossFunctionWrapper(loss, **loss_args)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"loss_args: {str(error).splitlines()[0]}. {received}") from None


def compile_arguments(config: TrainConfig, model: keras.Model) -> dict:
    """What `Trainer` takes as `compile` would: the config's `loss` and `metrics` (Keras names or
    import paths) where given, else what the model was compiled with, else the bundled models'
    cross-entropy on logits and accuracy. A compiled model's settings the config has no key for
    (its loss weights and weighted metrics) are kept either way."""
    compiled = compiled_arguments(model)
    loss, loss_weights = _loss(config, compiled)
    weighted_metrics = compiled.get("weighted_metrics")
    if config.metrics is not None:
        metrics = [import_object("metrics", m) if is_import_path(m) else m for m in config.metrics]
    elif compiled:
        metrics = compiled["metrics"]
    else:
        metrics = list(BUNDLED_METRICS) if config.model in BUNDLED_MODELS else None
    return {"loss": loss, "loss_weights": loss_weights, "metrics": metrics,
            "weighted_metrics": weighted_metrics}
