"""Real Keras models, one process: k micro-steps equal Keras's own step on the concatenated batch.

Every case runs k = 3 over micro-batches of 4 from 22 samples (a ragged tail of 2), two epochs,
SGD with momentum; the oracle is Keras's `train_on_batch` on each window's samples.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import distaccum
import keras_models as cases
import scenarios
from distaccum import objective

K = 3
EPOCHS = 2


def _sgd():
    return keras.optimizers.SGD(0.05, momentum=0.5)


def _train(model, dataset, loss, **fit_options):
    trainer = distaccum.Trainer(model, _sgd(), loss=loss, accumulation_steps=K)
    trainer.fit(dataset, epochs=EPOCHS, **fit_options)
    return trainer


def _assert_same_weights(model, reference) -> None:
    scenarios.assert_weights_close(model.trainable_variables, reference.trainable_variables,
                                   rtol=2e-5)


def _oracle(model, data, loss, **train_options) -> int:
    model.compile(optimizer=_sgd(), loss=loss)
    return cases.keras_reference(model, [cases.micro_batches(*data)], K, EPOCHS, **train_options)


@pytest.mark.rounding
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_regularizers_match_keras_step_when_accumulated(weighted):
    x, y, w = cases.regularized_data()
    w = w if weighted else None
    loss = keras.losses.MeanSquaredError(
        reduction="mean_with_sample_weight" if weighted else "sum_over_batch_size")
    model = cases.regularized_model()
    trainer = _train(model, cases.as_dataset(x, y, w), loss)
    reference = cases.regularized_model()
    steps = _oracle(reference, (x, y, w), loss)
    assert int(trainer.optimizer.iterations) == steps == 4
    _assert_same_weights(model, reference)


@pytest.mark.rounding
@pytest.mark.parametrize("accumulation_steps", [1, 6], ids=["k1", "k6"])
def test_weight_regularizers_count_once_per_update_when_k_varies(accumulation_steps):
    # Sample weights 0 silence the data loss: the one update is -lr times R's gradient, once.
    x, y, _ = cases.regularized_data()
    model = cases.regularized_model(activity=False)
    before = [v.numpy() for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        penalty = objective.regularization(model)
    gradient = tape.gradient(penalty, model.trainable_variables)
    trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.1), loss="mse",
                                accumulation_steps=accumulation_steps)
    trainer.fit(cases.as_dataset(x[:12], y[:12], np.zeros(12, "float32")), update_steps=1)
    scenarios.assert_weights_close(
        model.trainable_variables,
        [b if g is None else b - 0.1 * g.numpy() for b, g in zip(before, gradient)], rtol=1e-6)


@pytest.mark.rounding
def test_per_token_weights_match_keras_step_when_sequences_are_padded():
    data = cases.sequence_data()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction="mean_with_sample_weight")
    model = cases.sequence_model()
    _train(model, cases.as_dataset(*data), loss)
    reference = cases.sequence_model()
    _oracle(reference, data, loss)
    _assert_same_weights(model, reference)


@pytest.mark.rounding
def test_keras_mask_matches_keras_step_when_embedding_masks_padding():
    x, y, _ = cases.sequence_data()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = cases.sequence_model(mask_zero=True)
    _train(model, cases.as_dataset(x, y, None), loss)
    reference = cases.sequence_model(mask_zero=True)
    _oracle(reference, (x, y, None), loss)
    _assert_same_weights(model, reference)


@pytest.mark.rounding
def test_per_token_loss_is_sum_over_window_tokens_not_mean_of_micro_batch_means():
    # One window: the reported loss equals sum(w * l) / sum(w) over every token of the window.
    x, y, mask = cases.sequence_data(size=10)
    model = cases.sequence_model()
    per_token = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(
        y, model(x)).numpy()
    expected = float(np.sum(per_token * mask) / np.sum(mask))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction="mean_with_sample_weight")
    trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.0), loss=loss, accumulation_steps=3)
    records = []

    class Record(distaccum.Callback):
        def on_update(self, record):
            records.append(record)

    trainer.fit(cases.as_dataset(x, y, mask), epochs=1, callbacks=[Record()])
    assert records[0].result.loss == pytest.approx(expected, rel=1e-5)
    assert float(records[0].result.sample_count) == 10


@pytest.mark.rounding
def test_default_reduction_divides_by_the_windows_loss_elements_when_micro_batches_differ_in_length():
    # Micro-batches padded to their own longest sequence: no concatenated batch exists, and the
    # window's loss is Σ l over every element of its micro-batches / their count.
    rng = np.random.default_rng(4)
    sequences = [rng.integers(1, cases.VOCABULARY, size=n) for n in (2, 3, 2, 6, 5, 4, 1, 2, 3)]
    labels = [rng.integers(0, 3, size=len(s)) for s in sequences]
    dataset = tf.data.Dataset.from_generator(
        lambda: zip(sequences, labels), output_signature=(tf.TensorSpec([None], tf.int32),
                                                         tf.TensorSpec([None], tf.int32))
    ).padded_batch(3)
    model = keras.Sequential([keras.Input((None,), dtype="int32"),
                              keras.layers.Embedding(cases.VOCABULARY, 4), keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    per_element = [keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(
        y, model(x)).numpy() for x, y in dataset]
    assert [p.shape for p in per_element] == [(3, 3), (3, 6), (3, 3)]
    expected = sum(p.sum() for p in per_element) / sum(p.size for p in per_element)
    trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.0), loss=loss, accumulation_steps=3)
    history = trainer.fit(dataset, epochs=1)
    assert history.loss[0] == pytest.approx(float(expected), rel=1e-5)


def test_weight_shape_that_cannot_broadcast_is_one_error_naming_both_shapes():
    x, y, _ = cases.sequence_data()
    bad = np.ones((len(x), 4), "float32")
    trainer = distaccum.Trainer(cases.sequence_model(), keras.optimizers.SGD(0.1),
                                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match=r"\(None, 4\).*\(None, 6\)") as raised:
        trainer.fit(cases.as_dataset(x, y, bad), epochs=1)
    assert "\n" not in str(raised.value)


@pytest.mark.rounding
def test_compiled_two_output_model_matches_keras_step_when_losses_are_a_dict():
    data = cases.two_output_data()
    model = cases.two_output_model()
    model.compile(optimizer=_sgd(), loss=cases.TWO_OUTPUT_LOSSES,
                  loss_weights=cases.TWO_OUTPUT_LOSS_WEIGHTS)
    trainer = distaccum.Trainer.from_compiled(model, accumulation_steps=K)
    assert trainer.optimizer is model.optimizer
    trainer.fit(cases.as_dataset(*data), epochs=EPOCHS)
    reference = cases.two_output_model()
    reference.compile(optimizer=_sgd(), loss=cases.TWO_OUTPUT_LOSSES,
                      loss_weights=cases.TWO_OUTPUT_LOSS_WEIGHTS)
    cases.keras_reference(reference, [cases.micro_batches(*data)], K, EPOCHS)
    _assert_same_weights(model, reference)


@pytest.mark.rounding
def test_class_weight_matches_keras_step_when_given_to_fit():
    x, y, _ = cases.two_output_data()
    labels = y["label"]
    class_weight = {0: 0.5, 1: 2.0, 2: 1.25}

    def make():
        keras.utils.set_random_seed(4)
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction="mean_with_sample_weight")
    model = make()
    _train(model, cases.as_dataset(x, labels, None), loss, class_weight=class_weight)
    reference = make()
    _oracle(reference, (x, labels, None), loss, class_weight=class_weight)
    _assert_same_weights(model, reference)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss": {"value": "mse", "nope": "mse"}}, r"\['nope'\]"),
        ({"loss": ["mse"]}, "1 entries"),
        ({"loss": "no_such_loss"}, "'no_such_loss'"),
        ({"loss": "mse", "loss_weights": {"value": -1.0, "label": 1.0}}, "-1.0"),
        ({"loss": None}, "loss=None"),
    ],
    ids=["unknown_output", "list_too_short", "unknown_name", "negative_weight", "no_loss"],
)
def test_bad_loss_settings_name_the_value(options, message):
    with pytest.raises(ValueError, match=message) as raised:
        distaccum.Trainer(cases.two_output_model(), _sgd(), **options)
    assert "\n" not in str(raised.value)


def test_from_compiled_refuses_model_that_is_not_compiled():
    with pytest.raises(ValueError, match="not compiled"):
        distaccum.Trainer.from_compiled(cases.two_output_model())


@pytest.mark.parametrize("class_weight", [{}, {"a": 1.0}, {0: -1.0}, [1.0, 2.0]],
                         ids=["empty", "name", "negative", "list"])
def test_bad_class_weight_names_the_value(class_weight):
    x, y, _ = cases.regularized_data()
    trainer = distaccum.Trainer(cases.regularized_model(), _sgd(), loss="mse")
    with pytest.raises(ValueError, match="class_weight"):
        trainer.fit(cases.as_dataset(x, y, None), epochs=1, class_weight=class_weight)


def test_batch_normalization_is_named_in_a_warning_when_it_trains():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(name="bn_here"), keras.layers.Dense(1)])
    x, y, _ = cases.regularized_data()
    trainer = distaccum.Trainer(model, _sgd(), loss="mse", accumulation_steps=2)
    with pytest.warns(distaccum.InexactWarning, match="bn_here"):
        trainer.fit(cases.as_dataset(x, y, None), epochs=1)
    model.layers[1].trainable = False
    frozen = distaccum.Trainer(model, _sgd(), loss="mse", accumulation_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", distaccum.InexactWarning)
        frozen.fit(cases.as_dataset(x, y, None), epochs=1)


def test_random_layers_are_named_in_a_warning_when_they_draw_and_not_at_rate_zero():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(4), keras.layers.Dropout(0.3, name="drop_here"),
        keras.layers.GaussianNoise(0.1, name="noise_here"),
        keras.layers.Dropout(0.0, name="never_drops"), keras.layers.Dense(1)])
    x, y, _ = cases.regularized_data()
    trainer = distaccum.Trainer(model, _sgd(), loss="mse", accumulation_steps=2)
    with pytest.warns(distaccum.InexactWarning,
                      match=r"random layers \(drop_here, noise_here\) draw .* resumed on another"):
        trainer.fit(cases.as_dataset(x, y, None), epochs=1)


@pytest.mark.rounding
@pytest.mark.multiworker
@pytest.mark.parametrize("case", cases.MULTIWORKER_CASES)
def test_two_workers_match_keras_large_batch_step_when_shards_are_uneven(keras_models_run, case):
    keras.mixed_precision.set_global_policy(cases.policy(case))
    try:
        shards = [cases.micro_batches(*cases.setup(case, rank, size)[1])
                  for rank, size in enumerate(cases.SHARD_SIZES)]
        reference = cases.compiled(case)
        start = [v.numpy() for v in reference.trainable_variables]
        steps = cases.keras_reference(reference, shards, cases.K, cases.EPOCHS)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    ranks = [np.load(keras_models_run / f"rank{r}_{case}.npz") for r in range(2)]
    expected = [v.numpy() for v in reference.trainable_variables]
    applied = int(reference.optimizer.iterations)
    for saved in ranks:
        assert int(saved["iterations"]) == applied
    for index in range(len(expected)):
        np.testing.assert_array_equal(ranks[0][f"arr_{index}"], ranks[1][f"arr_{index}"])
    ours = [ranks[0][f"arr_{index}"] for index in range(len(expected))]
    if case != "mixed_float16_overflow":
        scenarios.assert_weights_close(ours, expected, rtol=2e-5)
        return
    # Window 1 of both epochs overflows on rank 1 only: skipped everywhere, scale halved twice.
    assert applied == steps - 2
    assert float(ranks[0]["loss_scale"]) == float(ranks[1]["loss_scale"]) == 2.0 ** 13
    assert float(reference.optimizer.dynamic_scale) == 2.0 ** 13
    # Compared with the same training in float64 that skips the same windows (see keras_models).
    training = cases.float64_training(
        case, start, shards, skip=lambda x: np.max(np.abs(x)) > np.finfo("float16").max)
    cases.assert_within_round_off("mixed_float16", ours, reference.trainable_variables, training)
