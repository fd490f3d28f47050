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

`distaccum stop-ranks [--timeout S]` is the same stop for a process that is not the ranks'
launcher: a Kubernetes worker pod, whose PID 1 is sshd and whose ranks are sshd's descendants.
When the pod is stopped, sshd exits on its SIGTERM and the kernel then SIGKILLs every process in
the container, so the ranks never see a signal. As the worker's `preStop` hook, which the
kubelet runs before it signals PID 1, it sends SIGTERM to every `distaccum train` process in the
container (found in /proc: the image need not have procps) and waits until they have exited,
that is, until the job has stopped after one update and rank 0 has saved its checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

# Launchers that end their job on SIGTERM but pass SIGUSR1 on to every rank.
OPEN_MPI_LAUNCHERS = ("mpirun", "mpiexec", "prterun", "orterun")
PROC = Path("/proc")
POLL_SECONDS = 0.05


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


def is_train_command(argv: Sequence[str]) -> bool:
    """Whether `argv` runs `distaccum train`: the console script, directly or through its
    interpreter (as /proc shows a script its #! line started), or `python -m distaccum.cli`.
    A launcher whose command line ends in `distaccum train` is not one."""
    words = list(argv)
    if words and Path(words[0]).name.startswith("python"):
        words = words[2:] if words[1:2] == ["-m"] else words[1:]
    return (len(words) >= 2 and Path(words[0]).name in ("distaccum", "distaccum.cli")
            and words[1] == "train")


def _identity(pid: int) -> str | None:
    """The process's start time (what tells it from a later process with the same id), or None
    once it has exited (gone, or a zombie that its parent has yet to reap)."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def train_ranks() -> dict[int, str]:
    """Every `distaccum train` process this one can see, but itself: {pid: start time}."""
    found = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if is_train_command([word.decode(errors="replace") for word in argv if word]):
            identity = _identity(int(entry.name))
            if identity is not None:
                found[int(entry.name)] = identity
    return found


def stop_ranks(timeout: float) -> str:
    """SIGTERM every `distaccum train` process, then wait up to `timeout` seconds for all of them
    to exit; one line saying what happened."""
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"stop-ranks: --timeout must be a number of seconds > 0. Received: "
                         f"--timeout={timeout}")
    started = time.monotonic()
    signalled = {}
    for pid, identity in train_ranks().items():
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):  # exited meanwhile, or another user's
            continue
        signalled[pid] = identity
    if not signalled:
        return "stop-ranks: no `distaccum train` process running here, nothing to stop"
    running = dict(signalled)
    while running and time.monotonic() - started < timeout:
        time.sleep(POLL_SECONDS)
        running = {pid: i for pid, i in running.items() if _identity(pid) == i}
    pids = ", ".join(map(str, sorted(running or signalled)))
    seconds = time.monotonic() - started
    if running:
        return (f"stop-ranks: {len(running)} of {len(signalled)} `distaccum train` processes "
                f"still running {seconds:.1f} s after SIGTERM (--timeout={timeout:g}): {pids}")
    return (f"stop-ranks: {len(signalled)} `distaccum train` processes stopped {seconds:.1f} s "
            f"after SIGTERM: {pids}")
