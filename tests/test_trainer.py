"""Single process: k micro-steps equal one large-batch step, and bad input is refused clearly."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import distaccum
from distaccum import data
from distaccum.comm import pieces
import keras_models as cases
import scenarios

MSE = keras.losses.MeanSquaredError()


def _train(optimizer: str, shard, accumulation_steps: int, epochs: int = 2, **trainer_options):
    model = scenarios.make_model()
    trainer = distaccum.Trainer(
        model,
        scenarios.make_optimizer(optimizer),
        loss=MSE,
        accumulation_steps=accumulation_steps,
        **trainer_options,
    )
    history = trainer.fit(scenarios.as_dataset(*shard), epochs=epochs)
    return model, trainer, history


def _reference(optimizer: str, shard, accumulation_steps: int, epochs: int = 2):
    model = scenarios.make_model()
    reference_optimizer = scenarios.make_optimizer(optimizer)
    updates = scenarios.reference_training(
        model,
        reference_optimizer,
        MSE,
        [scenarios.split_micro_batches(*shard)],
        accumulation_steps,
        epochs,
    )
    return model, updates


SHARDS = {
    "even": (24, False),  # 6 micro-batches of 4
    "ragged": (22, False),  # last micro-batch has 2 samples
    "weighted_ragged": (22, True),
}


@pytest.mark.rounding
@pytest.mark.parametrize("optimizer", ["sgd", "adam_schedule"])
@pytest.mark.parametrize("shard_name", list(SHARDS))
@pytest.mark.parametrize("accumulation_steps", [1, 3, 6], ids=["k1", "k3", "k6"])
def test_micro_steps_equal_large_batch_steps_when_single_process(
    optimizer, shard_name, accumulation_steps
):
    size, weighted = SHARDS[shard_name]
    shard = scenarios.make_shard(0, size, weighted=weighted)
    model, trainer, _ = _train(optimizer, shard, accumulation_steps)
    reference, updates = _reference(optimizer, shard, accumulation_steps)
    assert int(trainer.optimizer.iterations) == updates == 2 * -(-6 // accumulation_steps)
    scenarios.assert_weights_close(model.trainable_variables, reference.trainable_variables)


@pytest.mark.rounding
def test_one_window_equals_keras_train_on_batch_when_unweighted():
    # An oracle independent of our reference: Keras's own compiled step on the whole batch.
    x, y, _ = scenarios.make_shard(0, 24, weighted=False)
    model, _, _ = _train("sgd", (x, y, None), accumulation_steps=6, epochs=1)
    keras_model = scenarios.make_model()
    keras_model.compile(optimizer=scenarios.make_optimizer("sgd"), loss=MSE)
    keras_model.train_on_batch(x, y)
    scenarios.assert_weights_close(model.trainable_variables, keras_model.trainable_variables)


@pytest.mark.rounding
@pytest.mark.parametrize("accumulation_steps", [1, 6], ids=["k1", "k6"])
def test_one_window_under_xla_equals_keras_xla_step(accumulation_steps):
    # XLA compiles the micro-steps and the update step's two halves; Keras compiles its step.
    # Both fuse and reorder float32 sums: within the reference's tolerance (docs/rounding.md).
    x, y, _ = scenarios.make_shard(0, 24, weighted=False)
    model, trainer, _ = _train("adam_schedule", (x, y, None), accumulation_steps, epochs=1,
                               jit_compile=True)
    assert trainer.jit_compile
    keras_model = scenarios.make_model()
    keras_model.compile(optimizer=scenarios.make_optimizer("adam_schedule"), loss=MSE,
                        jit_compile=True)
    for window in np.split(np.arange(24), 6 // accumulation_steps):
        keras_model.train_on_batch(x[window], y[window])
    scenarios.assert_weights_close(model.trainable_variables, keras_model.trainable_variables)


class _HostCall(keras.layers.Layer):
    """A layer running Python on the host (`tf.numpy_function`): XLA has no kernel for it."""

    def call(self, inputs):
        copied = tf.numpy_function(lambda a: a, [inputs], inputs.dtype)
        return inputs + 0.0 * tf.stop_gradient(tf.reshape(copied, tf.shape(inputs)))


class _NoJit(keras.layers.Dense):
    """A layer that says XLA cannot compile it, as Keras's own such layers do."""

    def __init__(self, units, **kwargs):
        super().__init__(units, **kwargs)
        self.supports_jit = False


@pytest.mark.parametrize("layer, message", [
    (_HostCall(name="host_call"), "cannot compile this model: it has no kernel for op PyFunc "
                                  r"\(in functional.*/host_call.*/PyFunc\)"),
    (_NoJit(3, name="no_jit"), "which layers no_jit do not support"),
], ids=["op_without_xla_kernel", "layer_without_jit"])
def test_model_xla_cannot_compile_trains_without_it_with_one_warning_naming_it(layer, message):
    x, y, _ = scenarios.make_shard(0, 24, weighted=False)
    inputs = keras.Input((x.shape[1],))
    model = keras.Model(inputs, keras.layers.Dense(y.shape[1])(layer(inputs)))
    with pytest.warns(distaccum.XLAWarning, match=message) as warned:
        trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.1), loss=MSE,
                                    accumulation_steps=3, jit_compile=True)
        trainer.fit(scenarios.as_dataset(x, y, None), epochs=1)
    [xla] = [w for w in warned if w.category is distaccum.XLAWarning]
    assert "\n" not in str(xla.message)
    assert not trainer.jit_compile and int(trainer.optimizer.iterations) == 2  # 6 micro-batches


@pytest.mark.rounding
def test_every_trainer_compiles_its_steps_with_xla_when_the_test_command_reruns_under_xla():
    # The test command's second part puts every Trainer under XLA by patching the one place XLA
    # is chosen (tests/conftest.py). Were that patch to stop reaching the Trainer, the rerun
    # would test nothing under XLA and pass: this fails instead. Outside the rerun, False holds.
    under_xla = os.environ.get("DISTACCUM_TEST_JIT_COMPILE") == "true"
    x, y, _ = scenarios.make_shard(0, 8, weighted=False)
    dataset = scenarios.as_dataset(x, y, None)
    trainer = distaccum.Trainer(scenarios.make_model(), keras.optimizers.SGD(0.1), loss=MSE,
                                accumulation_steps=2, jit_compile=False)
    trainer.fit(dataset, epochs=1)
    assert trainer.jit_compile is under_xla
    # What TensorFlow runs: the traced micro-step carries XLA's must-compile mark, or not.
    micro_step = trainer._steps._micro_step.get_concrete_function(
        *data.unpack(dataset.element_spec), True)
    assert micro_step.function_def.attr["_XlaMustCompile"].b is under_xla


def test_jit_compile_auto_follows_keras_and_true_compiles_on_the_cpu():
    model = scenarios.make_model()
    keras_model = scenarios.make_model()
    keras_model.compile(optimizer="sgd", loss=MSE)  # jit_compile="auto"
    auto = distaccum.Trainer(model, keras.optimizers.SGD(0.1), loss=MSE)
    assert auto.jit_compile is keras_model.jit_compile is False  # no GPU here
    assert distaccum.Trainer.from_compiled(keras_model).jit_compile is False
    keras_model.compile(optimizer="sgd", loss=MSE, jit_compile=True)
    assert distaccum.Trainer.from_compiled(keras_model).jit_compile is True  # compile's choice
    with pytest.raises(ValueError, match="jit_compile must be 'auto', True or False. "
                                         "Received: jit_compile='yes'"):
        distaccum.Trainer(model, keras.optimizers.SGD(0.1), loss=MSE, jit_compile="yes")


@pytest.mark.rounding
def test_window_loss_is_keras_default_reduction_and_epoch_loss_weighs_windows_by_samples():
    x, y, w = scenarios.make_shard(0, 22, weighted=True)
    model = scenarios.make_model()
    predictions = model(x).numpy()
    # Keras's default reduction: Σ w·l over the window's 12 samples, divided by 12 (not by Σ w).
    expected_first_window = float(np.sum(w[:12] * np.mean((predictions[:12] - y[:12]) ** 2, axis=1))
                                  / 12)
    records = []

    class Recorder(distaccum.Callback):
        def on_update(self, record):
            records.append(record)

    trainer = distaccum.Trainer(
        model, keras.optimizers.SGD(0.01), loss=MSE, accumulation_steps=3
    )
    history = trainer.fit(scenarios.as_dataset(x, y, w), epochs=1, callbacks=[Recorder()])
    assert [r.update_step for r in records] == [1, 2]
    assert [r.micro_steps for r in records] == [3, 3]
    assert records[0].result.loss == pytest.approx(expected_first_window, rel=1e-5)
    assert history.samples == 22 and history.update_steps == 2
    # As Keras's fit averages its batches' losses: each window weighs its samples (12 and 10).
    assert history.loss[0] == pytest.approx(
        (records[0].result.loss * 12 + records[1].result.loss * 10) / 22, rel=1e-6)


def test_micro_step_is_not_traced_again_when_last_batch_is_ragged():
    shard = scenarios.make_shard(0, 22, weighted=True)
    _, trainer, _ = _train("sgd", shard, accumulation_steps=2, epochs=3)
    # All at prepare: the first creates the sums; a window's first micro-step overwrites them.
    assert trainer.micro_step_traces == 3
    # Once, at prepare, with the window's last micro-batch: the ragged one is a window's last.
    assert trainer.update_step_traces == 1


@pytest.mark.rounding
def test_micro_batches_in_one_call_add_up_as_one_call_each():
    # fit trains a window's first k-1 micro-batches in one compiled call (a loop in the graph):
    # the same sums, in the same order, as calling micro_step on each, hence the same weights.
    x, y, w = scenarios.make_shard(0, 24, weighted=True)
    micro_batches = scenarios.split_micro_batches(x, y, w)
    trainers = [distaccum.Trainer(scenarios.make_model(), scenarios.make_optimizer("sgd"),
                                  loss=MSE, accumulation_steps=3) for _ in range(2)]
    for trainer in trainers:
        trainer.prepare(scenarios.as_dataset(x, y, w).element_spec)
    together, one_by_one = trainers
    for window in (micro_batches[:3], micro_batches[3:]):
        together.micro_steps(window[:-1])
        together.update_step(last_micro_batch=window[-1])
        for micro_batch in window[:-1]:
            one_by_one.micro_step(*micro_batch)
        one_by_one.update_step(last_micro_batch=window[-1])
    for got, expected in zip(scenarios.weights_of(together.model),
                             scenarios.weights_of(one_by_one.model)):
        if together.jit_compile:
            # XLA compiles the loop and the single step as different programs and may fuse
            # (and so round) their sums differently: float32 round-off, as README's XLA line says.
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)
        else:
            np.testing.assert_array_equal(got, expected)
    assert together._steps._micro_steps.experimental_get_tracing_count() == 1  # at prepare


class _RefuseInfinity(keras.layers.Layer):
    """Fails at run time on a non-finite input, as a model refusing a bad micro-batch would."""

    def call(self, inputs):
        return tf.debugging.assert_all_finite(inputs, "not finite")


def test_bad_micro_batch_inside_a_window_trained_in_one_call_is_named_and_not_applied():
    x, y, _ = scenarios.make_shard(0, 24, weighted=False)
    x[9, 0] = np.inf  # micro-batch 3 (of 4 samples), trained with 1 and 2 in one call
    model = keras.Sequential([keras.Input((scenarios.FEATURES,)), _RefuseInfinity(),
                              keras.layers.Dense(1)])
    initial = scenarios.weights_of(model)
    trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.1), loss=MSE, accumulation_steps=4)
    with pytest.raises(distaccum.BadMicroBatch) as raised:
        trainer.fit(scenarios.as_dataset(x, y, None), epochs=1)
    message = str(raised.value)
    assert message.startswith("rank 0: micro-batch 3 of epoch 1 (counted from 1) cannot be "
                              "trained on; every rank stopped at update step 1 without applying it")
    assert "not finite" in message
    assert trainer._steps._micro_steps.experimental_get_tracing_count() == 1  # the one call was tried
    assert int(trainer.optimizer.iterations) == 0
    for got, expected in zip(scenarios.weights_of(model), initial):
        np.testing.assert_array_equal(got, expected)


def _classifier_case():
    """Ten classes' integer labels and a model with ten logits, as the README's digits."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, scenarios.FEATURES)).astype("float32")
    y = rng.integers(0, 10, size=24)
    model = keras.Sequential([keras.Input((scenarios.FEATURES,)), keras.layers.Dense(10)])
    return model, tf.data.Dataset.from_tensor_slices((x, y)).batch(4)


@pytest.mark.parametrize("loss, metric, named, why", [
    # AUC takes binary or multi-label targets: it fails when it runs, on the first micro-batch.
    (keras.losses.SparseCategoricalCrossentropy(from_logits=True), keras.metrics.AUC(name="auc"),
     "the metric 'auc' (AUC) fails on y (4,) and model output (4, 10): ",
     "Every rank failed on its first micro-batch"),
    # Integer labels for a one-hot loss: Keras's shape check refuses them while the step is built
    # from the dataset's spec (the part is found on a stand-in of zeros; the error says the shapes).
    ("categorical_crossentropy", None,
     "the loss 'categorical_crossentropy' fails: ValueError: Arguments `target` and `output` must "
     "have the same rank (ndim). Received: target.shape=(None,), output.shape=(None, 10)",
     "The training step cannot be built for the data's shapes"),
], ids=["metric", "loss_by_name"])
def test_model_that_cannot_take_the_data_names_the_metric_or_loss_and_applies_nothing(
        loss, metric, named, why):
    model, dataset = _classifier_case()
    initial = scenarios.weights_of(model)
    trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.1), loss=loss,
                                metrics=[metric] if metric else None, accumulation_steps=3)
    with pytest.raises(distaccum.ModelDataMismatch) as raised:
        trainer.fit(dataset, epochs=1)
    message = str(raised.value)
    assert message.startswith(named), message
    assert message.endswith(f". {why}, so the model, loss or metrics do not fit the data's shapes "
                            "or label format; nothing was trained"), message
    assert "\n" not in message
    assert int(trainer.optimizer.iterations) == 0
    for got, expected in zip(scenarios.weights_of(model), initial):
        np.testing.assert_array_equal(got, expected)


def test_micro_batch_unlike_the_first_stays_a_bad_micro_batch_naming_what_refused_it():
    # Labels 0-9 for ten logits, but micro-batch 2 holds a label past them: that micro-batch is
    # bad, not the model; the message names the loss that refused it.
    model, dataset = _classifier_case()
    x, y = (np.concatenate(parts) for parts in zip(*dataset.as_numpy_iterator()))
    y[5] = 12
    trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.1),
                                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                accumulation_steps=3)
    with pytest.raises(distaccum.BadMicroBatch) as raised:
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), epochs=1)
    message = str(raised.value)
    assert message.startswith("rank 0: micro-batch 2 of epoch 1 (counted from 1) cannot be "
                              "trained on; every rank stopped at update step 1 without applying it "
                              "(here: the loss 'sparse_categorical_crossentropy' "
                              "(SparseCategoricalCrossentropy) fails on y (4,) and model output "
                              "(4, 10): InvalidArgumentError: "), message


@pytest.mark.rounding
@pytest.mark.parametrize(
    "make_optimizer, densify",
    [(lambda: keras.optimizers.Adam(0.1), True), (lambda: keras.optimizers.SGD(0.5), False)],
    ids=["adam_vs_dense_reference", "sgd_vs_keras_sparse_path"],
)
def test_sparse_embedding_gradients_match_reference_when_accumulated(make_optimizer, densify):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 20, size=(14, 3)).astype("int32")
    labels = rng.normal(size=(14, 1)).astype("float32")

    def make_model():
        keras.utils.set_random_seed(5)
        return keras.Sequential(
            [
                keras.Input((3,), dtype="int32"),
                keras.layers.Embedding(20, 4),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(1),
            ]
        )

    model = make_model()
    with tf.GradientTape() as tape:
        loss = MSE(labels[:4], model(tokens[:4]))
    assert isinstance(tape.gradient(loss, model.trainable_variables[0]), tf.IndexedSlices)
    trainer = distaccum.Trainer(model, make_optimizer(), loss=MSE, accumulation_steps=2)
    trainer.fit(tf.data.Dataset.from_tensor_slices((tokens, labels)).batch(4), epochs=2)
    reference = make_model()
    scenarios.reference_training(
        reference,
        make_optimizer(),
        MSE,
        [scenarios.split_micro_batches(tokens, labels, None)],
        2,
        2,
        densify=densify,
    )
    scenarios.assert_weights_close(model.trainable_variables, reference.trainable_variables)


@pytest.mark.rounding
def test_sums_handled_in_pieces_train_as_when_whole(monkeypatch):
    # 16-byte pieces: the Embedding's sum is zeroed in ranges of its rows at each window's first
    # micro-batch; the same arithmetic on the same values, so the same weights.
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 20, size=(14, 3)).astype("int32")
    labels = rng.normal(size=(14, 1)).astype("float32")

    def trained():
        keras.utils.set_random_seed(5)
        model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(20, 4),
                                  keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3),
                                  keras.layers.Dense(1)])
        trainer = distaccum.Trainer(model, keras.optimizers.Adam(0.1), loss=MSE,
                                    accumulation_steps=2)
        trainer.fit(tf.data.Dataset.from_tensor_slices((tokens, labels)).batch(4), epochs=2)
        return [v.numpy() for v in model.trainable_variables]

    whole = trained()
    monkeypatch.setattr(pieces, "GROUP_BYTES", 16)
    assert len(pieces.pieces_of(keras.Variable(np.zeros((20, 4), "float32")))) == 20
    for got, expected in zip(trained(), whole):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.rounding
@pytest.mark.parametrize("clip", [0.1, None], ids=["global_norm_clipping", "no_clipping"])
def test_embedding_text_classifier_takes_the_dense_large_batch_step_where_keras_fit_does_not(clip):
    # Keras's `fit` takes an Embedding's `tf.IndexedSlices` gradient as it comes, one row per
    # occurrence of a token. With `global_clipnorm` its global norm adds the squares of the
    # occurrences, not the square of a token's summed gradient (the clipped gradient is then
    # dense); without clipping, Adam's second moment adds the occurrences' squares. distaccum
    # applies the summed (dense) gradient: the textbook large-batch step.
    micro_batch, k, updates, vocabulary, length = 4, 2, 8, 50, 32
    tokens, labels = scenarios.padded_reviews(updates * k * micro_batch, k * micro_batch,
                                             vocabulary, length)
    loss = keras.losses.BinaryCrossentropy(from_logits=True)

    def make_model():
        return scenarios.text_classifier(vocabulary, 8, length)

    def make_optimizer(global_clipnorm=clip):
        return keras.optimizers.AdamW(0.05, weight_decay=0.01, global_clipnorm=global_clipnorm)

    initial = scenarios.weights_of(make_model())
    model = make_model()
    # distaccum's own clipping (`clip_global_norm`) of the reduced gradient, the optimizer's
    # `global_clipnorm` on the reference and Keras's side: the same global norm.
    trainer = distaccum.Trainer(model, make_optimizer(global_clipnorm=None), loss=loss,
                                accumulation_steps=k, clip_global_norm=clip)
    trainer.fit(tf.data.Dataset.from_tensor_slices((tokens, labels)).batch(micro_batch), epochs=1)
    assert int(trainer.optimizer.iterations) == updates
    reference = make_model()
    scenarios.reference_training(reference, make_optimizer(), loss,
                                 [scenarios.split_micro_batches(tokens, labels, None, micro_batch)],
                                 k, 1, densify=True)
    scenarios.assert_weights_close(model.trainable_variables, reference.trainable_variables)

    keras_model = make_model()
    keras_model.compile(optimizer=make_optimizer(), loss=loss)
    keras_model.fit(tokens, labels, batch_size=k * micro_batch, epochs=1, shuffle=False, verbose=0)
    assert int(keras_model.optimizer.iterations) == updates
    expected = scenarios.weights_of(reference)
    movement = max(np.max(np.abs(e - i)) for e, i in zip(expected, initial))
    keras_error = max(np.max(np.abs(w - e))
                      for w, e in zip(scenarios.weights_of(keras_model), expected))
    # Measured (Keras 3.15.1, this seed): 0.50 of the movement with clipping, 4.6 without.
    assert keras_error > 0.1 * movement, keras_error / movement


@pytest.mark.rounding
def test_clipping_applies_to_reduced_gradient_when_clip_global_norm_is_set():
    x, y, _ = scenarios.make_shard(0, 12, weighted=False)
    model = scenarios.make_model()
    before = [v.numpy() for v in model.trainable_variables]
    trainer = distaccum.Trainer(
        model, keras.optimizers.SGD(0.5), loss=MSE, accumulation_steps=3, clip_global_norm=0.01
    )
    trainer.fit(scenarios.as_dataset(x, y, None), epochs=1)
    step = np.sqrt(sum(np.sum((v.numpy() - b) ** 2) for v, b in zip(model.trainable_variables, before)))
    assert step == pytest.approx(0.5 * 0.01, rel=1e-4)


def test_update_steps_counts_updates_when_dataset_repeats():
    x, y, _ = scenarios.make_shard(0, 8, weighted=False)
    model = scenarios.make_model()
    trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.1), loss=MSE, accumulation_steps=3)
    history = trainer.fit(scenarios.as_dataset(x, y, None).repeat(), update_steps=5)
    assert int(trainer.optimizer.iterations) == 5 == history.update_steps
    assert history.samples == 5 * 3 * scenarios.MICRO_BATCH_SIZE


def test_update_steps_stops_mid_epoch_when_dataset_is_finite():
    x, y, _ = scenarios.make_shard(0, 24, weighted=False)
    model = scenarios.make_model()
    trainer = distaccum.Trainer(model, keras.optimizers.SGD(0.1), loss=MSE, accumulation_steps=2)
    history = trainer.fit(scenarios.as_dataset(x, y, None), update_steps=4)
    assert int(trainer.optimizer.iterations) == 4 == history.update_steps
    assert history.loss and len(history.loss) == 2  # epoch 1 (3 updates) and part of epoch 2


def _trainer(**overrides):
    options = {
        "model": scenarios.make_model(),
        "optimizer": keras.optimizers.SGD(0.1),
        "loss": MSE,
        "accumulation_steps": 2,
    }
    options.update(overrides)
    return distaccum.Trainer(options.pop("model"), options.pop("optimizer"), **options)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"accumulation_steps": 0}, ValueError, "accumulation_steps=0"),
        ({"accumulation_steps": -3}, ValueError, "accumulation_steps=-3"),
        ({"accumulation_steps": 2.5}, TypeError, "accumulation_steps=2.5"),
        ({"accumulation_steps": "4"}, TypeError, "accumulation_steps='4'"),
        ({"accumulation_steps": True}, TypeError, "accumulation_steps=True"),
        ({"optimizer": "adam"}, TypeError, "'adam'"),
        (
            {"optimizer": keras.optimizers.SGD(0.1, gradient_accumulation_steps=4)},
            ValueError,
            "gradient_accumulation_steps=4",
        ),
        ({"loss": "msee"}, ValueError, "'msee'"),
        ({"loss": 3}, TypeError, "loss=3"),
        ({"clip_global_norm": 0.0}, ValueError, "0.0"),
        ({"model": "resnet"}, TypeError, "'resnet'"),
        ({"allreduce_dtype": "float64"}, ValueError, "allreduce_dtype='float64'"),
        ({"global_batch_size": 0}, ValueError, "global_batch_size=0"),
        ({"global_batch_size": 8, "accumulation_steps": 2}, ValueError,
         "not both. Received: global_batch_size=8, accumulation_steps=2"),
        ({"micro_batch_size": 4}, ValueError, "Received: micro_batch_size=4, global_batch_size=None"),
        ({"global_batch_size": 10, "micro_batch_size": 4, "accumulation_steps": None}, ValueError,
         "10 is not a whole number of micro-batches per worker .* Received: "
         "global_batch_size=10, num_workers=1, micro_batch_size=4"),
        ({"shard_optimizer_state": "yes"}, TypeError, "shard_optimizer_state='yes'"),
        ({"shard_optimizer_state": True,
          "optimizer": keras.optimizers.Adam(global_clipnorm=1.0)}, ValueError,
         "clip_global_norm instead. Received: global_clipnorm=1.0"),
        ({"shard_optimizer_state": True, "allreduce_dtype": "bfloat16"}, ValueError,
         "Received: allreduce_dtype='bfloat16'"),
    ],
    ids=["k_zero", "k_negative", "k_float", "k_string", "k_bool", "optimizer_name",
         "keras_accumulation", "loss_name", "loss_number", "clip_zero", "model_name",
         "allreduce_dtype", "global_batch_zero", "global_batch_and_k", "micro_batch_alone",
         "global_batch_not_whole", "sharded_not_bool", "sharded_keras_global_clip",
         "sharded_narrow_sums"],
)
def test_constructor_names_bad_value_when_argument_is_invalid(overrides, error, message):
    with pytest.raises(error, match=message) as raised:
        _trainer(**overrides)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("given", ["micro_batches", "micro_batch_size"])
def test_global_batch_size_trains_as_the_k_it_makes_when_micro_batch_size_is_known(given):
    """global_batch_size=12 with micro-batches of 4 on one worker is k=3: the same run."""
    x, y, w = scenarios.make_shard(0, 22)
    data = (distaccum.micro_batches((x, y, w), scenarios.MICRO_BATCH_SIZE, seed=5)
            if given == "micro_batches" else scenarios.as_dataset(x, y, w))
    model = scenarios.make_model()
    trainer = distaccum.Trainer(
        model, scenarios.make_optimizer("sgd"), loss=MSE, global_batch_size=12,
        **({} if given == "micro_batches" else {"micro_batch_size": scenarios.MICRO_BATCH_SIZE}))
    trainer.fit(data, epochs=2)
    assert trainer.accumulation_steps == 3
    expected = scenarios.make_model()
    reference = distaccum.Trainer(expected, scenarios.make_optimizer("sgd"), loss=MSE,
                                  accumulation_steps=3)
    reference.fit(distaccum.micro_batches((x, y, w), scenarios.MICRO_BATCH_SIZE, seed=5)
                  if given == "micro_batches" else scenarios.as_dataset(x, y, w), epochs=2)
    for got, want in zip(scenarios.weights_of(model), scenarios.weights_of(expected)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("micro_batch_size, data_micro_batch, message", [
    (None, None, "sets k from the micro-batch size: train on distaccum.micro_batches"),
    (2, 4, "hold 4 samples, but the Trainer was given micro_batch_size=2"),
], ids=["unknown", "disagrees"])
def test_global_batch_size_names_the_micro_batch_size_it_lacks_or_that_disagrees(
        micro_batch_size, data_micro_batch, message):
    x, y, w = scenarios.make_shard(0, 8)
    data = (scenarios.as_dataset(x, y, w) if data_micro_batch is None
            else distaccum.micro_batches((x, y, w), data_micro_batch))
    trainer = distaccum.Trainer(scenarios.make_model(), scenarios.make_optimizer("sgd"),
                                loss=MSE, global_batch_size=8, micro_batch_size=micro_batch_size)
    with pytest.raises(ValueError, match=message) as raised:
        trainer.fit(data, epochs=1)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "dataset, fit_options, message",
    [
        (tf.data.Dataset.from_tensor_slices(np.zeros((0, 5), "float32")).batch(2), {"epochs": 1},
         "labels are required"),
        (tf.data.Dataset.from_tensor_slices((np.zeros((0, 5), "float32"),
                                             np.zeros((0, 1), "float32"))).batch(2),
         {"epochs": 1}, "empty"),
        (tf.data.Dataset.from_tensor_slices((np.zeros((8, 5), "float32"),
                                             np.zeros((8, 1), "float32"))),
         {"epochs": 1}, "leading batch axis"),
        (tf.data.Dataset.from_tensor_slices((np.zeros((8, 5), "float32"),
                                             np.zeros((8, 1), "float32"))).batch(2).repeat(),
         {"epochs": 1}, "repeats forever"),
        (tf.data.Dataset.from_tensor_slices((np.zeros((8, 5), "float32"),
                                             np.zeros((8, 1), "float32"))).batch(2),
         {"epochs": 1, "update_steps": 3}, "exactly one"),
        (tf.data.Dataset.from_tensor_slices((np.zeros((8, 5), "float32"),
                                             np.zeros((8, 1), "float32"))).batch(2),
         {"epochs": 0}, "epochs=0"),
        ([(np.zeros((2, 5)), np.zeros((2, 1)))], {"epochs": 1}, "tf.data.Dataset"),
    ],
    ids=["no_labels", "empty", "not_batched", "infinite_with_epochs", "both_durations",
         "zero_epochs", "not_a_dataset"],
)
def test_fit_names_bad_value_when_dataset_or_duration_is_invalid(dataset, fit_options, message):
    with pytest.raises((ValueError, TypeError), match=message) as raised:
        _trainer().fit(dataset, **fit_options)
    assert "\n" not in str(raised.value)


def test_fit_refuses_model_without_trainable_variables():
    model = scenarios.make_model()
    model.trainable = False
    dataset = scenarios.as_dataset(*scenarios.make_shard(0, 8, weighted=False))
    with pytest.raises(ValueError, match="no trainable variables"):
        _trainer(model=model).fit(dataset, epochs=1)


def test_fit_refuses_loss_that_reduces_to_one_number():
    dataset = scenarios.as_dataset(*scenarios.make_shard(0, 8, weighted=False))
    with pytest.raises(ValueError, match="one number per batch"):
        _trainer(loss=lambda y, p: tf.reduce_mean((y - p) ** 2)).fit(dataset, epochs=1)


@pytest.fixture
def mixed_policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _mixed_precision_runs(case: str, optimizer=None):
    """distaccum and Keras's own step on a case under the global policy, and the float64
    training they approximate; no update skipped by either."""
    model, data, compile_options = cases.setup(case)
    start = [v.numpy() for v in model.trainable_variables]
    trainer = distaccum.Trainer(model, optimizer or cases.optimizer(case),
                                accumulation_steps=cases.K, **compile_options)
    trainer.fit(cases.as_dataset(*data), epochs=cases.EPOCHS)
    keras_step = cases.compiled(case)
    micro_batches = [cases.micro_batches(*data)]
    steps = cases.keras_reference(keras_step, micro_batches, cases.K, cases.EPOCHS)
    if keras.mixed_precision.global_policy().name == "mixed_float16":  # wrapped, as compile does
        assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert int(trainer.optimizer.iterations) == int(keras_step.optimizer.iterations) == steps, (
        "an update was skipped (a float16 overflow)")
    return (model.trainable_variables, keras_step.trainable_variables,
            cases.float64_training(case, start, micro_batches))


@pytest.mark.rounding
@pytest.mark.parametrize("mixed_policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_mixed_precision_stays_within_round_off_of_float64_training(mixed_policy):
    ours, keras_step, training = _mixed_precision_runs("mixed_precision")
    assert all(v.dtype == "float32" for v in ours)
    cases.assert_within_round_off(mixed_policy, ours, keras_step, training)


@pytest.mark.rounding
@pytest.mark.parametrize("mixed_policy", ["mixed_float16"], indirect=True)
def test_round_off_check_fails_when_mixed_float16_leaves_out_loss_scaling(mixed_policy):
    ours, keras_step, training = _mixed_precision_runs("small_gradients")
    cases.assert_within_round_off(mixed_policy, ours, keras_step, training)
    # A scale of 1 is no loss scaling: float16 gradients of 2^-20 of the loss underflow.
    unscaled = keras.optimizers.LossScaleOptimizer(cases.optimizer("small_gradients"),
                                                   initial_scale=1.0)
    ours, _, _ = _mixed_precision_runs("small_gradients", unscaled)
    with pytest.raises(AssertionError, match="units per unit of path from float64"):
        cases.assert_within_round_off(mixed_policy, ours, keras_step, training)


@pytest.mark.rounding
def test_ema_weights_replace_the_trained_ones_at_the_end_as_keras_fit_does():
    # Issue 35, row 5: use_ema was trained but never swapped in. k = 1 on batches of 4: each
    # update is Keras's step on the same batch, and fit ends with the moving average.
    x, y, w = scenarios.make_shard(0, 24, weighted=True)

    def ema_sgd():
        return keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5)

    model, reference = scenarios.make_model(), scenarios.make_model()
    trainer = distaccum.Trainer(model, ema_sgd(), loss=MSE)
    trainer.fit(scenarios.as_dataset(x, y, w), epochs=2)
    reference.compile(optimizer=ema_sgd(), loss=MSE)
    reference.fit(scenarios.as_dataset(x, y, w), epochs=2, shuffle=False, verbose=0)
    scenarios.assert_weights_close(model.trainable_variables, reference.trainable_variables,
                                   rtol=1e-5)
    trained_without = scenarios.make_model()
    distaccum.Trainer(trained_without, keras.optimizers.SGD(0.1), loss=MSE).fit(
        scenarios.as_dataset(x, y, w), epochs=2)
    assert not np.allclose(scenarios.weights_of(model)[0], scenarios.weights_of(trained_without)[0])
