"""The project's data: scikit-learn's breast-cancer measurements (shipped inside scikit-learn), as
`tf.data.Dataset`s of single samples. distaccum shards, shuffles and batches them."""

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_breast_cancer


def load(validation_fraction: float = 0.25, seed: int = 0):
    """(training, validation) datasets of (features, label) samples, features standardised on
    the training part."""
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1 - validation_fraction))
    train, validation = order[:cut], order[cut:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    x = ((x - mean) / std).astype("float32")
    y = y.astype("int32")
    return (tf.data.Dataset.from_tensor_slices((x[train], y[train])),
            tf.data.Dataset.from_tensor_slices((x[validation], y[validation])))
