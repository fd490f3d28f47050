"""A user's script: trains the shared test problem on this worker's shard with the public API.

Runs unchanged under `python`, `horovodrun --gloo -np N` and `mpirun -np N`; each rank saves its
final weights, optimizer iterations and history to OUT/rank<r>.npz, or to OUT/k<k>/rank<r>.npz
for each of several comma-separated accumulation steps (one launch, several trainings).
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

import distaccum  # noqa: E402
from distaccum import comm  # noqa: E402
import scenarios  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--accumulation-steps", required=True, help="k, or k1,k2,...")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--optimizer", default="sgd")
parser.add_argument("--out", required=True)
parser.add_argument("--nan-rank", type=int, default=-1, help="rank whose data gets a NaN")
parser.add_argument("--nan-micro-batches", default="", help="comma-separated micro-batch indices")
parser.add_argument("--max-consecutive-skips", type=int, default=5)
args = parser.parse_args()

distaccum.init()
rank = distaccum.rank()
x, y, w = scenarios.make_shard(rank, scenarios.SHARD_SIZES[rank])
if rank == args.nan_rank:
    for index in map(int, args.nan_micro_batches.split(",")):
        x[index * scenarios.MICRO_BATCH_SIZE, 0] = np.nan
several = "," in args.accumulation_steps


class RecordSkips(distaccum.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_update(self, record):
        if bool(record.result.skipped):
            self.steps.append(record.update_step)


# The mpi4py backend counts its own collectives (Horovod's are counted in its timeline).
counts = getattr(comm.current(), "collective_counts", {})
for accumulation_steps in map(int, args.accumulation_steps.split(",")):
    before = dict(counts)
    # A different initialisation on every rank: training must start from rank 0's weights anyway.
    model = scenarios.make_model(seed=7 + rank)
    trainer = distaccum.Trainer(
        model,
        scenarios.make_optimizer(args.optimizer),
        loss=keras.losses.MeanSquaredError(),
        accumulation_steps=accumulation_steps,
    )
    skips = RecordSkips()
    try:
        history = trainer.fit(
            scenarios.as_dataset(x, y, w),
            epochs=args.epochs,
            callbacks=[skips],
            max_consecutive_skips=args.max_consecutive_skips,
        )
    except distaccum.NonFiniteGradients as error:
        print(f"rank {rank}: {error}", file=sys.stderr)
        sys.exit(3)
    out = os.path.join(args.out, f"k{accumulation_steps}") if several else args.out
    os.makedirs(out, exist_ok=True)
    np.savez(
        os.path.join(out, f"rank{rank}.npz"),
        *scenarios.weights_of(model),
        iterations=int(trainer.optimizer.iterations),
        num_workers=distaccum.num_workers(),
        loss=np.array(history.loss),
        micro_step_traces=trainer.micro_step_traces,
        skipped_steps=np.array(skips.steps, dtype=int),
        backend=comm.current().name,
        **{f"{kind}s": counts[kind] - before.get(kind, 0) for kind in counts},
    )
