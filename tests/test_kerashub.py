"""KerasHub models (tests/kerashub_models.py): accumulated training takes the dense large-batch
step, in one process and on two workers with uneven shards."""

from __future__ import annotations

import numpy as np
import pytest

import distaccum
import kerashub_models as hub
import scenarios


@pytest.mark.rounding
@pytest.mark.parametrize("case", hub.CASES)
def test_kerashub_model_takes_the_dense_large_batch_step_when_accumulated(case):
    name, lora, make_data, reduction = hub.CASES[case]
    data, loss = make_data(), hub.loss(reduction)
    model, reference = hub.build(name, lora), hub.build(name, lora)
    start = scenarios.flat(reference.trainable_variables)
    trainer = distaccum.Trainer(model, hub.optimizer(), loss=loss, accumulation_steps=hub.K)
    trainer.fit(scenarios.as_dataset(*data, hub.MICRO_BATCH_SIZE), epochs=hub.EPOCHS)
    steps = hub.dense_large_batch_steps(reference, loss, [data])
    assert int(trainer.optimizer.iterations) == steps == 6
    assert scenarios.distance(model.trainable_variables, reference.trainable_variables,
                        start) <= hub.TOLERANCE


@pytest.mark.rounding
@pytest.mark.multiworker
@pytest.mark.parametrize("case", hub.CASES)
def test_kerashub_model_takes_the_dense_large_batch_step_when_two_workers_have_uneven_shards(
        keras_models_run, case):
    # Trained in the shared 2-worker launch (tests/workers/train_keras_models.py, horovodrun):
    # rank 0 holds 3 micro-batches, rank 1 holds 2.
    name, lora, make_data, reduction = hub.CASES[case]
    data = make_data()
    reference = hub.build(name, lora)
    start = scenarios.flat(reference.trainable_variables)
    steps = hub.dense_large_batch_steps(reference, hub.loss(reduction),
                                        [hub.shard(data, part) for part in hub.SHARDS])
    for rank in range(2):
        saved = np.load(keras_models_run / f"rank{rank}_{case}.npz")
        assert int(saved["iterations"]) == steps == 4, rank
        trained = [saved[f"arr_{i}"] for i in range(len(reference.trainable_variables))]
        assert scenarios.distance(trained, reference.trainable_variables, start) <= hub.TOLERANCE, rank
