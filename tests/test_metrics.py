"""Keras metrics over every worker's samples: 2 uneven workers against Keras on the concatenated
data (`workers/train_keras_models.py`, phase `metrics`: learning rate 0, so the model is the
same for every sample)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import keras_models as cases

pytestmark = pytest.mark.multiworker


def _concatenated(split: str, sizes):
    parts = [cases.binary_data(rank, size, split) for rank, size in enumerate(sizes)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.fixture(scope="module")
def expected():
    model = cases.binary_model(seed=3)  # rank 0's initial weights, broadcast at the start
    model.compile(**cases.binary_compile_options())
    train = model.evaluate(*_concatenated("train", cases.SHARD_SIZES), verbose=0, return_dict=True)
    validation = model.evaluate(*_concatenated("validation", cases.VALIDATION_SHARD_SIZES),
                                verbose=0, return_dict=True)
    # Rank 0's shard alone would give other values: the test tells them apart.
    alone = model.evaluate(*cases.binary_data(0, cases.SHARD_SIZES[0])[:2], verbose=0,
                           return_dict=True)
    assert alone["auc"] != pytest.approx(train["auc"], abs=1e-3)
    return {**train, **{f"val_{k}": v for k, v in validation.items()}}


@pytest.mark.rounding
@pytest.mark.parametrize("name", ["loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"])
def test_logged_metric_counts_every_workers_samples_when_shards_are_uneven(
        keras_models_run, expected, name):
    for rank in range(2):
        history = json.loads((keras_models_run / f"metrics_rank{rank}.json").read_text())["history"]
        assert history[name] == [pytest.approx(expected[name], rel=1e-5)]
