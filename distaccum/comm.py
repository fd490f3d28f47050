"""The communication backend: the only module that imports Horovod or mpi4py.

Three backends share one small interface. `SingleProcessBackend` needs nothing but TensorFlow, so
`python script.py` works without Horovod installed; `HorovodBackend` wraps Horovod's collectives
on plain tensors (Horovod's Keras and optimizer wrappers do not work with Keras 3 variables);
`MPIBackend` runs the same collectives through mpi4py, a plain wheel, under `mpirun`.

`init()` picks the backend from the environment a launcher leaves behind: `horovodrun` sets
`HOROVOD_RANK`; Open MPI's `mpirun` sets `OMPI_COMM_WORLD_SIZE` (Horovod when it is installed,
else mpi4py); `DISTACCUM_BACKEND` (`single`, `horovod` or `mpi`) overrides the guess.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
from typing import Iterator, Protocol, Sequence

import numpy as np
import tensorflow as tf

from distaccum import devices

_LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMIX_RANK")
_BACKEND_VARIABLE = "DISTACCUM_BACKEND"
BACKENDS = ("single", "horovod", "mpi")


class WorkerLost(RuntimeError):
    """A collective failed: another worker is gone (its process died, was killed, or its network
    failed). Raised on the surviving workers so they stop instead of waiting forever."""


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed Horovod or MPI collective inside `what` into one clear `WorkerLost`."""
    try:
        yield
    except tf.errors.OpError as error:
        if not any(name in str(error).lower() for name in ("horovod", "mpi")):
            raise
        raise WorkerLost(
            f"rank {rank()} lost contact with another worker during {what} (a worker process "
            "died, was killed, or its network failed); stopping"
        ) from None


class Backend(Protocol):
    """What the trainer needs from the workers' communication layer."""

    name: str

    def num_workers(self) -> int: ...

    def rank(self) -> int: ...

    def local_rank(self) -> int: ...

    def sum_all(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Element-wise sums over workers, as one grouped collective."""

    def max_all(self, value: tf.Tensor) -> tf.Tensor:
        """Element-wise maximum over workers."""

    def broadcast_from_chief(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Rank 0's values of `tensors` on every worker."""


class SingleProcessBackend:
    """One worker: every collective is the identity, and nothing imports Horovod."""

    name = "single"

    def num_workers(self) -> int:
        return 1

    def rank(self) -> int:
        return 0

    def local_rank(self) -> int:
        return 0

    def sum_all(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        return list(tensors)

    def max_all(self, value: tf.Tensor) -> tf.Tensor:
        return value

    def broadcast_from_chief(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        return list(tensors)


class HorovodBackend:
    """Horovod collectives (Gloo or MPI controller) on plain `tf.Tensor`s.

    Works inside `tf.function`. Tensor names are fixed so Horovod's timeline shows one row per
    tensor and every worker's graph negotiates the same names.
    """

    name = "horovod"

    def __init__(self) -> None:
        import horovod.tensorflow as hvd  # imported here only: single-process mode must not need it

        hvd.init()
        self._hvd = hvd

    def num_workers(self) -> int:
        return self._hvd.size()

    def rank(self) -> int:
        return self._hvd.rank()

    def local_rank(self) -> int:
        return self._hvd.local_rank()

    def sum_all(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        return list(self._hvd.grouped_allreduce(list(tensors), op=self._hvd.Sum))

    def max_all(self, value: tf.Tensor) -> tf.Tensor:
        return self._hvd.allreduce(value, op=self._hvd.Max, name="distaccum.max")

    def broadcast_from_chief(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        # One broadcast per dtype of all values flattened together: start-up pays one collective,
        # not one per variable.
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        result: list[tf.Tensor | None] = [None] * len(tensors)
        for dtype in sorted({t.dtype for t in tensors}, key=lambda d: d.name):
            indices = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            flat = tf.concat([tf.reshape(tensors[i], [-1]) for i in indices], axis=0)
            flat = self._hvd.broadcast(flat, root_rank=0, name=f"distaccum.broadcast.{dtype.name}")
            sizes = [int(tf.size(tensors[i])) for i in indices]
            for i, piece in zip(indices, tf.split(flat, sizes)):
                result[i] = tf.reshape(piece, tensors[i].shape)
        return result


class MPIBackend:
    """mpi4py collectives on `MPI.COMM_WORLD`, for jobs started by `mpirun` without Horovod.

    Inside `tf.function` each collective is one `tf.numpy_function` around one MPI call: a grouped
    sum concatenates every tensor into one float32 buffer, so an update step is one
    `Allreduce`, as with Horovod's grouped allreduce. `collective_counts` counts the calls made
    by this process, by kind (Horovod's timeline plays that part for `HorovodBackend`).
    """

    name = "mpi"

    def __init__(self) -> None:
        from mpi4py import MPI  # imported here only: the other backends must not need it

        self._mpi = MPI
        self._world = MPI.COMM_WORLD
        self._node = self._world.Split_type(MPI.COMM_TYPE_SHARED)
        self.collective_counts: collections.Counter = collections.Counter()

    def num_workers(self) -> int:
        return self._world.Get_size()

    def rank(self) -> int:
        return self._world.Get_rank()

    def local_rank(self) -> int:
        return self._node.Get_rank()

    def _allreduce(self, buffer: np.ndarray, operation) -> np.ndarray:
        result = np.empty_like(buffer)
        self._world.Allreduce(buffer, result, op=operation)
        self.collective_counts["allreduce"] += 1
        return result

    def _reduce(self, tensors: Sequence[tf.Tensor], operation, dtype) -> list[tf.Tensor]:
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        flat = tf.concat([tf.reshape(tf.cast(t, dtype), [-1]) for t in tensors], axis=0)
        reduced = tf.numpy_function(lambda b: self._allreduce(b, operation), [flat], dtype,
                                    stateful=True)
        reduced.set_shape(flat.shape)
        pieces = tf.split(reduced, [t.shape.num_elements() for t in tensors])
        return [tf.reshape(tf.cast(p, t.dtype), t.shape) for p, t in zip(pieces, tensors)]

    def sum_all(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        # Everything summed is float32 (sums, statistics, metric states, votes): one buffer.
        return self._reduce(tensors, self._mpi.SUM, tf.float32)

    def max_all(self, value: tf.Tensor) -> tf.Tensor:
        [result] = self._reduce([value], self._mpi.MAX, tf.convert_to_tensor(value).dtype)
        return result

    def broadcast_from_chief(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        # Eager (start-up only): every value of every dtype in one pickled broadcast.
        values = self._world.bcast([np.asarray(t) for t in tensors], root=0)
        self.collective_counts["broadcast"] += 1
        return [tf.convert_to_tensor(v) for v in values]


_backend: Backend | None = None


def launched_by_launcher(environ: dict[str, str] | None = None) -> bool:
    """Whether `horovodrun` or `mpirun` started this process (from the variables they set)."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in _LAUNCHER_VARIABLES)


def choose_backend_name(environ: dict[str, str] | None = None,
                        horovod_installed: bool | None = None) -> str:
    """`horovod` under horovodrun; under mpirun `horovod` if it is installed, else `mpi`;
    `single` without a launcher. `DISTACCUM_BACKEND` overrides."""
    environ = os.environ if environ is None else environ
    requested = environ.get(_BACKEND_VARIABLE, "")
    if requested:
        if requested not in BACKENDS:
            raise ValueError(
                f"{_BACKEND_VARIABLE} must be one of {', '.join(BACKENDS)}. Received: {requested!r}"
            )
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
    global _backend
    if _backend is None:
        name = choose_backend_name()
        if name == "single":
            backend: Backend = SingleProcessBackend()
        else:
            try:
                backend = HorovodBackend() if name == "horovod" else MPIBackend()
            except ImportError as error:
                raise RuntimeError(
                    f"the {name} backend was chosen but cannot be imported ({error}); run "
                    "launch/setup.sh (or set DISTACCUM_BACKEND)"
                ) from error
        devices.configure_gpus(backend.local_rank())
        _backend = backend
    return _backend


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
