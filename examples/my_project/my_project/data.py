"""The project's data: scikit-learn's breast-cancer measurements (shipped inside scikit-learn), in
either form a dataset function may return: `tf.data.Dataset`s of single samples (`load`), which
distaccum shards, shuffles and batches, or random-access sources (`load_rows`), of which each
worker reads only the rows it trains on."""

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_breast_cancer


def _split(validation_fraction: float, seed: int):
    """((x, y) training, (x, y) validation) arrays, features standardised on the training part."""
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1 - validation_fraction))
    train, validation = order[:cut], order[cut:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    x = ((x - mean) / std).astype("float32")
    y = y.astype("int32")
    return (x[train], y[train]), (x[validation], y[validation])


def load(validation_fraction: float = 0.25, seed: int = 0):
    """(training, validation) datasets of (features, label) samples."""
    train, validation = _split(validation_fraction, seed)
    return (tf.data.Dataset.from_tensor_slices(train),
            tf.data.Dataset.from_tensor_slices(validation))


class Rows:
    """A random-access source: one (features, label) row per `__getitem__`, as a table on disk
    or a service would give it."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


def load_rows(validation_fraction: float = 0.25, seed: int = 0):
    """(training, validation) random-access sources of (features, label) samples."""
    (x, y), (x_validation, y_validation) = _split(validation_fraction, seed)
    return Rows(x, y), Rows(x_validation, y_validation)
