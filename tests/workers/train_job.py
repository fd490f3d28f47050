"""`distaccum train ARGS` as the CLI runs it, then each rank's model and optimizer state to
DUMP/rank<r>.npz (whatever the exit: a run stopped by SIGTERM too), so that tests can compare the
ranks' states bitwise: only rank 0 writes checkpoints and the model.

    python train_job.py DUMP train --config ... --set ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: parse

import numpy as np  # noqa: E402

from distaccum import cli, comm, job  # noqa: E402

dump, arguments = sys.argv[1], sys.argv[2:]
trainers = []
build_trainer = job.build_trainer


def build_and_keep(*args, **kwargs):
    trainers.append(build_trainer(*args, **kwargs))
    return trainers[-1]


job.build_trainer = build_and_keep
code = cli.main(arguments)
if trainers:
    np.savez(os.path.join(dump, f"rank{comm.rank()}.npz"),
             *[np.asarray(v.numpy()) for v in trainers[0].state_variables])
sys.exit(code)
