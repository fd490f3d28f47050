"""A user's script: real Keras models, Keras metrics and Keras callbacks on this worker's uneven
shard, all in one launch.

First each exactness case of `keras_models`: each rank saves OUT/rank<r>_<case>.npz (final weights,
optimizer iterations and, under mixed_float16, the loss scale); then each KerasHub case of
`kerashub_models`, likewise OUT/rank<r>_<case>.npz. Then three trainings of the binary model,
each saving OUT/<phase>_rank<r>.json:
  metrics    learning rate 0, one epoch: the logged metrics over every worker's samples
  callbacks  EarlyStopping, ModelCheckpoint, CSVLogger and ReduceLROnPlateau, up to 6 epochs
  one_rank   a callback on rank 1 only sets model.stop_training after update 3
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

import distaccum  # noqa: E402
import kerashub_models as hub  # noqa: E402
import keras_models as cases  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()

distaccum.init()
rank = distaccum.rank()
size = cases.SHARD_SIZES[rank]
for case in cases.MULTIWORKER_CASES:
    keras.mixed_precision.set_global_policy(cases.policy(case))
    # A different initialisation on every rank: training must start from rank 0's weights anyway.
    model, data, compile_options = cases.setup(case, rank, size, seed=3 + rank)
    model.compile(optimizer=cases.sgd(), **compile_options)
    trainer = distaccum.Trainer.from_compiled(model, accumulation_steps=cases.K)
    trainer.fit(cases.as_dataset(*data), epochs=cases.EPOCHS)
    extra = {}
    if isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer):
        extra["loss_scale"] = float(trainer.optimizer.dynamic_scale)
    np.savez(os.path.join(args.out, f"rank{rank}_{case}.npz"),
             *[v.numpy() for v in model.trainable_variables],
             iterations=int(trainer.optimizer.iterations), **extra)
    keras.mixed_precision.set_global_policy("float32")

for case, (name, lora, make_data, reduction) in hub.CASES.items():
    model = hub.build(name, lora, seed=1 + rank)
    trainer = distaccum.Trainer(model, hub.optimizer(), loss=hub.loss(reduction),
                                accumulation_steps=hub.K)
    shard = hub.shard(make_data(), hub.SHARDS[rank])
    trainer.fit(cases.as_dataset(*shard, hub.MICRO_BATCH_SIZE), epochs=hub.EPOCHS)
    np.savez(os.path.join(args.out, f"rank{rank}_{case}.npz"),
             *[v.numpy() for v in model.trainable_variables],
             iterations=int(trainer.optimizer.iterations))


training = cases.as_dataset(*cases.binary_data(rank, cases.SHARD_SIZES[rank]))
validation = cases.as_dataset(*cases.binary_data(rank, cases.VALIDATION_SHARD_SIZES[rank], "validation"))


class StopOnRank1(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if rank == 1 and batch == 2:
            self.model.stop_training = True


def train(phase: str, learning_rate: float, epochs: int, callbacks=()):
    model = cases.binary_model(seed=3 + rank)  # rank 0's weights win at the start
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), **cases.binary_compile_options())
    trainer = distaccum.Trainer.from_compiled(model, accumulation_steps=1)
    history = trainer.fit(training, epochs=epochs, validation_data=validation, callbacks=list(callbacks))
    assert isinstance(history, keras.callbacks.History)
    with open(os.path.join(args.out, f"{phase}_rank{rank}.json"), "w") as handle:
        json.dump({"history": history.history, "iterations": int(trainer.optimizer.iterations),
                   "learning_rate": float(trainer.optimizer.learning_rate),
                   "weights": [v.numpy().tolist() for v in model.trainable_variables]}, handle)


train("metrics", 0.0, 1)
out = args.out
train("callbacks", 0.5, 6, [
    # min_delta so large that no epoch improves: stop after epoch 2, lower the rate each epoch.
    keras.callbacks.EarlyStopping(monitor="val_loss", min_delta=100.0, patience=1),
    keras.callbacks.ReduceLROnPlateau(monitor="val_loss", min_delta=100.0, patience=0, factor=0.5),
    keras.callbacks.ModelCheckpoint(os.path.join(out, f"rank{rank}-epoch{{epoch}}.keras")),
    keras.callbacks.CSVLogger(os.path.join(out, f"rank{rank}.csv")),
])
train("one_rank", 0.5, 2, [StopOnRank1()])
