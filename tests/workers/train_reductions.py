"""Every case of `reductions` on this worker's uneven shard, in one launch: each rank saves
OUT/rank<r>.npz with, per case, its trained weights (`<case>/<i>`, `<case>/count`) and its
optimizer's iterations (`<case>/iterations`), and the backend it ran on (`backend`).

    --jit-compile   distaccum's steps under XLA (`reductions.xla_cases()` only)
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distaccum  # noqa: E402
import reductions  # noqa: E402
import scenarios  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--jit-compile", action="store_true")
args = parser.parse_args()

backend = distaccum.init()
rank = distaccum.rank()
saved = {"backend": type(backend).__name__}
for name, case in (reductions.xla_cases() if args.jit_compile else reductions.cases()).items():
    # A different initialisation on every rank: training must start from rank 0's weights anyway.
    model = case.build(seed=3 + rank)
    trainer = distaccum.Trainer(model, reductions.optimizer(), loss=case.loss,
                                loss_weights=case.loss_weights, accumulation_steps=reductions.K,
                                jit_compile=args.jit_compile)
    assert trainer.jit_compile is args.jit_compile
    trainer.fit(scenarios.as_dataset(*case.data(reductions.SHARDS[rank]),
                                     reductions.MICRO_BATCH_SIZE),
                epochs=reductions.EPOCHS, **case.train_options())
    saved.update({f"{name}/{i}": v.numpy() for i, v in enumerate(model.trainable_variables)})
    saved[f"{name}/count"] = len(model.trainable_variables)
    saved[f"{name}/iterations"] = int(trainer.optimizer.iterations)
np.savez(os.path.join(args.out, f"rank{rank}.npz"), **saved)
