"""distaccum: exact gradient accumulation for Keras 3, with one allreduce per update step (one per
32 MiB of gradients beyond that).

    import distaccum
    distaccum.init()
    trainer = distaccum.Trainer(model, optimizer, loss=loss, global_batch_size=256)
    history = trainer.fit(distaccum.micro_batches((x, y), 32), epochs=2)

The same script runs as `python script.py` (one process, no Horovod needed), under
`horovodrun --gloo -np N` and under `mpirun -np N`.

Names are imported on first use, so `distaccum.config` and the CLI's argument checks do not pay
for importing TensorFlow.
"""

import importlib

_PUBLIC_NAMES = {
    "init": "distaccum.comm",
    "rank": "distaccum.comm",
    "local_rank": "distaccum.comm",
    "num_workers": "distaccum.comm",
    "is_chief": "distaccum.comm",
    "shard": "distaccum.data",
    "micro_batches": "distaccum.microbatches",
    "MicroBatches": "distaccum.microbatches",
    "ImageFolder": "distaccum.imagefolders",
    "mixture": "distaccum.mixtures",
    "Mixture": "distaccum.mixtures",
    "Trainer": "distaccum.trainer",
    "UpdateResult": "distaccum.steps",
    "InexactWarning": "distaccum.objective",
    "XLAWarning": "distaccum.xla",
    "HostMemoryWarning": "distaccum.comm",
    "Controller": "distaccum.controller",
    "CadenceOptions": "distaccum.controller",
    "History": "distaccum.history",
    "UpdateRecord": "distaccum.history",
    "IntervalRecord": "distaccum.history",
    "Callback": "distaccum.callbacks",
    "Position": "distaccum.history",
    "TrainingInterrupted": "distaccum.errors",
    "NonFiniteGradients": "distaccum.errors",
    "BadMicroBatch": "distaccum.errors",
    "ModelDataMismatch": "distaccum.errors",
}

__all__ = sorted(_PUBLIC_NAMES)


def __getattr__(name: str):
    if name not in _PUBLIC_NAMES:
        raise AttributeError(f"module 'distaccum' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC_NAMES[name]), name)
