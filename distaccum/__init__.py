"""distaccum: exact gradient accumulation for Keras 3, with one allreduce per update step.

    import distaccum
    distaccum.init()
    trainer = distaccum.Trainer(model, optimizer, loss=loss, accumulation_steps=4)
    history = trainer.fit(dataset, epochs=2)

The same script runs as `python script.py` (one process, no Horovod needed), under
`horovodrun --gloo -np N` and under `mpirun -np N`.
"""

from distaccum.comm import init, is_chief, local_rank, num_workers, rank
from distaccum.controller import Controller, EpochRecord, History, UpdateRecord
from distaccum.data import shard
from distaccum.trainer import Trainer, UpdateResult

__all__ = [
    "Controller",
    "EpochRecord",
    "History",
    "Trainer",
    "UpdateRecord",
    "UpdateResult",
    "init",
    "is_chief",
    "local_rank",
    "num_workers",
    "rank",
    "shard",
]
