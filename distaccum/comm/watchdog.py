"""How a worker stops when a collective cannot complete: the one thing every backend shares.

A collective that hangs (a peer's node or network gone) ends the process after
`collective_timeout` seconds; one that fails (a peer's process gone) becomes one `WorkerLost`.
Both are the same for Horovod and mpi4py, so they live apart from the backends; this module knows
nothing of them (the package's `collective()` passes in the rank and worker count), so it imports
neither Horovod nor mpi4py nor the package.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Callable, Iterator

import tensorflow as tf

# Seconds a collective may take before this worker gives up on it (`set_collective_timeout`).
DEFAULT_COLLECTIVE_TIMEOUT = 300.0
EXIT_COLLECTIVE_TIMEOUT = 1


class WorkerLost(RuntimeError):
    """A collective failed: another worker is gone (its process died, was killed, or its network
    failed). Raised on the surviving workers so they stop instead of waiting forever."""


class WorkersChanged(RuntimeError):
    """A collective failed in an elastic job (another worker is gone): the survivors go back to
    the last update every one of them applied and go on with the workers that are left
    (`Controller`), instead of stopping."""


class Watchdog:
    """Ends this process when a collective outlasts its timeout.

    A worker whose peer's node vanished (its network gone, the process alive) waits in the
    allreduce until TCP gives up, which can take many minutes or, with keep-alives off, forever;
    neither Horovod nor MPI has a timeout of its own for that. One daemon thread, started with the
    first collective, sleeps until the current collective's deadline; entering and leaving a
    collective only sets or clears that deadline under a lock (microseconds, against an update
    step's milliseconds). On expiry it prints one line and exits the process, since the collective
    itself cannot be interrupted.
    """

    def __init__(self) -> None:
        self.timeout = DEFAULT_COLLECTIVE_TIMEOUT
        self._changed = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        self._rank: Callable[[], int] = lambda: 0
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, what: str, rank: Callable[[], int]) -> Iterator[None]:
        """Watch the collective(s) of `what`. `rank` is asked only when the timeout expires, so
        entering stays a deadline set under a lock."""
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="distaccum-watchdog",
                                                daemon=True)
                self._thread.start()
            self._deadline, self._what, self._rank = time.monotonic() + self.timeout, what, rank
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._deadline = None

    def _run(self) -> None:
        with self._changed:
            while True:
                if self._deadline is None:
                    self._changed.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._changed.wait(remaining)
                    continue
                print(f"distaccum: error: rank {self._rank()}: {self._what} did not complete "
                      f"within collective_timeout={self.timeout:g} s (another worker, its node or "
                      "the network between them is gone); stopping", file=sys.stderr, flush=True)
                os._exit(EXIT_COLLECTIVE_TIMEOUT)


# One per process: the timeout is the job's, and one thread serves every collective.
_watchdog = Watchdog()


def set_collective_timeout(seconds: float) -> None:
    """How long any collective may take before this worker stops (`collective_timeout`)."""
    if not seconds > 0:
        raise ValueError(f"collective_timeout must be > 0 seconds. Received: "
                         f"collective_timeout={seconds!r}")
    _watchdog.timeout = float(seconds)


@contextlib.contextmanager
def guarded(what: str, workers: int, rank: Callable[[], int], elastic: bool = False
            ) -> Iterator[None]:
    """The package's `collective()`, given the job's worker count and this worker's `rank` (asked
    only for a message, so entering makes no call into the backend). A lone worker waits for
    nobody: it goes unwatched, and only its errors become `WorkerLost` (`WorkersChanged` when
    the job is `elastic`: workers may join it)."""
    watched = _watchdog.watching(what, rank) if workers > 1 else contextlib.nullcontext()
    try:
        with watched:
            yield
    except tf.errors.OpError as error:
        if not any(name in str(error).lower() for name in ("horovod", "mpi")):
            raise
        if elastic:
            raise WorkersChanged(f"rank {rank()} lost contact with another worker during {what}; "
                                 "going on with the workers that are left") from None
        raise WorkerLost(
            f"rank {rank()} lost contact with another worker during {what} (a worker process "
            "died, was killed, or its network failed); stopping"
        ) from None
