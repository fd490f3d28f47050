"""A user's script: trains the shared test problem on this worker's shard with the public API.

Runs unchanged under `python`, `horovodrun --gloo -np N` and `mpirun -np N`; each rank saves its
final weights, optimizer iterations and history to OUT/rank<r>.npz.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

import distaccum  # noqa: E402
import scenarios  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--accumulation-steps", type=int, required=True)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--optimizer", default="sgd")
parser.add_argument("--out", required=True)
args = parser.parse_args()

distaccum.init()
rank = distaccum.rank()
x, y, w = scenarios.make_shard(rank, scenarios.SHARD_SIZES[rank])
# A different initialisation on every rank: training must start from rank 0's weights anyway.
model = scenarios.make_model(seed=7 + rank)
trainer = distaccum.Trainer(
    model,
    scenarios.make_optimizer(args.optimizer),
    loss=keras.losses.MeanSquaredError(),
    accumulation_steps=args.accumulation_steps,
)
history = trainer.fit(scenarios.as_dataset(x, y, w), epochs=args.epochs)
np.savez(
    os.path.join(args.out, f"rank{rank}.npz"),
    *scenarios.weights_of(model),
    iterations=int(trainer.optimizer.iterations),
    num_workers=distaccum.num_workers(),
    loss=np.array(history.loss),
    micro_step_traces=trainer.micro_step_traces,
)
