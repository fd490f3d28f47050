"""Counting micro-batches and the plan every worker agrees on."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from distaccum import data


def _batches(num_samples: int, micro_batch_size: int = 4) -> tf.data.Dataset:
    x = np.zeros((num_samples, 2), "float32")
    return tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(micro_batch_size)


@pytest.mark.parametrize(
    "dataset, expected",
    [
        (_batches(10), 3),
        (_batches(10).filter(lambda x, y: tf.shape(x)[0] == 4), 2),
        (_batches(10).repeat(), data.INFINITE),
    ],
    ids=["known_cardinality", "filtered_unknown_cardinality", "repeating"],
)
def test_count_micro_batches_when_cardinality_is(dataset, expected):
    assert data.count_micro_batches(dataset) == expected


@pytest.mark.parametrize(
    "num_samples, accumulation_steps, updates",
    [(10, 1, 3), (10, 2, 2), (10, 3, 1), (10, 4, 1), (36, 4, 3)],
)
def test_epoch_plan_rounds_up_partial_window_when_single_worker(
    num_samples, accumulation_steps, updates
):
    plan = data.agree_on_epoch_plan(_batches(num_samples), accumulation_steps)
    assert plan.updates_per_epoch == updates


def test_epoch_plan_refuses_empty_dataset():
    with pytest.raises(ValueError, match="empty on every worker"):
        data.agree_on_epoch_plan(_batches(0), 2)


def test_unpack_gives_none_weight_when_element_has_no_weights():
    assert data.unpack((1, 2)) == (1, 2, None)
    assert data.unpack((1, 2, 3)) == (1, 2, 3)
