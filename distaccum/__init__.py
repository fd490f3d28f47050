"""distaccum: exact gradient accumulation for Keras 3, with one allreduce per update step.

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
    "Trainer": "distaccum.trainer",
    "UpdateResult": "distaccum.trainer",
    "InexactWarning": "distaccum.objective",
    "XLAWarning": "distaccum.trainer",
    "HostMemoryWarning": "distaccum.comm",
    "Controller": "distaccum.controller",
    "CadenceOptions": "distaccum.controller",
    "History": "distaccum.records",
    "UpdateRecord": "distaccum.records",
    "IntervalRecord": "distaccum.records",
    "Callback": "distaccum.callbacks",
    "Position": "distaccum.records",
    "TrainingInterrupted": "distaccum.records",
    "NonFiniteGradients": "distaccum.records",
    "BadMicroBatch": "distaccum.records",
    "ModelDataMismatch": "distaccum.records",
}

__all__ = sorted(_PUBLIC_NAMES)


def __getattr__(name: str):
    if name not in _PUBLIC_NAMES:
        raise AttributeError(f"module 'distaccum' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC_NAMES[name]), name)
