"""The Horovod backend: `horovodrun`, or `mpirun` with Horovod installed.

The one module that imports Horovod, and only when `HorovodBackend` is constructed (the package
imports this module in `init()` alone), so the other backends run where Horovod is absent or
broken. Its helpers are here because they work around Horovod's own rules: one dtype per grouped
collective, negotiations cached by name, and collectives not marked stateful.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import tensorflow as tf

from distaccum.comm import elastic_launch
from distaccum.comm.pieces import GROUP_BYTES, row_counts, run_time_zero

# The fusion buffer distaccum asks Horovod for, unless the job sets `HOROVOD_FUSION_THRESHOLD`.
FUSION_BYTES = GROUP_BYTES // 4


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


def _signature(tensors: Sequence[tf.Tensor], *, first_axis: bool = True) -> str:
    """A short name for a group's dtypes and shapes. Horovod caches what it negotiated under a
    collective's name, so one name must always mean one group (a float16 run's float32 group,
    statistics only, differs from a float32 run's). A gather's first axis may differ between
    workers (`first_axis=False`): it is left out, or their names would differ and never pair."""
    shapes = ";".join(f"{t.dtype.name}{t.shape if first_axis else t.shape[1:]}" for t in tensors)
    return f"{tensors[0].dtype.name}_{hashlib.sha1(shapes.encode()).hexdigest()[:10]}"


def _never_constant(group: list[tf.Tensor]) -> list[tf.Tensor]:
    """The group, with a run-time zero added to its smallest tensor when in a graph.

    Horovod's collectives are not marked stateful (horovod#3229), so TensorFlow's constant
    folding runs one whose inputs are all constants (the zeros of a worker's empty window) once,
    while it optimises the graph, and bakes in that result: later calls skip the collective and
    the workers' collectives stop pairing up. A `run_time_zero` keeps it a run-time op.
    """
    if tf.executing_eagerly():
        return group
    smallest = min(range(len(group)), key=lambda i: group[i].shape.num_elements() or 0)
    zero = run_time_zero(group[smallest].dtype)
    return [t + zero if i == smallest else t for i, t in enumerate(group)]


class _Announcements:
    """Listens to `horovodrun`'s elastic driver, which tells rank 0 when hosts were added or
    removed (Horovod's worker notification service, started once per process)."""

    def __init__(self) -> None:
        self.changed = False

    def listen(self) -> None:
        from horovod.common.elastic import notification_manager

        notification_manager.init()
        notification_manager.register_listener(self)

    def on_hosts_updated(self, timestamp, update_result) -> None:  # Horovod's listener hook
        self.changed = True


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

        # Horovod keeps its fusion buffer (64 MiB by default) for the whole run, a copy of what
        # it fuses. distaccum's collectives come in groups of at most `GROUP_BYTES` already,
        # so a smaller one still fuses their small tensors into one collective: Figure 4's
        # sharded Dense stack peaked 0.14 W lower (2.85 → 2.71 W). A job's own setting wins.
        os.environ.setdefault("HOROVOD_FUSION_THRESHOLD", str(FUSION_BYTES))
        hvd.init()
        self._hvd = hvd
        self._scratch = tf.Variable(0.0, trainable=False)  # what `_kept` writes
        self.elastic = elastic_launch()
        self._announcements = _Announcements()
        if self.elastic:
            self._announcements.listen()

    def _kept(self, result: tf.Tensor) -> tf.Tensor:
        """`result`, with its collective kept in the graph even where nothing reads it.

        Horovod's ops are not stateful, so TensorFlow's graph optimiser turns one whose result is
        only waited for (sharded state's rounds where this rank owns nothing) into a no-op, on
        that rank alone, and the others wait for it forever. An assignment (stateful, so always
        run) of one of its values keeps it."""
        if tf.executing_eagerly():
            return result
        kept = self._scratch.assign(tf.reduce_sum(tf.cast(tf.reshape(result, [-1])[:1],
                                                          tf.float32)))
        with tf.control_dependencies([kept]):
            return tf.identity(result)

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
        counts = tf.reshape(tf.bitcast(row_counts(tensors), dtype), [1, -1])
        gathered = self._hvd.grouped_allgather(
            [counts, *tensors], ignore_name_scope=True,
            name=(f"HorovodGroupedAllgather_distaccum_{name}_"
                  f"{_signature(tensors, first_axis=False)}"))
        gathered[0] = self._kept(gathered[0])
        all_counts = tf.bitcast(tf.reshape(gathered[0], [self.num_workers(), len(tensors), -1])
                                if dtype.size < 4 else gathered[0], tf.int32)
        all_counts = tf.reshape(all_counts, [self.num_workers(), len(tensors)])
        return [tf.split(whole, all_counts[:, i], num=self.num_workers())
                for i, whole in enumerate(gathered[1:])]

    def reduce_scatter(self, segments: Sequence[tf.Tensor], name: str) -> tf.Tensor:
        # An alltoall (each rank's segment straight to that rank), then this rank's sum of
        # what it received. Horovod's own reducescatter splits the first axis equally: every
        # segment padded to the longest, sent in every round (a round of one rank's variable
        # sends N times its bytes), copied again into a buffer of its own, and it kept 0.65 W
        # more on Figure 4's Dense stack, sharded. Gloo's alltoall reads the input and writes
        # the output in place, and sends what a ring's reduce-scatter does: all but its own.
        sizes = [s.shape.num_elements() for s in segments]
        received = self._hvd.alltoall(
            tf.concat(list(segments), axis=0), splits=tf.constant(sizes, tf.int32),
            ignore_name_scope=True,
            name=f"HorovodAlltoall_distaccum_{name}_{_signature(segments)}")[0]
        received = tf.reshape(self._kept(received), [self.num_workers(), sizes[self.rank()]])
        return tf.reduce_sum(received, axis=0)

    def broadcast(self, tensors: Sequence[tf.Tensor], root: int = 0) -> list[tf.Tensor]:
        # One broadcast per dtype of all values flattened together: start-up pays one collective
        # per group, not one per variable. Named by the group's shapes (`sum_all`'s reason).
        def broadcast(group: list[tf.Tensor]) -> list[tf.Tensor]:
            flat = tf.concat([tf.reshape(t, [-1]) for t in group], axis=0)
            flat = self._hvd.broadcast(flat, root_rank=root,
                                       name=f"distaccum.broadcast.{_signature(group)}")
            pieces = tf.split(flat, [int(tf.size(t)) for t in group])
            return [tf.reshape(piece, t.shape) for piece, t in zip(pieces, group)]

        return _per_dtype(tensors, broadcast)

    def announced_change(self) -> bool:
        """Whether `horovodrun`'s elastic driver announced a change of hosts since the last call
        (it tells rank 0 only; `elastic` carries it to the others in the update's votes)."""
        changed, self._announcements.changed = self._announcements.changed, False
        return changed

    def restart(self) -> None:
        """Leave the workers' group and join the next one: `horovodrun`'s elastic driver gives
        this process its rank among the workers that are there now, once every one of them has
        joined. A process whose host left the job ends inside (Horovod's own exit)."""
        self._hvd.shutdown()
        self._hvd.init()

    def shutdown(self) -> None:
        self._hvd.shutdown()
