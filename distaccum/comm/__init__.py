"""The communication backend: the only package that imports Horovod or mpi4py.

Three backends share one small interface. `SingleProcessBackend` needs nothing but TensorFlow, so
`python script.py` works without Horovod installed; `HorovodBackend` wraps Horovod's collectives
on plain tensors (Horovod's Keras and optimizer wrappers do not work with Keras 3 variables);
`MPIBackend` runs the same collectives through mpi4py, a plain wheel, under `mpirun`.

`init()` picks the backend from the environment a launcher leaves behind: `horovodrun` sets
`HOROVOD_RANK`; Open MPI's `mpirun` sets `OMPI_COMM_WORLD_SIZE` (Horovod when it is installed,
else mpi4py); `DISTACCUM_BACKEND` (`single`, `horovod` or `mpi`) overrides the guess.

Its modules: `single`, `horovod` (the only one that imports Horovod), `mpi` (the only one that
imports mpi4py), `pieces` (how what they send is cut up) and `watchdog` (`collective_timeout` and
`WorkerLost`, the same whatever the backend). `init()` imports `horovod` or `mpi` only once it has
chosen that backend, so importing the package imports neither library. The package itself holds
the choice and this process's backend, and re-exports what the rest of distaccum reads as `comm.X`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from typing import Protocol, Sequence

import numpy as np
import tensorflow as tf

from distaccum import devices
from distaccum.comm import pieces
from distaccum.comm.single import SingleProcessBackend
from distaccum.comm.watchdog import (DEFAULT_COLLECTIVE_TIMEOUT, EXIT_COLLECTIVE_TIMEOUT,
                                     WorkerLost, WorkersChanged, guarded, set_collective_timeout)

__all__ = [
    "BACKENDS", "DEFAULT_COLLECTIVE_TIMEOUT", "EXIT_COLLECTIVE_TIMEOUT", "Backend",
    "HostMemoryWarning", "SingleProcessBackend", "WorkerLost", "WorkersChanged",
    "announced_change", "barrier", "broadcast_in_place", "choose_backend_name", "collective",
    "current", "elastic", "elastic_launch", "gather_device_codes", "init", "is_chief",
    "launched_by_launcher", "local_rank", "num_workers", "rank", "rejoin",
    "set_collective_timeout", "shutdown", "sum_in_place", "warn_if_gpus_sum_through_host",
]

_LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMIX_RANK")
_BACKEND_VARIABLE = "DISTACCUM_BACKEND"
_ELASTIC_VARIABLE = "HOROVOD_ELASTIC"  # set by `horovodrun --min-np/--max-np/--host-discovery-script`
BACKENDS = ("single", "horovod", "mpi")


class HostMemoryWarning(UserWarning):
    """Ranks train on GPUs while their sums go through host memory: the mpi4py backend."""


def warn_if_gpus_sum_through_host(backend: "Backend") -> None:
    """Say it, on the chief, when this job's ranks train on GPUs with the mpi4py backend: its
    collectives copy every sum from the GPU and back (`tf.numpy_function`) and reduce over TCP,
    where Horovod built with NCCL reduces on the GPUs."""
    if backend.name == "mpi" and backend.rank() == 0 and tf.config.list_logical_devices("GPU"):
        warnings.warn(HostMemoryWarning(
            "the mpi4py backend sums gradients through host memory (a copy from each GPU and "
            "back per update, no NCCL); on GPUs use Horovod with NCCL: launch/setup.sh --gpu "
            "--horovod, then DISTACCUM_BACKEND=horovod"), stacklevel=3)


class Backend(Protocol):
    """What the trainer needs from the workers' communication layer."""

    name: str
    summable_dtypes: tuple[str, ...]  # the dtypes `sum_all` can sum
    elastic: bool  # workers may come and go while the job trains (`horovodrun` elastic)

    def num_workers(self) -> int: ...

    def rank(self) -> int: ...

    def local_rank(self) -> int: ...

    def sum_all(self, tensors: Sequence[tf.Tensor], name: str) -> list[tf.Tensor]:
        """Element-wise sums over workers, as one grouped collective.

        `name` says what the sum is for (`update`, `validation`, ...): every worker gives the
        same at the same point, whichever compiled step the sum is in (a window's update step
        comes in forms that differ between workers), since Horovod matches collectives by name.
        """

    def max_all(self, value: tf.Tensor) -> tf.Tensor:
        """Element-wise maximum over workers."""

    def gather_all(self, tensors: Sequence[tf.Tensor], name: str) -> list[list[tf.Tensor]]:
        """Every worker's `tensors`, as one grouped collective: per tensor, one piece per
        worker in rank order. A tensor's first axis may differ between workers; its other axes
        and its dtype (one for all `tensors`) may not. `name` as for `sum_all`."""

    def reduce_scatter(self, segments: Sequence[tf.Tensor], name: str) -> tf.Tensor:
        """The sum over workers of `segments[rank]`, as one collective: `segments[r]` is this
        worker's float32 part (1-D) of rank r's result, its size the same on every worker (each
        rank may get a different size). `name` as for `sum_all`."""

    def broadcast(self, tensors: Sequence[tf.Tensor], root: int = 0) -> list[tf.Tensor]:
        """Rank `root`'s values of `tensors` on every worker, as one collective (the caller
        bounds its size: `broadcast_in_place`)."""

    def shutdown(self) -> None:
        """End this worker's part in the collectives (a process about to exit)."""


_backend: Backend | None = None
_device_code = devices.CPU  # this worker's device, set by init()


def launched_by_launcher(environ: dict[str, str] | None = None) -> bool:
    """Whether `horovodrun` or `mpirun` started this process (from the variables they set)."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in _LAUNCHER_VARIABLES)


def elastic_launch(environ: dict[str, str] | None = None) -> bool:
    """Whether `horovodrun` runs this job elastic (`--min-np`, `--max-np`,
    `--host-discovery-script`): workers may then come and go while it trains."""
    return (os.environ if environ is None else environ).get(_ELASTIC_VARIABLE) == "1"


def choose_backend_name(environ: dict[str, str] | None = None,
                        horovod_installed: bool | None = None) -> str:
    """`horovod` under horovodrun; under mpirun `horovod` if it is installed, else `mpi`;
    `single` without a launcher. `DISTACCUM_BACKEND` overrides, but for an elastic
    `horovodrun`, whose workers come and go through Horovod alone."""
    environ = os.environ if environ is None else environ
    requested = environ.get(_BACKEND_VARIABLE, "")
    if requested:
        if requested not in BACKENDS:
            raise ValueError(
                f"{_BACKEND_VARIABLE} must be one of {', '.join(BACKENDS)}. Received: {requested!r}"
            )
        if requested != "horovod" and elastic_launch(environ):
            raise ValueError(
                f"horovodrun runs this job elastic, whose workers join and leave through "
                f"Horovod's collectives: unset {_BACKEND_VARIABLE} (or set it to horovod). "
                f"Received: {_BACKEND_VARIABLE}={requested}")
        return requested
    if not launched_by_launcher(environ):
        return "single"
    if "HOROVOD_RANK" in environ:
        return "horovod"
    if horovod_installed is None:
        horovod_installed = _importable("horovod.tensorflow")
    return "horovod" if horovod_installed else "mpi"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package that is there but fails to import
        return False


def init() -> Backend:
    """Start the communication backend (once per process) and pin this worker's GPU.

    Returns:
        The backend; later calls return the same one.
    """
    global _backend, _device_code
    if _backend is None:
        name = choose_backend_name()
        if name == "single":
            backend: Backend = SingleProcessBackend()
        else:
            try:
                backend = _start(name)
            except ImportError as error:
                raise RuntimeError(
                    f"the {name} backend was chosen but cannot be imported ({error}); run "
                    "launch/setup.sh (or set DISTACCUM_BACKEND)"
                ) from error
        _device_code = devices.device_code(devices.configure_gpus(backend.local_rank()),
                                           tf.test.is_built_with_cuda())
        _backend = backend
    return _backend


def _start(name: str) -> Backend:
    """The `horovod` or `mpi` backend, its module imported only now: importing the package must
    not import Horovod or mpi4py."""
    if name == "horovod":
        from distaccum.comm.horovod import HorovodBackend

        return HorovodBackend()
    from distaccum.comm.mpi import MPIBackend

    return MPIBackend()


def current() -> Backend:
    """The backend started by `init()`, starting it if nobody has."""
    return init()


def rank() -> int:
    return current().rank()


def local_rank() -> int:
    return current().local_rank()


def num_workers() -> int:
    return current().num_workers()


def is_chief() -> bool:
    return current().rank() == 0


def collective(what: str) -> contextlib.AbstractContextManager[None]:
    """Run the collective(s) of `what` under the watchdog (`collective_timeout`), and turn a
    failed Horovod or MPI collective into one clear `WorkerLost`; in an elastic job, into
    `WorkersChanged`, which the survivors answer by `rejoin`ing."""
    backend = current()
    return guarded(what, backend.num_workers(), backend.rank, backend.elastic)


def elastic() -> bool:
    """Whether workers may come and go while this job trains (`horovodrun` elastic)."""
    return current().elastic


def announced_change() -> bool:
    """Whether the launcher told this worker that workers will join or leave (rank 0 only
    hears it; the update step's votes tell the others)."""
    backend = current()
    return backend.elastic and backend.announced_change()


def rejoin() -> None:
    """Leave the workers' group and join the next one (an elastic job, after `WorkersChanged`
    or an announced change): on return, `rank()` and `num_workers()` are the new group's."""
    current().restart()


def barrier(what: str) -> None:
    """Return once every worker has called it: one tiny sum, under the watchdog."""
    backend = current()
    if backend.num_workers() > 1:
        with collective(what):
            backend.sum_all([tf.zeros([1])], "barrier")


def shutdown() -> None:
    """End the backend started by `init()` (Horovod's shutdown, `MPI_Finalize`), for a process
    that exits without Python's own teardown; nothing here communicates after it."""
    global _backend
    if _backend is not None:
        _backend.shutdown()
        _backend = None


def sum_in_place(backend: Backend, variables: Sequence[tf.Variable], others: Sequence[tf.Tensor],
                 name: str, dtype: tf.DType) -> list[tf.Tensor]:
    """Sum `variables` over workers into themselves, sent as `dtype`, and return `others` summed
    (small tensors: they travel with the first group). In a graph.

    The variables go in `pieces.bounded_groups`, one collective each, each group once the one
    before is written back: the reduction then never holds more than one group beside the
    variables (one collective of everything held a full copy of them, or two).
    """
    written: list = []
    reduced_others: list[tf.Tensor] = []
    for index, group in enumerate(pieces.bounded_groups(variables)):
        with tf.control_dependencies(written):
            extra = list(others) if index == 0 else []
            sums = backend.sum_all([tf.cast(p.read(), dtype) for p in group] + extra,
                                   f"{name}{index}")
            written = [p.write(tf.cast(s, p.variable.dtype)) for p, s in zip(group, sums)]
        if index == 0:
            reduced_others = sums[len(group):]
    with tf.control_dependencies(written):
        return [tf.identity(t) for t in reduced_others]


def broadcast_in_place(backend: Backend, variables: Sequence, root: int = 0) -> None:
    """Overwrite `variables` with rank `root`'s values, eagerly: in `pieces.bounded_groups`,
    each group assigned before the next travels."""
    for group in pieces.bounded_groups(variables):
        values = backend.broadcast([piece.read() for piece in group], root)
        for piece, value in zip(group, values):
            piece.write(value)


def gather_device_codes() -> list[int]:
    """Every rank's `devices.device_code`, on every rank: one small sum over workers (each rank
    fills its own slot, offset by one so that no slot's sum is ambiguous)."""
    backend = current()
    slots = np.zeros(backend.num_workers(), np.float32)
    slots[backend.rank()] = _device_code - devices.NO_GPU_FOUND + 1
    with collective("the start-up device report"):
        [total] = backend.sum_all([tf.constant(slots)], "device_codes")
    return [int(v) + devices.NO_GPU_FOUND - 1 for v in np.asarray(total)]
