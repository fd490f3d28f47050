"""Bundled datasets and models, by the names a config uses.

No data is downloaded: `digits` is scikit-learn's `load_digits` (8×8 handwritten digits shipped
inside scikit-learn) with a fixed train/validation split; `synthetic` is generated from a seed
with a learnable rule, sized for benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

# The split never depends on the run's seed, so validation numbers stay comparable across runs.
_SPLIT_SEED = 20261124
_VALIDATION_FRACTION = 0.2
NUM_CLASSES = 10
SYNTHETIC_FEATURES = 512
SYNTHETIC_SAMPLES = 8192


@dataclass(frozen=True)
class Split:
    """A dataset as numpy arrays: float32 features, int32 class labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(x))
    cut = int(round(len(x) * (1 - _VALIDATION_FRACTION)))
    train, validation = order[:cut], order[cut:]
    return Split(x[train], y[train], x[validation], y[validation])


def _digits() -> Split:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _split((bunch.data / 16.0).astype("float32"), bunch.target.astype("int32"))


def _synthetic() -> Split:
    rng = np.random.default_rng(_SPLIT_SEED)
    x = rng.normal(size=(SYNTHETIC_SAMPLES, SYNTHETIC_FEATURES)).astype("float32")
    teacher = rng.normal(size=(SYNTHETIC_FEATURES, NUM_CLASSES)).astype("float32")
    return _split(x, np.argmax(x @ teacher, axis=1).astype("int32"))


def load_dataset(name: str) -> Split:
    """The bundled dataset called `name` (see `config.BUNDLED_DATASETS`)."""
    loaders = {"digits": _digits, "synthetic": _synthetic}
    if name not in loaders:
        raise ValueError(f"unknown dataset. Received: dataset={name!r}")
    return loaders[name]()


def build_model(name: str, input_features: int, seed: int) -> keras.Model:
    """A freshly initialised bundled model producing class logits.

    `digits_mlp` is small (≈ 9 k parameters); `synthetic_mlp` has ≈ 2.1 M, enough for gradient
    traffic to matter in benchmarks.
    """
    hidden = {"digits_mlp": [128], "synthetic_mlp": [1024, 1024, 512]}
    if name not in hidden:
        raise ValueError(f"unknown model. Received: model={name!r}")
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((input_features,))]
    layers += [keras.layers.Dense(units, activation="relu") for units in hidden[name]]
    # Logits in float32 under mixed precision too, as Keras's mixed-precision guide advises.
    layers.append(keras.layers.Dense(NUM_CLASSES, dtype="float32"))
    return keras.Sequential(layers, name=name)
