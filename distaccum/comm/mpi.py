"""The mpi4py backend: `mpirun` without Horovod, from plain wheels (nothing to compile).

The one module that imports mpi4py, and only when `MPIBackend` is constructed (the package
imports this module in `init()` alone), so that the other backends never need it.
"""

from __future__ import annotations

import collections
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from distaccum.comm.pieces import row_counts


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
    elastic = False  # mpirun and one process: the workers are fixed for the job

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

    def _allreduce(self, buffer: np.ndarray, operation, owned: bool) -> np.ndarray:
        # In place when `buffer` is a concatenation made for this call alone (`owned`): its
        # memory then holds the result, where a second buffer would be one more copy of every
        # gradient sum. Otherwise it may be a tensor's own memory (a constant's, say): copied.
        if not (owned and buffer.flags.writeable):
            buffer = buffer.copy()
        self._world.Allreduce(self._mpi.IN_PLACE, buffer, op=operation)
        self.collective_counts["allreduce"] += 1
        self.collective_bytes["allreduce"] += buffer.nbytes
        return buffer

    def _reduce(self, tensors: Sequence[tf.Tensor], operation, dtype) -> list[tf.Tensor]:
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        flat = tf.concat([tf.reshape(tf.cast(t, dtype), [-1]) for t in tensors], axis=0)
        owned = len(tensors) > 1  # a concatenation of one tensor may be that tensor itself
        reduced = tf.numpy_function(lambda b: self._allreduce(b, operation, owned), [flat], dtype,
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

    def reduce_scatter(self, segments: Sequence[tf.Tensor], name: str) -> tf.Tensor:
        # One `Reduce` per rank that owns part of the round, rooted there: each rank's segment
        # goes to its owner, no padding. Open MPI's `Reduce_scatter`, which takes counts too,
        # holds temporaries of the whole round on the rank that receives (+2 W on the owner of
        # Figure 4's table); a `Reduce` pipelines its segment.
        sizes = [s.shape.num_elements() for s in segments]
        mine = sizes[self.rank()]

        def scatter(buffer: np.ndarray) -> np.ndarray:
            result = np.empty(mine, buffer.dtype)
            for owner, (start, size) in enumerate(zip(np.cumsum(sizes) - sizes, sizes)):
                if size:
                    self._world.Reduce(buffer[start:start + size],
                                       result if owner == self.rank() else None,
                                       op=self._mpi.SUM, root=owner)
            self.collective_counts["reducescatter"] += 1
            self.collective_bytes["reducescatter"] += buffer.nbytes
            return result

        # A round of one large variable has one segment that is not empty: it is the buffer.
        filled = [s for s, size in zip(segments, sizes) if size]
        buffer = filled[0] if len(filled) == 1 else tf.concat(list(segments), axis=0)
        result = tf.numpy_function(scatter, [buffer], tf.float32, stateful=True)
        result.set_shape([mine])
        return result

    def max_all(self, value: tf.Tensor) -> tf.Tensor:
        [result] = self._reduce([value], self._mpi.MAX, tf.convert_to_tensor(value).dtype)
        return result

    def gather_all(self, tensors: Sequence[tf.Tensor], name: str) -> list[list[tf.Tensor]]:
        # One `tf.numpy_function` around an `Allgather` of the row counts and one `Allgatherv`
        # of every tensor's bytes together.
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        counts, *gathered = tf.numpy_function(
            self._allgather, [row_counts(tensors), *tensors],
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
        mine = [a.reshape(-1).view(np.uint8) for a in arrays if a.size]
        mine = mine[0] if len(mine) == 1 else np.concatenate(mine + [np.zeros(0, np.uint8)])
        received = np.empty(int(sizes.sum()), np.uint8)
        totals = sizes.sum(axis=1)
        self._world.Allgatherv(mine, [received, totals, np.cumsum(totals) - totals,
                                      self._mpi.BYTE])
        self.collective_counts["allgather"] += 1
        self.collective_bytes["allgather"] += counts.nbytes + mine.nbytes
        # Each worker's part holds its tensors one after the other: regroup them by tensor (a
        # tensor only one worker sent, as sharded weights are, is a view: no copy of it).
        starts = np.cumsum(totals) - totals
        pieces = [[] for _ in arrays]
        for worker, start in enumerate(starts):
            for i, size in enumerate(sizes[worker]):
                pieces[i].append(received[start:start + size])
                start += size
        wholes = [[part for part in parts if part.size] or parts[:1] for parts in pieces]
        return [all_counts] + [
            (parts[0] if len(parts) == 1 else np.concatenate(parts)).view(a.dtype)
            .reshape(-1, *a.shape[1:]) for parts, a in zip(wholes, arrays)]

    def broadcast(self, tensors: Sequence[tf.Tensor], root: int = 0) -> list[tf.Tensor]:
        # Eager (start-up only): every value's bytes in one `Bcast` into one buffer, whose views
        # become the results (every rank knows the shapes and dtypes: the same model's).
        arrays = [np.asarray(t) for t in tensors]
        sizes = [a.nbytes for a in arrays]
        if self.rank() == root:
            buffer = np.concatenate([a.reshape(-1).view(np.uint8) for a in arrays]
                                    + [np.zeros(0, np.uint8)])
        else:
            buffer = np.empty(sum(sizes), np.uint8)
        self._world.Bcast(buffer, root=root)
        self.collective_counts["broadcast"] += 1
        pieces = np.split(buffer, np.cumsum(sizes)[:-1])
        return [tf.convert_to_tensor(piece.view(a.dtype).reshape(a.shape))
                for piece, a in zip(pieces, arrays)]

    def shutdown(self) -> None:
        if not self._mpi.Is_finalized():
            self._mpi.Finalize()
