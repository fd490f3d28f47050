"""`distaccum launch COMMAND ...`: run a launcher so that a SIGTERM sent to it stops the job at
an update boundary, with a checkpoint, instead of killing the ranks.

Open MPI's `mpirun` (PRRTE) answers its own SIGTERM by ending the job: every rank gets SIGTERM
0.25 s later and SIGKILL 0.5 s later, too soon for the update in flight and a checkpoint. It
passes SIGUSR1 on to every rank unchanged, and distaccum's workers take SIGUSR1 as they take
SIGTERM. So this process runs COMMAND, and on SIGTERM sends an Open MPI launcher SIGUSR1 (any
other launcher gets the SIGTERM itself: `horovodrun` passes it on and gives the ranks 5 s); a
second SIGTERM is passed on as SIGTERM, which ends the job at once. It exits with COMMAND's exit
code. Where a scheduler sends SIGTERM to one process only (Kubernetes: the container's PID 1),
that process should be this one, not `mpirun`.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Sequence

# Launchers that end their job on SIGTERM but pass SIGUSR1 on to every rank.
OPEN_MPI_LAUNCHERS = ("mpirun", "mpiexec", "prterun", "orterun")


def stop_signal(command: Sequence[str]) -> signal.Signals:
    """What asks `command`'s ranks to stop at the next update: SIGUSR1 for Open MPI's launchers,
    SIGTERM for the others."""
    return signal.SIGUSR1 if Path(command[0]).name in OPEN_MPI_LAUNCHERS else signal.SIGTERM


def run(command: Sequence[str]) -> int:
    """Run `command` until it exits, turning the first SIGTERM into its stop signal; its exit
    code (128 + the signal's number if a signal ended it)."""
    if not command:
        raise ValueError("launch needs a command to run, e.g. `distaccum launch mpirun -np 2 "
                         "distaccum train --config job.yaml`. Received: nothing")
    received = []
    process: subprocess.Popen | None = None

    def forward(signum, frame) -> None:
        received.append(signum)
        if process is not None:
            process.send_signal(stop_signal(command) if len(received) == 1 else signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)  # before the start, so that none is missed
    try:
        process = subprocess.Popen(list(command))
    except OSError as error:
        raise ValueError(f"launch: cannot start {command[0]!r} ({error.strerror}). Received: "
                         f"{' '.join(command)}") from None
    if received:  # arrived while the command was starting
        process.send_signal(stop_signal(command))
    code = process.wait()
    return 128 - code if code < 0 else code
