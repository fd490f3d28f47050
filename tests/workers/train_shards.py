"""A user's script: trains the shared test problem on this worker's shard with the public API.

Runs unchanged under `python`, `horovodrun --gloo -np N` and `mpirun -np N`; each rank saves its
final weights, optimizer iterations and history to OUT/rank<r>.npz, or, for several trainings in
one launch (comma-separated accumulation steps, allreduce dtypes and jit_compile values), to
OUT/<run>/rank<r>.npz with <run> = k<k> for float32 and k<k>-<dtype> otherwise, plus -xla under
XLA (for float32 sums only). With --timelines, each training under
Horovod records its own timeline, OUT/<run>/timeline.json.
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

parser = argparse.ArgumentParser()
parser.add_argument("--accumulation-steps", required=True, help="k, or k1,k2,...")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--optimizer", default="sgd")
parser.add_argument("--out", required=True)
parser.add_argument("--nan-rank", type=int, default=-1, help="rank whose data gets a NaN")
parser.add_argument("--nan-micro-batches", default="", help="comma-separated micro-batch indices")
parser.add_argument("--max-consecutive-skips", type=int, default=5)
parser.add_argument("--allreduce-dtypes", default="float32", help="dtype, or dtype1,dtype2,...")
parser.add_argument("--jit-compile", default="false", help="false, true, or false,true")
parser.add_argument("--sharded-optimizers", default="",
                    help="optimizers (scenarios.make_optimizer's names) to train with sharded "
                         "state too, after the other runs: k<k>-sharded-<name>[-xla]")
parser.add_argument("--timelines", action="store_true", help="a Horovod timeline per training")
parser.add_argument("--bad-rank", type=int, default=-1, help="rank that meets a bad micro-batch")
parser.add_argument("--bad-epoch", type=int, default=2)
parser.add_argument("--bad-micro-batch", type=int, default=1, help="1-based, in that epoch")
parser.add_argument("--bad-kind", choices=("shape", "dtype"), default="shape")
args = parser.parse_args()

distaccum.init()
rank = distaccum.rank()
x, y, w = scenarios.make_shard(rank, scenarios.SHARD_SIZES[rank])
if rank == args.nan_rank:
    for index in map(int, args.nan_micro_batches.split(",")):
        x[index * scenarios.MICRO_BATCH_SIZE, 0] = np.nan
runs = [(int(k), dtype, jit == "true", None) for k in args.accumulation_steps.split(",")
        for dtype in args.allreduce_dtypes.split(",") for jit in args.jit_compile.split(",")
        if dtype == "float32" or jit == "false"]
sharded = [name for name in args.sharded_optimizers.split(",") if name]
# Sharded state: every optimizer without XLA, the first with each jit_compile value.
runs += [(int(k), "float32", jit == "true", name) for k in args.accumulation_steps.split(",")
         for name in sharded for jit in args.jit_compile.split(",")
         if jit == "false" or name == sharded[0]]


def training_data():
    """This rank's micro-batches; a function of the epoch when a bad micro-batch is injected
    (the input pipeline itself then fails on it, as a corrupt record would)."""
    good = scenarios.as_dataset(x, y, w)
    if rank != args.bad_rank:
        return good
    batches = scenarios.split_micro_batches(x, y, w)

    def epoch_data(epoch):
        def generate():
            for index, (bx, by, bw) in enumerate(batches, start=1):
                if epoch == args.bad_epoch and index == args.bad_micro_batch:
                    bx = bx[:, :-1] if args.bad_kind == "shape" else np.full(bx.shape, "corrupt")
                yield bx, by, bw

        return tf.data.Dataset.from_generator(generate, output_signature=good.element_spec)

    return epoch_data


class RecordSkips(distaccum.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_update(self, record):
        if bool(record.result.skipped):
            self.steps.append(record.update_step)


# The mpi4py backend counts its own collectives (Horovod's are counted in its timeline).
counts = getattr(comm.current(), "collective_counts", {})
sent = getattr(comm.current(), "collective_bytes", {})
# The first sharded optimizer's runs send every variable of more than 48 bytes in ranges of two
# rows (the first kernel, 5 × 6), as a table larger than `pieces.CUT_BYTES` travels: at start-up,
# in the reduce-scatter and in the allgather. The other runs send variables whole.
WHOLE, CUT = (comm.pieces.CUT_BYTES, comm.pieces.GROUP_BYTES), (0, 48)
for accumulation_steps, allreduce_dtype, jit_compile, sharded_optimizer in runs:
    comm.pieces.CUT_BYTES, comm.pieces.GROUP_BYTES = (
        CUT if sharded and sharded_optimizer == sharded[0] else WHOLE)
    name = (f"k{accumulation_steps}" + ("" if allreduce_dtype == "float32" else f"-{allreduce_dtype}")
            + (f"-sharded-{sharded_optimizer}" if sharded_optimizer else "")
            + ("-xla" if jit_compile else ""))
    out = os.path.join(args.out, name) if len(runs) > 1 else args.out
    os.makedirs(out, exist_ok=True)
    if args.timelines:
        import horovod.tensorflow as hvd

        hvd.start_timeline(os.path.join(out, "timeline.json"))
    before, bytes_before = dict(counts), dict(sent)
    # A different initialisation on every rank: training must start from rank 0's weights anyway.
    model = scenarios.make_model(seed=7 + rank)
    optimizer, clip = scenarios.trainer_optimizer(sharded_optimizer or args.optimizer)
    trainer = distaccum.Trainer(
        model,
        optimizer,
        loss=keras.losses.MeanSquaredError(),
        accumulation_steps=accumulation_steps,
        allreduce_dtype=allreduce_dtype,
        jit_compile=jit_compile,
        clip_global_norm=clip,
        shard_optimizer_state=sharded_optimizer is not None,
    )
    assert trainer.jit_compile == jit_compile, "XLA fell back"
    skips = RecordSkips()
    try:
        history = trainer.fit(
            training_data(),
            epochs=args.epochs,
            callbacks=[skips],
            max_consecutive_skips=args.max_consecutive_skips,
        )
    except distaccum.NonFiniteGradients as error:
        print(f"rank {rank}: {error}", file=sys.stderr)
        sys.exit(3)
    except distaccum.BadMicroBatch as error:
        print(f"rank {rank} stopped: {error}", file=sys.stderr, flush=True)
        sys.exit(4)
    if args.timelines:
        hvd.stop_timeline()
    np.savez(
        os.path.join(out, f"rank{rank}.npz"),
        *scenarios.weights_of(model),
        iterations=int(trainer.optimizer.iterations),
        num_workers=distaccum.num_workers(),
        loss=np.array(history.loss),
        micro_step_traces=trainer.micro_step_traces,
        travelling=len(comm.pieces.travelling(model.trainable_variables)),
        skipped_steps=np.array(skips.steps, dtype=int),
        backend=comm.current().name,
        **{f"{kind}s": counts[kind] - before.get(kind, 0) for kind in counts},
        **{f"{kind}_bytes": sent[kind] - bytes_before.get(kind, 0) for kind in sent},
    )
