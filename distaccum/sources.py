"""Where the job's model, data, loss, metrics and optimizer come from: what a config names.

A config names each by what a user has: a bundled name (`catalog`), an import path
`package.module:name` (found on `PYTHONPATH`, or under `--workdir`), or a file (`.keras` for a
model, `.npz` for data). Every value is resolved here, on every worker, before any training, and
every bad one is a `ConfigError`: one line naming the key and the value.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from distaccum import catalog
from distaccum.trainer import compiled_arguments
from distaccum.config import (BUNDLED_DATASETS, BUNDLED_MODELS, ConfigError, TrainConfig,
                              is_import_path)

# The metrics of the bundled models, which produce class logits.
BUNDLED_METRICS = ("accuracy",)
# Keys of an .npz dataset: required, then optional.
NPZ_REQUIRED = ("x", "y")
NPZ_OPTIONAL = ("sample_weight", "x_val", "y_val")


@dataclass(frozen=True)
class Samples:
    """A job's data, sample by sample (not yet shuffled, sharded or batched): elements are
    `(x, y)` or `(x, y, sample_weight)`. `validation` may be None."""

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    train_size: int


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


def load_samples(config: TrainConfig) -> Samples:
    """The training (and validation) samples the config's `dataset` names."""
    value = config.dataset
    if value in BUNDLED_DATASETS:
        split = catalog.load_dataset(value)
        return _from_arrays((split.x_train, split.y_train), (split.x_validation, split.y_validation))
    if value.endswith(".npz"):
        return _from_npz(value)
    if is_import_path(value):
        returned = _call("dataset", value, import_object("dataset", value), config.dataset_args)
        train, validation = returned if isinstance(returned, tuple) else (returned, None)
        for which, dataset in (("training", train), ("validation", validation)):
            if dataset is not None:
                _check_samples(value, which, dataset)
        return Samples(train, validation, _count(train))
    raise ConfigError(f"dataset: not a bundled dataset ({', '.join(BUNDLED_DATASETS)}), an "
                      f"import path (package.module:function) or an .npz file. Received: "
                      f"dataset={value!r}")


def _from_arrays(train: tuple, validation: tuple | None) -> Samples:
    return Samples(tf.data.Dataset.from_tensor_slices(train),
                   None if validation is None else tf.data.Dataset.from_tensor_slices(validation),
                   len(train[0]))


def _from_npz(value: str) -> Samples:
    try:
        with np.load(value) as arrays:
            found = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as error:
        raise ConfigError(f"dataset: cannot read the .npz file ({error}). Received: "
                          f"dataset={value!r}") from None
    missing = [key for key in NPZ_REQUIRED if key not in found]
    if missing or ("x_val" in found) != ("y_val" in found):
        raise ConfigError(f"dataset: an .npz dataset holds x and y (and optionally sample_weight, "
                          f"x_val with y_val); missing {missing or ['x_val or y_val']}. "
                          f"Received: dataset={value!r}")
    train = (found["x"], found["y"]) + ((found["sample_weight"],) if "sample_weight" in found
                                        else ())
    if any(len(array) != len(found["x"]) for array in train):
        raise ConfigError(f"dataset: x, y and sample_weight must have as many rows. Received: "
                          f"dataset={value!r} with {[len(a) for a in train]}")
    validation = (found["x_val"], found["y_val"]) if "x_val" in found else None
    return _from_arrays(train, validation)


def _check_samples(value: str, which: str, dataset) -> None:
    spec = getattr(dataset, "element_spec", None)
    if not isinstance(dataset, tf.data.Dataset) or not isinstance(spec, tuple) or len(spec) not in (2, 3):
        received = spec if isinstance(dataset, tf.data.Dataset) else type(dataset).__name__
        raise ConfigError(f"dataset: the {which} data must be a tf.data.Dataset of (x, y) or "
                          f"(x, y, sample_weight) samples, got {received}. Received: "
                          f"dataset={value!r}")


def _count(dataset: tf.data.Dataset) -> int:
    size = int(dataset.cardinality())
    if size == tf.data.INFINITE_CARDINALITY:
        raise ConfigError("dataset: the training data repeats forever; return one pass over it "
                          "(distaccum repeats it per epoch). Received: an infinite dataset")
    if size < 0:  # unknown: count once
        size = int(dataset.reduce(np.int64(0), lambda count, _: count + 1))
    if size == 0:
        raise ConfigError("dataset: the training data is empty. Received: 0 samples")
    return size


def load_model(config: TrainConfig, samples: Samples) -> keras.Model:
    """The model the config's `model` names, built; compiled settings kept (.keras files and
    factories that compile)."""
    value = config.model
    if value in BUNDLED_MODELS:
        features = tf.nest.flatten(samples.train.element_spec[0])[0].shape[-1]
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


def compile_arguments(config: TrainConfig, model: keras.Model) -> dict:
    """What `Trainer` takes as `compile` would: the config's `loss` and `metrics` (Keras names or
    import paths) where given, else what the model was compiled with (its loss weights and
    weighted metrics too), else the bundled models' cross-entropy on logits and accuracy."""
    compiled = compiled_arguments(model)
    if config.loss is not None:
        loss = import_object("loss", config.loss) if is_import_path(config.loss) else config.loss
        loss_weights = None
    elif compiled.get("loss") is not None:
        loss, loss_weights = compiled["loss"], compiled["loss_weights"]
    elif config.model in BUNDLED_MODELS:
        loss, loss_weights = keras.losses.SparseCategoricalCrossentropy(from_logits=True), None
    else:
        raise ConfigError(f"loss: required, since the model is not compiled with one (a Keras "
                          f"loss name or package.module:name). Received: loss=None for model="
                          f"{config.model!r}")
    if config.metrics is not None:
        metrics = [import_object("metrics", m) if is_import_path(m) else m for m in config.metrics]
        weighted_metrics = None
    elif compiled:
        metrics, weighted_metrics = compiled["metrics"], compiled["weighted_metrics"]
    else:
        metrics = list(BUNDLED_METRICS) if config.model in BUNDLED_MODELS else None
        weighted_metrics = None
    return {"loss": loss, "loss_weights": loss_weights, "metrics": metrics,
            "weighted_metrics": weighted_metrics}
