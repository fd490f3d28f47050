"""KerasHub models built from a config (no preset is downloaded), their data, and the oracle.

A GPT-2 causal LM whose output layer is its token embedding reversed (tied weights), trained with
the padding mask as per-token sample weights, as KerasHub's CausalLM trains, in full and with
LoRA; and a BERT encoder classifier, whose token embedding gets sparse gradients. Micro-batches
of 2, k = 2, two epochs, AdamW. The oracle is the dense large-batch step: Keras's loss, under its
own reduction, on each window's samples, the gradient handed to the optimizer dense, as distaccum
hands it (for sparse gradients Keras's own step updates row by row: the README's Embedding note).
"""

from __future__ import annotations

import keras
import keras_hub  # launch/setup.sh installs it without tensorflow-text
import numpy as np

import scenarios

VOCABULARY, LENGTH, SAMPLES, MICRO_BATCH_SIZE, K, EPOCHS = 50, 10, 10, 2, 2, 2
# Two workers' uneven shards of the same samples: 3 and 2 micro-batches (the last window ragged).
SHARDS = (slice(0, 6), slice(6, 10))
# The distance from the oracle, as a share of how far the weights moved: float32 round-off in
# another summation order is ~1e-6 here (measured 1.5e-6 GPT-2, 5e-7 with LoRA, 3e-7 BERT); a
# wrong divisor is 0.06 (GPT-2 under the default reduction divided by the weights' sum).
TOLERANCE = 1e-4


def build(name: str, lora: bool, seed: int = 1) -> keras.Model:
    keras.utils.set_random_seed(seed)
    sizes = dict(vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=16,
                 intermediate_dim=32, dropout=0.0, max_sequence_length=LENGTH)
    if name == "gpt2":
        model = keras_hub.models.GPT2CausalLM(
            backbone=keras_hub.models.GPT2Backbone(**sizes), preprocessor=None)
    else:
        model = keras_hub.models.BertTextClassifier(
            backbone=keras_hub.models.BertBackbone(**sizes), num_classes=3, preprocessor=None,
            dropout=0.0)
    if lora:
        model.backbone.enable_lora(4)
    return model


def _padded_tokens(rng):
    tokens = rng.integers(1, VOCABULARY, size=(SAMPLES, LENGTH)).astype("int32")
    padding_mask = np.arange(LENGTH)[None] < rng.integers(3, LENGTH + 1, size=SAMPLES)[:, None]
    tokens[~padding_mask] = 0
    return tokens, padding_mask


def causal_lm_data():
    """Next-token labels, weighted 1 where the next token is text and 0 where it is padding."""
    tokens, padding_mask = _padded_tokens(np.random.default_rng(0))
    labels = np.concatenate([tokens[:, 1:], np.zeros((SAMPLES, 1), "int32")], axis=1)
    weights = np.concatenate([padding_mask[:, 1:], np.zeros((SAMPLES, 1), bool)], axis=1)
    return ({"token_ids": tokens, "padding_mask": padding_mask}, labels,
            weights.astype("float32"))


def classifier_data():
    rng = np.random.default_rng(1)
    tokens, padding_mask = _padded_tokens(rng)
    inputs = {"token_ids": tokens, "padding_mask": padding_mask,
              "segment_ids": np.zeros_like(tokens)}
    return inputs, rng.integers(0, 3, size=SAMPLES).astype("int32"), None


# name: (model, LoRA, data, the loss's reduction). KerasHub's CausalLM weighs tokens by the
# padding mask under Keras's default reduction (a mean over every token, padding included);
# `mean_with_sample_weight` divides by the text tokens instead.
CASES = {
    "gpt2_tied_embeddings": ("gpt2", False, causal_lm_data, "sum_over_batch_size"),
    "gpt2_tied_embeddings_lora": ("gpt2", True, causal_lm_data, "mean_with_sample_weight"),
    "bert_classifier": ("bert", False, classifier_data, "sum_over_batch_size"),
}


def loss(reduction: str) -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)


def optimizer() -> keras.optimizers.Optimizer:
    return keras.optimizers.AdamW(1e-2)


def shard(data, part: slice):
    """One worker's samples of `(x, y, w)`."""
    return tuple(scenarios.take(values, part) for values in data)


def dense_large_batch_steps(model, case_loss, data_shards) -> int:
    """The oracle on every worker's shard of `(x, y, w)`: one dense step per window. Returns the
    number of steps."""
    return scenarios.reference_training(
        model, optimizer(), case_loss,
        [scenarios.split_micro_batches(*data, MICRO_BATCH_SIZE) for data in data_shards], K,
        EPOCHS, densify=True)
