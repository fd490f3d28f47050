"""`distaccum train ARGS` as the CLI runs it, then each rank's model and optimizer state to
DUMP/rank<r>.npz (whatever the exit: a run stopped by SIGTERM too), so that tests can compare the
ranks' states bitwise: only rank 0 writes checkpoints and the model.

Each update this process applies is also appended to DUMP/updates-<pid>.txt as "step samples
workers k" (the samples summed over workers), so that tests can count every update's samples
across an elastic job's changes; `UPDATE_PAUSE` (seconds) holds each update that long, so that
a change announced mid-run reaches the job before it ends.

    python train_job.py DUMP train --config ... --set ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: parse

import time  # noqa: E402

import numpy as np  # noqa: E402

from distaccum import cli, comm, job  # noqa: E402

dump, arguments = sys.argv[1], sys.argv[2:]
trainers = []
build_trainer = job.build_trainer


def build_and_keep(*args, **kwargs):
    trainer = build_trainer(*args, **kwargs)
    trainers.append(trainer)
    update_step, pause = trainer.update_step, float(os.environ.get("UPDATE_PAUSE", 0))

    def counted_update_step(*update_args, **update_kwargs):
        result = update_step(*update_args, **update_kwargs)
        if not (float(result.cancel_votes) or float(result.bad_micro_batches.numpy().max())):
            with open(os.path.join(dump, f"updates-{os.getpid()}.txt"), "a") as log:
                log.write(f"{update_kwargs.get('step')} {int(result.sample_count)} "
                          f"{comm.num_workers()} {trainer.accumulation_steps}\n")
        time.sleep(pause)
        return result

    trainer.update_step = counted_update_step
    return trainer


job.build_trainer = build_and_keep
code = cli.main(arguments)
if trainers:
    np.savez(os.path.join(dump, f"rank{comm.rank()}.npz"),
             *[np.asarray(v.numpy()) for v in trainers[0].state_variables])
sys.exit(code)
