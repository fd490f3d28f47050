"""A user's script: an Embedding text classifier on this worker's uneven shard of Zipf text,
trained once per run named on the command line, each from the same start.

A run's name is `rows` or `dense` (`row_exchange` on or off), then optionally `-<dtype>` (the
allreduce dtype), `-xla`, `-sharded` (`shard_optimizer_state`), and `-mixed`: under `mixed_float16`, with sample weights under
`mean_with_sample_weight` (divided by their sum) and an activity regularizer on the pooled
embedding (divided by the sample count), so the objective has two normalisers and the embedding
two sparse sums. Each rank saves OUT/<run>/rank<r>.npz: final weights, optimizer
iterations, and the mpi4py backend's counts of its collectives and the bytes it sent in them;
with --timelines, each run under Horovod records OUT/<run>/timeline.json.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import distaccum  # noqa: E402
from distaccum import comm  # noqa: E402
import scenarios  # noqa: E402

# Rank 1's shard ends a window early: its last window of each epoch is empty.
SHARD_SIZES = (32, 20)
MICRO_BATCH_SIZE, K, EPOCHS = 4, 2, 2
VOCABULARY, WIDTH, LENGTH = 40_000, 4, 12
# Rare words whose indices' low 16 bits are a float16 Inf or NaN (0x7C00, 0x7C01, 0x7FFF) or a
# bfloat16 NaN (0x7FC1), and the last row: each starts every fourth review.
RARE_WORDS = (0x7C00, 0x7C01, 0x7FC1, 0x7FFF, VOCABULARY - 1)
CLIP = 0.5


def shard(rank: int):
    tokens, labels = scenarios.padded_reviews(SHARD_SIZES[rank], K * MICRO_BATCH_SIZE,
                                              VOCABULARY, LENGTH, seed=rank)
    starts = tokens[::4, 0]
    tokens[::4, 0] = np.resize(RARE_WORDS, starts.size)
    return tokens, labels


def mixed_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((LENGTH,), dtype="int32"),
                             keras.layers.Embedding(VOCABULARY, WIDTH),
                             keras.layers.GlobalAveragePooling1D(),
                             keras.layers.ActivityRegularization(l2=0.01),
                             keras.layers.Dense(1, dtype="float32")])


def optimizer(global_clipnorm=None):
    return keras.optimizers.AdamW(0.05, weight_decay=0.01, global_clipnorm=global_clipnorm)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True, help="comma-separated run names")
    parser.add_argument("--out", required=True)
    parser.add_argument("--timelines", action="store_true", help="a Horovod timeline per run")
    args = parser.parse_args()

    distaccum.init()
    rank = distaccum.rank()
    tokens, labels = shard(rank)
    weights = np.random.default_rng(rank).uniform(0.5, 2.0, len(labels)).astype("float32")
    counts = getattr(comm.current(), "collective_counts", {})
    sent = getattr(comm.current(), "collective_bytes", {})
    for run in args.runs.split(","):
        exchange, *options = run.split("-")
        out = os.path.join(args.out, run)
        os.makedirs(out, exist_ok=True)
        if args.timelines:
            import horovod.tensorflow as hvd

            hvd.start_timeline(os.path.join(out, "timeline.json"))
        before, bytes_before = dict(counts), dict(sent)
        mixed = "mixed" in options
        keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
        # A different initialisation on every rank: training starts from rank 0's anyway.
        model = (mixed_model(5 + rank) if mixed
                 else scenarios.text_classifier(VOCABULARY, WIDTH, LENGTH, seed=5 + rank))
        trainer = distaccum.Trainer(
            model, optimizer(), loss=keras.losses.BinaryCrossentropy(
                from_logits=True, reduction="mean_with_sample_weight" if mixed else
                "sum_over_batch_size"),
            accumulation_steps=K, clip_global_norm=CLIP, row_exchange=exchange == "rows",
            allreduce_dtype=next((o for o in options if o not in ("xla", "mixed", "sharded")),
                                 "float32"),
            jit_compile="xla" in options, shard_optimizer_state="sharded" in options)
        assert trainer.jit_compile == ("xla" in options), "XLA fell back"
        data = (tokens, labels, weights) if mixed else (tokens, labels)
        trainer.fit(tf.data.Dataset.from_tensor_slices(data).batch(MICRO_BATCH_SIZE),
                    epochs=EPOCHS)
        if args.timelines:
            hvd.stop_timeline()
        np.savez(os.path.join(out, f"rank{rank}.npz"), *scenarios.weights_of(model),
                 iterations=int(trainer.optimizer.iterations),
                 **{f"{kind}s": counts[kind] - before.get(kind, 0) for kind in counts},
                 **{f"{kind}_bytes": sent[kind] - bytes_before.get(kind, 0) for kind in sent})


if __name__ == "__main__":
    main()
