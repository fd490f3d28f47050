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
import hashlib
import importlib.util
import os
import sys
import threading
import time
import warnings
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


# Seconds a collective may take before this worker gives up on it (`set_collective_timeout`).
DEFAULT_COLLECTIVE_TIMEOUT = 300.0
EXIT_COLLECTIVE_TIMEOUT = 1


class _Watchdog:
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
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, what: str) -> Iterator[None]:
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="distaccum-watchdog",
                                                daemon=True)
                self._thread.start()
            self._deadline, self._what = time.monotonic() + self.timeout, what
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
                print(f"distaccum: error: rank {rank()}: {self._what} did not complete within "
                      f"collective_timeout={self.timeout:g} s (another worker, its node or the "
                      "network between them is gone); stopping", file=sys.stderr, flush=True)
                os._exit(EXIT_COLLECTIVE_TIMEOUT)


_watchdog = _Watchdog()


def set_collective_timeout(seconds: float) -> None:
    """How long any collective may take before this worker stops (`collective_timeout`)."""
    if not seconds > 0:
        raise ValueError(f"collective_timeout must be > 0 seconds. Received: "
                         f"collective_timeout={seconds!r}")
    _watchdog.timeout = float(seconds)


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run the collective(s) of `what` under the watchdog (`collective_timeout`), and turn a
    failed Horovod or MPI collective into one clear `WorkerLost`."""
    watched = _watchdog.watching(what) if num_workers() > 1 else contextlib.nullcontext()
    try:
        with watched:
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
    summable_dtypes: tuple[str, ...]  # the dtypes `sum_all` can sum

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

    def broadcast_from_chief(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Rank 0's values of `tensors` on every worker."""

    def shutdown(self) -> None:
        """End this worker's part in the collectives (a process about to exit)."""


class SingleProcessBackend:
    """One worker: every collective is the identity, and nothing imports Horovod."""

    name = "single"
    summable_dtypes = ("float32", "bfloat16", "float16")

    def num_workers(self) -> int:
        return 1

    def rank(self) -> int:
        return 0

    def local_rank(self) -> int:
        return 0

    def sum_all(self, tensors: Sequence[tf.Tensor], name: str) -> list[tf.Tensor]:
        return list(tensors)

    def max_all(self, value: tf.Tensor) -> tf.Tensor:
        return value

    def gather_all(self, tensors: Sequence[tf.Tensor], name: str) -> list[list[tf.Tensor]]:
        return [[t] for t in tensors]

    def broadcast_from_chief(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        return list(tensors)

    def shutdown(self) -> None:
        pass


def _per_dtype(tensors: Sequence, collective) -> list[tf.Tensor]:
    """`collective` (group → results in its order) on each dtype's tensors, in the order the
    dtypes first appear (the same on every worker), with the results put back in `tensors`'
    order: Horovod takes one dtype per collective."""
    tensors = [tf.convert_to_tensor(t) for t in tensors]
    result: list[tf.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        indices = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        for i, value in zip(indices, collective([tensors[i] for i in indices])):
            result[i] = value
    return result


def _signature(tensors: Sequence[tf.Tensor]) -> str:
    """A short name for a group's dtypes and shapes. Horovod caches what it negotiated under a
    collective's name, so one name must always mean one group (a float16 run's float32 group,
    statistics only, differs from a float32 run's)."""
    shapes = ";".join(f"{t.dtype.name}{t.shape}" for t in tensors)
    return f"{tensors[0].dtype.name}_{hashlib.sha1(shapes.encode()).hexdigest()[:10]}"


def _row_counts(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Each tensor's first dimension, int32 `[len(tensors)]`: what a worker's piece of a
    `gather_all` is cut by. With a run-time zero added in a graph (`_never_constant`'s reason:
    a gather whose inputs were all constants could be folded away)."""
    counts = tf.stack([tf.shape(t)[0] for t in tensors])
    if tf.executing_eagerly():
        return counts
    return counts + tf.cast(tf.timestamp() * 0.0, tf.int32)


def _never_constant(group: list[tf.Tensor]) -> list[tf.Tensor]:
    """The group, with a run-time zero added to its smallest tensor when in a graph.

    Horovod's collectives are not marked stateful (horovod#3229), so TensorFlow's constant
    folding runs one whose inputs are all constants (the zeros of a worker's empty window) once,
    while it optimises the graph, and bakes in that result: later calls skip the collective and
    the workers' collectives stop pairing up. A zero made from `tf.timestamp` (stateful, finite)
    keeps it a run-time op, for a few bytes of work.
    """
    if tf.executing_eagerly():
        return group
    smallest = min(range(len(group)), key=lambda i: group[i].shape.num_elements() or 0)
    zero = tf.cast(tf.timestamp() * 0.0, group[smallest].dtype)
    return [t + zero if i == smallest else t for i, t in enumerate(group)]


class HorovodBackend:
    """Horovod collectives (Gloo or MPI controller) on plain `tf.Tensor`s.

    Works inside `tf.function`. Tensor names are fixed so Horovod's timeline shows one row per
    tensor and every worker's graph negotiates the same names.
    """

    name = "horovod"
    # Horovod 0.28.1 has no bfloat16 collectives (its tensor types stop at float16).
    summable_dtypes = ("float32", "float16")

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

    def sum_all(self, tensors: Sequence[tf.Tensor], name: str) -> list[tf.Tensor]:
        # Horovod groups only tensors of one dtype: one grouped allreduce per dtype (one in all
        # unless gradient sums travel narrower than the float32 statistics). Named, not named
        # after the tensors (Horovod's default), which differ between forms of a step.
        def grouped_sum(group: list[tf.Tensor]) -> list[tf.Tensor]:
            group = _never_constant(group)
            return self._hvd.grouped_allreduce(
                group, op=self._hvd.Sum, ignore_name_scope=True,
                name=f"HorovodGroupedAllreduce_distaccum_{name}_{_signature(group)}")

        return _per_dtype(tensors, grouped_sum)

    def max_all(self, value: tf.Tensor) -> tf.Tensor:
        return self._hvd.allreduce(value, op=self._hvd.Max, name="distaccum.max")

    def gather_all(self, tensors: Sequence[tf.Tensor], name: str) -> list[list[tf.Tensor]]:
        # One grouped allgather of the tensors and their row counts, which cut the
        # concatenations into pieces. The counts travel bit for bit in the tensors' dtype:
        # Horovod's groups take one.
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        dtype = tensors[0].dtype
        counts = tf.reshape(tf.bitcast(_row_counts(tensors), dtype), [1, -1])
        gathered = self._hvd.grouped_allgather(
            [counts, *tensors], ignore_name_scope=True,
            name=f"HorovodGroupedAllgather_distaccum_{name}_{_signature(tensors)}")
        all_counts = tf.bitcast(tf.reshape(gathered[0], [self.num_workers(), len(tensors), -1])
                                if dtype.size < 4 else gathered[0], tf.int32)
        all_counts = tf.reshape(all_counts, [self.num_workers(), len(tensors)])
        return [tf.split(whole, all_counts[:, i], num=self.num_workers())
                for i, whole in enumerate(gathered[1:])]

    def broadcast_from_chief(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        # One broadcast per dtype of all values flattened together: start-up pays one collective,
        # not one per variable.
        def broadcast(group: list[tf.Tensor]) -> list[tf.Tensor]:
            flat = tf.concat([tf.reshape(t, [-1]) for t in group], axis=0)
            flat = self._hvd.broadcast(flat, root_rank=0,
                                       name=f"distaccum.broadcast.{group[0].dtype.name}")
            pieces = tf.split(flat, [int(tf.size(t)) for t in group])
            return [tf.reshape(piece, t.shape) for piece, t in zip(pieces, group)]

        return _per_dtype(tensors, broadcast)

    def shutdown(self) -> None:
        self._hvd.shutdown()


class MPIBackend:
    """mpi4py collectives on `MPI.COMM_WORLD`, for jobs started by `mpirun` without Horovod.

    Inside `tf.function` each collective is one `tf.numpy_function` around one MPI call: a grouped
    sum concatenates every tensor into one float32 buffer (or, with 16-bit gradient sums, one
    buffer of both kinds), so an update step is one `Allreduce`, as with Horovod's grouped
    allreduce. `collective_counts` and `collective_bytes` count the calls made by this process
    and the bytes each sent in, by kind (Horovod's timeline plays that part for
    `HorovodBackend`).
    """

    name = "mpi"
    summable_dtypes = ("float32", "bfloat16", "float16")

    def __init__(self) -> None:
        from mpi4py import MPI  # imported here only: the other backends must not need it

        self._mpi = MPI
        self._world = MPI.COMM_WORLD
        # Open MPI says where this rank stands on its node; asking MPI instead (a shared-memory
        # split) is one more collective at start-up, and fails between hosts that share a name.
        local = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK")
        self._local_rank = (int(local) if local is not None
                            else self._world.Split_type(MPI.COMM_TYPE_SHARED).Get_rank())
        self.collective_counts: collections.Counter = collections.Counter()
        self.collective_bytes: collections.Counter = collections.Counter()
        self._packed_operations: dict = {}

    def num_workers(self) -> int:
        return self._world.Get_size()

    def rank(self) -> int:
        return self._world.Get_rank()

    def local_rank(self) -> int:
        return self._local_rank

    def _allreduce(self, buffer: np.ndarray, operation) -> np.ndarray:
        result = np.empty_like(buffer)
        self._world.Allreduce(buffer, result, op=operation)
        self.collective_counts["allreduce"] += 1
        self.collective_bytes["allreduce"] += buffer.nbytes
        return result

    def _reduce(self, tensors: Sequence[tf.Tensor], operation, dtype) -> list[tf.Tensor]:
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        flat = tf.concat([tf.reshape(tf.cast(t, dtype), [-1]) for t in tensors], axis=0)
        reduced = tf.numpy_function(lambda b: self._allreduce(b, operation), [flat], dtype,
                                    stateful=True)
        reduced.set_shape(flat.shape)
        pieces = tf.split(reduced, [t.shape.num_elements() for t in tensors])
        return [tf.reshape(tf.cast(p, t.dtype), t.shape) for p, t in zip(pieces, tensors)]

    def sum_all(self, tensors: Sequence[tf.Tensor], name: str) -> list[tf.Tensor]:
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        narrow = {t.dtype for t in tensors} - {tf.float32}
        if not narrow:  # sums, statistics, metric states, votes: one float32 buffer
            return self._reduce(tensors, self._mpi.SUM, tf.float32)
        if len(narrow) > 1 or not narrow <= {tf.float16, tf.bfloat16}:
            raise ValueError("a grouped sum takes float32 and at most one of float16 or bfloat16. "
                             f"Received: {sorted(d.name for d in narrow)}")
        return self._sum_packed(tensors, narrow.pop())

    def _sum_packed(self, tensors: list[tf.Tensor], narrow: tf.DType) -> list[tf.Tensor]:
        """One `Allreduce` of 16-bit and float32 tensors together: every value's bits in one
        uint16 buffer (narrow values first, padded to an even count, then float32 values as
        pairs), summed by an MPI operation that knows where each part starts."""
        parts = [[i for i, t in enumerate(tensors) if (t.dtype == narrow) == is_narrow]
                 for is_narrow in (True, False)]
        narrow_flat, wide_flat = (
            tf.concat([tf.zeros([0], tensors[part[0]].dtype if part else tf.float32)]
                      + [tf.reshape(tensors[i], [-1]) for i in part], axis=0)
            for part in parts)
        narrow_size = narrow_flat.shape.num_elements()
        padding = narrow_size % 2
        packed = tf.concat([tf.bitcast(narrow_flat, tf.uint16), tf.zeros([padding], tf.uint16),
                            tf.reshape(tf.bitcast(wide_flat, tf.uint16), [-1])], axis=0)
        layout = (narrow.as_numpy_dtype, narrow_size + padding)
        reduced = tf.numpy_function(lambda b: self._allreduce_packed(b, *layout), [packed],
                                    tf.uint16, stateful=True)
        reduced.set_shape(packed.shape)
        narrow_sums = tf.bitcast(reduced[:narrow_size], narrow)
        wide_sums = tf.bitcast(tf.reshape(reduced[narrow_size + padding:], [-1, 2]), tf.float32)
        result: list[tf.Tensor | None] = [None] * len(tensors)
        for part, sums in zip(parts, (narrow_sums, wide_sums)):
            pieces = tf.split(sums, [tensors[i].shape.num_elements() for i in part])
            for i, piece in zip(part, pieces):
                result[i] = tf.reshape(piece, tensors[i].shape)
        return result

    def _allreduce_packed(self, buffer: np.ndarray, narrow_dtype, narrow_size: int) -> np.ndarray:
        key = (buffer.size, np.dtype(narrow_dtype).name, narrow_size)
        if key not in self._packed_operations:
            def add(incoming, accumulated, datatype):
                # Each 16-bit sum is rounded once, as Horovod's float16 sum does.
                a, b = np.frombuffer(incoming, np.uint16), np.frombuffer(accumulated, np.uint16)
                left = b[:narrow_size].view(narrow_dtype)
                right = a[:narrow_size].view(narrow_dtype)
                left[...] = (left.astype(np.float32) + right.astype(np.float32)).astype(narrow_dtype)
                b[narrow_size:].view(np.float32)[...] += a[narrow_size:].view(np.float32)

            # The whole buffer is one element of its own type, so MPI never splits it where the
            # operation could not tell which part a piece belongs to.
            datatype = self._mpi.BYTE.Create_contiguous(buffer.nbytes).Commit()
            self._packed_operations[key] = (datatype, self._mpi.Op.Create(add, commute=True))
        datatype, operation = self._packed_operations[key]
        result = np.empty_like(buffer)
        self._world.Allreduce([buffer, 1, datatype], [result, 1, datatype], op=operation)
        self.collective_counts["allreduce"] += 1
        self.collective_bytes["allreduce"] += buffer.nbytes
        return result

    def max_all(self, value: tf.Tensor) -> tf.Tensor:
        [result] = self._reduce([value], self._mpi.MAX, tf.convert_to_tensor(value).dtype)
        return result

    def gather_all(self, tensors: Sequence[tf.Tensor], name: str) -> list[list[tf.Tensor]]:
        # One `tf.numpy_function` around an `Allgather` of the row counts and one `Allgatherv`
        # of every tensor's bytes together.
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        counts, *gathered = tf.numpy_function(
            self._allgather, [_row_counts(tensors), *tensors],
            [tf.int32] + [t.dtype for t in tensors], stateful=True)
        counts.set_shape([self.num_workers(), len(tensors)])
        for whole, t in zip(gathered, tensors):
            whole.set_shape([None, *t.shape[1:]])
        return [tf.split(whole, counts[:, i], num=self.num_workers())
                for i, whole in enumerate(gathered)]

    def _allgather(self, counts: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(a) for a in arrays]
        all_counts = np.empty((self.num_workers(), len(arrays)), np.int32)
        self._world.Allgather(counts.astype(np.int32), all_counts)
        row_bytes = np.array([a.dtype.itemsize * int(np.prod(a.shape[1:])) for a in arrays],
                             np.int64)
        sizes = all_counts.astype(np.int64) * row_bytes  # [worker, tensor] bytes
        mine = np.concatenate([a.reshape(-1).view(np.uint8) for a in arrays] + [
            np.zeros(0, np.uint8)])
        received = np.empty(int(sizes.sum()), np.uint8)
        totals = sizes.sum(axis=1)
        self._world.Allgatherv(mine, [received, totals, np.cumsum(totals) - totals,
                                      self._mpi.BYTE])
        self.collective_counts["allgather"] += 1
        self.collective_bytes["allgather"] += counts.nbytes + mine.nbytes
        # Each worker's part holds its tensors one after the other: regroup them by tensor.
        starts = np.cumsum(totals) - totals
        pieces = [[] for _ in arrays]
        for worker, start in enumerate(starts):
            for i, size in enumerate(sizes[worker]):
                pieces[i].append(received[start:start + size])
                start += size
        return [all_counts] + [
            np.concatenate(parts).view(a.dtype).reshape(-1, *a.shape[1:])
            for parts, a in zip(pieces, arrays)]

    def broadcast_from_chief(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        # Eager (start-up only): every value of every dtype in one pickled broadcast.
        values = self._world.bcast([np.asarray(t) for t in tensors], root=0)
        self.collective_counts["broadcast"] += 1
        return [tf.convert_to_tensor(v) for v in values]

    def shutdown(self) -> None:
        if not self._mpi.Is_finalized():
            self._mpi.Finalize()


_backend: Backend | None = None
_device_code = devices.CPU  # this worker's device, set by init()


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
    global _backend, _device_code
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
        _device_code = devices.device_code(devices.configure_gpus(backend.local_rank()),
                                           tf.test.is_built_with_cuda())
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


def gather_device_codes() -> list[int]:
    """Every rank's `devices.device_code`, on every rank: one small sum over workers (each rank
    fills its own slot, offset by one so that no slot's sum is ambiguous)."""
    backend = current()
    slots = np.zeros(backend.num_workers(), np.float32)
    slots[backend.rank()] = _device_code - devices.NO_GPU_FOUND + 1
    with collective("the start-up device report"):
        [total] = backend.sum_all([tf.constant(slots)], "device_codes")
    return [int(v) + devices.NO_GPU_FOUND - 1 for v in np.asarray(total)]
