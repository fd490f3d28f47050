"""A user's script on TFRecord files: `distaccum.micro_batches` from a glob, then `Trainer.fit`;
with `--source N`, on a random-access source of N samples instead (`scenarios.make_shard(0, N)`,
a sample's id its index).

Runs unchanged under `python` and `mpirun -np N`. Each rank writes OUT/rank<r>.npz: the sample
ids of each of its micro-batches per epoch (read through the same pipeline `fit` reads), how many
records its parse function ran on (or samples the source was asked for), and the final weights.
"""

import argparse
import os
import sys
import threading

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import distaccum  # noqa: E402
import scenarios  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--files", help="a glob of scenarios.write_record_files")
parser.add_argument("--source", type=int, help="samples of a random-access source instead")
parser.add_argument("--accumulation-steps", type=int, required=True)
parser.add_argument("--micro-batch-size", type=int, default=scenarios.MICRO_BATCH_SIZE)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--partitions", type=int, default=12)
parser.add_argument("--out", required=True)
args = parser.parse_args()

distaccum.init()
parsed = tf.Variable(0, dtype=tf.int64)
FEATURES = scenarios.record_features(*scenarios.make_shard(0, 1)[:2])


def parse(record):
    """`(x, y, sample_weight)`, counting the records parsed."""
    parsed.assign_add(1)
    features = tf.io.parse_single_example(record, FEATURES)
    return features["x"], features["y"], features["w"]


def ids_of(record):
    return tf.io.parse_single_example(record, FEATURES)["id"]


class Source:
    """`make_shard(0, n)`'s rows, or their ids (`ids=True`), one `__getitem__` at a time,
    counting the calls."""

    def __init__(self, size: int, ids: bool = False) -> None:
        self.arrays = ((np.arange(size), np.arange(size)) if ids
                       else scenarios.make_shard(0, size))
        self.asked = 0
        self._lock = threading.Lock()  # distaccum calls from several threads

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, index: int):
        with self._lock:
            self.asked += 1
        return tuple(a[index] for a in self.arrays)


options = {"seed": 11, "partitions": args.partitions, "shuffle_buffer": 96}
if args.source:
    source = Source(args.source)
    batches = distaccum.micro_batches(source, args.micro_batch_size, **options)
    source.asked = 0  # the look at source[0]
    id_batches = distaccum.micro_batches(Source(args.source, ids=True), args.micro_batch_size,
                                         **options)
else:
    batches = distaccum.micro_batches(args.files, args.micro_batch_size, parse=parse, **options)
    # The ids, read as `fit` reads: the same order, through a parse that keeps only the id.
    id_batches = distaccum.micro_batches(args.files, args.micro_batch_size, parse=lambda r: (
        ids_of(r), ids_of(r)), **options)
k = args.accumulation_steps
ids = {f"epoch{e}": [b[0].numpy() for b in id_batches.epoch(e, k)]
       for e in range(1, args.epochs + 1)}

model = scenarios.make_model(seed=7)
trainer = distaccum.Trainer(model, scenarios.make_optimizer("sgd"),
                            loss=keras.losses.MeanSquaredError(), accumulation_steps=k)
history = trainer.fit(batches, epochs=args.epochs)
rank = distaccum.rank()
np.savez(os.path.join(args.out, f"rank{rank}.npz"),
         parsed=source.asked if args.source else int(parsed.numpy()),
         update_steps=history.update_steps,
         **{f"weight{i}": w for i, w in enumerate(scenarios.weights_of(model))},
         **{f"{e}_mb{i}": b for e, batches_ in ids.items() for i, b in enumerate(batches_)})
