"""KerasHub models, one process: k micro-steps equal Keras's own step on each window.

Backbones build from a config (no preset is downloaded): a GPT-2 causal LM whose output layer is
its token embedding reversed (tied weights), trained with the padding mask as per-token sample
weights, as KerasHub's CausalLM trains, in full and with LoRA; and a BERT encoder classifier.
Micro-batches of 2 from 10 samples, k = 2 (a ragged last window of one micro-batch), two epochs,
AdamW; the oracle is Keras's `train_on_batch` on each window's samples.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import distaccum
import keras_models as cases
import scenarios

import keras_hub  # noqa: E402  (launch/setup.sh installs it without tensorflow-text)

VOCABULARY, LENGTH, SAMPLES, MICRO_BATCH_SIZE, K, EPOCHS = 50, 10, 10, 2, 2, 2
# The distance from Keras's step, as a share of how far the weights moved: float32 round-off in
# another summation order is ~1e-6 here (measured 1.5e-6 full, 5e-7 with LoRA); a wrong divisor
# is 0.06-0.1 (the default reduction with these weights, until distaccum honours it).
TOLERANCE = 1e-4


def _backbone_layers(name: str, seed: int):
    keras.utils.set_random_seed(seed)
    sizes = dict(vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=16,
                 intermediate_dim=32, dropout=0.0, max_sequence_length=LENGTH)
    if name == "gpt2":
        return keras_hub.models.GPT2CausalLM(
            backbone=keras_hub.models.GPT2Backbone(**sizes), preprocessor=None)
    return keras_hub.models.BertTextClassifier(
        backbone=keras_hub.models.BertBackbone(**sizes), num_classes=3, preprocessor=None,
        dropout=0.0)


def _padded_tokens(rng):
    tokens = rng.integers(1, VOCABULARY, size=(SAMPLES, LENGTH)).astype("int32")
    padding_mask = np.arange(LENGTH)[None] < rng.integers(3, LENGTH + 1, size=SAMPLES)[:, None]
    tokens[~padding_mask] = 0
    return tokens, padding_mask


def _causal_lm_data():
    """Next-token labels, weighted 1 where the next token is text and 0 where it is padding."""
    tokens, padding_mask = _padded_tokens(np.random.default_rng(0))
    labels = np.concatenate([tokens[:, 1:], np.zeros((SAMPLES, 1), "int32")], axis=1)
    weights = np.concatenate([padding_mask[:, 1:], np.zeros((SAMPLES, 1), bool)], axis=1)
    return ({"token_ids": tokens, "padding_mask": padding_mask}, labels,
            weights.astype("float32"))


def _classifier_data():
    rng = np.random.default_rng(1)
    tokens, padding_mask = _padded_tokens(rng)
    inputs = {"token_ids": tokens, "padding_mask": padding_mask,
              "segment_ids": np.zeros_like(tokens)}
    return inputs, rng.integers(0, 3, size=SAMPLES).astype("int32"), None


def _dense_large_batch_steps(model, optimizer, loss, x, y, w) -> int:
    """Keras's loss on each window's concatenated micro-batches, one dense step each."""
    steps = 0
    for window_x, window_y, window_w in cases.windows(
            [scenarios.split_micro_batches(x, y, w, MICRO_BATCH_SIZE)], K, EPOCHS):
        with tf.GradientTape() as tape:
            value = loss(window_y, model(window_x, training=True), sample_weight=window_w)
        gradients = tape.gradient(value, model.trainable_variables)
        optimizer.apply_gradients(zip([tf.convert_to_tensor(g) for g in gradients],
                                      model.trainable_variables))
        steps += 1
    return steps


def _flat(variables) -> np.ndarray:
    return np.concatenate([np.asarray(v).ravel() for v in variables])


CASES = {
    # KerasHub's CausalLM weighs tokens by the padding mask and divides by their sum.
    "gpt2_tied_embeddings": ("gpt2", False, _causal_lm_data, "mean_with_sample_weight"),
    "gpt2_tied_embeddings_lora": ("gpt2", True, _causal_lm_data, "mean_with_sample_weight"),
    "bert_classifier": ("bert", False, _classifier_data, "sum_over_batch_size"),
}


@pytest.mark.rounding
@pytest.mark.parametrize("name, lora, make_data, reduction", CASES.values(), ids=CASES.keys())
def test_kerashub_model_takes_the_dense_large_batch_step_when_accumulated(
        name, lora, make_data, reduction):
    x, y, w = make_data()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    models = []
    for _ in range(2):  # distaccum's, then Keras's: the same initial weights
        model = _backbone_layers(name, seed=1)
        if lora:
            model.backbone.enable_lora(4)
        models.append(model)
    model, reference = models
    start = _flat(model.trainable_variables)
    trainer = distaccum.Trainer(model, keras.optimizers.AdamW(1e-2), loss=loss,
                                accumulation_steps=K)
    trainer.fit(scenarios.as_dataset(x, y, w, MICRO_BATCH_SIZE), epochs=EPOCHS)
    steps = _dense_large_batch_steps(reference, keras.optimizers.AdamW(1e-2), loss, x, y, w)
    assert int(trainer.optimizer.iterations) == steps == 6
    moved = _flat(reference.trainable_variables) - start
    error = _flat(model.trainable_variables) - _flat(reference.trainable_variables)
    assert np.linalg.norm(error) <= TOLERANCE * np.linalg.norm(moved)
