"""A user's script: trains each real Keras model case of `keras_models` on this worker's uneven
shard, in one launch. Each rank saves OUT/rank<r>_<case>.npz: final weights, optimizer
iterations and, under mixed_float16, the loss scale.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

import distaccum  # noqa: E402
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
