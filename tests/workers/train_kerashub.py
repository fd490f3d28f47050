"""A user's script: each KerasHub case of tests/kerashub_models.py trained on this worker's
uneven shard; each rank saves OUT/<case>/rank<r>.npz (final weights, optimizer iterations)."""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distaccum  # noqa: E402
import kerashub_models as hub  # noqa: E402
import scenarios  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()

distaccum.init()
rank = distaccum.rank()
for case, (name, lora, make_data, reduction) in hub.CASES.items():
    x, y, w = hub.shard(make_data(), hub.SHARDS[rank])
    # A different initialisation on every rank: training starts from rank 0's anyway.
    model = hub.build(name, lora, seed=1 + rank)
    trainer = distaccum.Trainer(model, hub.optimizer(), loss=hub.loss(reduction),
                                accumulation_steps=hub.K)
    trainer.fit(scenarios.as_dataset(x, y, w, hub.MICRO_BATCH_SIZE), epochs=hub.EPOCHS)
    out = os.path.join(args.out, case)
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, f"rank{rank}.npz"), *[v.numpy() for v in model.trainable_variables],
             iterations=int(trainer.optimizer.iterations))
