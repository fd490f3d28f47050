"""A user's own script on the public API, `Trainer.fit` under an elastic `horovodrun`: a compiled
Keras model on arrays, `global_batch_size` kept, a callback of its own that holds each update
0.1 s (so that a change reaches the job mid-run) and prints it on rank 0. Each rank saves its
final weights to DUMP/rank<r>.npz.

    python elastic_fit.py DUMP
"""

import os
import sys
import time

import keras
import numpy as np

import distaccum

EPOCHS = 8
GLOBAL_BATCH = 128


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 16)).astype("float32")
    y = (x[:, :4].sum(axis=1) > 0).astype("int32")
    return x, y


def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    built = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(2)])
    built.compile(optimizer=keras.optimizers.Adam(0.003), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return built


class Paced(distaccum.Callback):
    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause

    def on_update(self, record) -> None:
        if distaccum.is_chief():
            print(f"update {record.update_step} on {distaccum.num_workers()} workers", flush=True)
        time.sleep(self.pause)


def train(pause: float = 0.0) -> keras.Model:
    distaccum.init()
    trained = model()
    trainer = distaccum.Trainer.from_compiled(trained, global_batch_size=GLOBAL_BATCH)
    trainer.fit(distaccum.micro_batches(data(), 32), epochs=EPOCHS, callbacks=[Paced(pause)])
    return trained


if __name__ == "__main__":
    weights = train(pause=0.1).get_weights()
    np.savez(os.path.join(sys.argv[1], f"rank{distaccum.rank()}.npz"), *weights)
