"""The communication backend: the only module that imports Horovod.

Two backends share one small interface. `SingleProcessBackend` needs nothing but TensorFlow, so
`python script.py` works without Horovod installed; `HorovodBackend` wraps Horovod's collectives
on plain tensors (Horovod's Keras and optimizer wrappers do not work with Keras 3 variables).

`init()` picks the backend from the environment a launcher leaves behind: `horovodrun` sets
`HOROVOD_RANK`, Open MPI's `mpirun` sets `OMPI_COMM_WORLD_SIZE`, and `DISTACCUM_BACKEND`
(`single` or `horovod`) overrides the guess.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Protocol, Sequence

import tensorflow as tf

from distaccum import devices

_LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMIX_RANK")
_BACKEND_VARIABLE = "DISTACCUM_BACKEND"


class WorkerLost(RuntimeError):
    """A collective failed: another worker is gone (its process died, was killed, or its network
    failed). Raised on the surviving workers so they stop instead of waiting forever."""


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed Horovod collective inside `what` into one clear `WorkerLost`."""
    try:
        yield
    except tf.errors.OpError as error:
        if "horovod" not in str(error).lower():
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


_backend: Backend | None = None


def launched_by_launcher(environ: dict[str, str] | None = None) -> bool:
    """Whether `horovodrun` or `mpirun` started this process (from the variables they set)."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in _LAUNCHER_VARIABLES)


def choose_backend_name(environ: dict[str, str] | None = None) -> str:
    """`horovod` under a launcher, `single` otherwise; `DISTACCUM_BACKEND` overrides."""
    environ = os.environ if environ is None else environ
    requested = environ.get(_BACKEND_VARIABLE, "")
    if requested:
        if requested not in ("single", "horovod"):
            raise ValueError(
                f"{_BACKEND_VARIABLE} must be 'single' or 'horovod'. Received: {requested!r}"
            )
        return requested
    return "horovod" if launched_by_launcher(environ) else "single"


def init() -> Backend:
    """Start the communication backend (once per process) and pin this worker's GPU.

    Returns:
        The backend; later calls return the same one.
    """
    global _backend
    if _backend is None:
        if choose_backend_name() == "horovod":
            try:
                backend: Backend = HorovodBackend()
            except ImportError as error:
                raise RuntimeError(
                    "this process was started by horovodrun/mpirun but Horovod cannot be "
                    f"imported ({error}); run launch/setup.sh"
                ) from error
        else:
            backend = SingleProcessBackend()
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
