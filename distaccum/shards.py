"""Sharded optimizer state (`shard_optimizer_state`): each worker keeps the optimizer's state for
its share of the trainable variables only, as PyTorch's `ZeroRedundancyOptimizer` and DeepSpeed's
ZeRO stage 1 do, instead of all of it on every worker (Adam's is 2 W).

An update step then, in place of the allreduce of the window's sums:
1. reduce-scatters them (`ShardedState.sum_in_place`): each worker gets the sums of the variables
   it owns, written back into those sums' own memory, in bounded rounds. The statistics, the
   metrics' states and the votes ride in every rank's segment of the round of fewest bytes, so
   every worker gets their sums as with the allreduce;
2. each worker divides, clips and applies its own share; the global norm (for clipping, the log
   and the finite check) comes from the shards' partial sums of squares: one scalar collective;
3. allgathers the new weights (`share_weights`), in the same rounds.

A ring allreduce is a reduce-scatter followed by an allgather, so an update sends the bytes of
the allreduce (under Horovod the reduce-scatter is an alltoall, which sends the same).

Ownership is by whole variables, so every Keras optimizer stays exact, those that are not
element-wise too (Adafactor factors a matrix, LAMB scales by a variable's norm): the largest
variable goes first, to the least-loaded worker. A variable larger than W / N (an `Embedding`
holding most of the weights) sets the largest share by itself: its owner holds its state alone.
"""

from __future__ import annotations

import collections
import math
from typing import Sequence

import tensorflow as tf

from distaccum.comm import pieces
from distaccum.comm.pieces import GROUP_BYTES, Piece, as_bytes, from_bytes


def owners(sizes: Sequence[int], num_workers: int) -> list[int]:
    """Each variable's owner: the largest first, each to the worker holding the fewest bytes so
    far (then the fewest variables, then the lowest rank). Depends only on the sizes and the
    worker count, so every worker computes the same."""
    load = [0] * num_workers
    count = [0] * num_workers
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(num_workers), key=lambda r: (load[r], count[r], r))
        owner[i] = rank
        load[rank] += sizes[i]
        count[rank] += 1
    return owner


def rounds(sizes: Sequence[int], owner: Sequence[int], num_workers: int,
           limit: int = GROUP_BYTES) -> list[list[list[int]]]:
    """The collectives of a reduce-scatter or an allgather: per round, per rank, the indices (into
    `sizes`, in order) of the variables whose sums or weights that rank's segment holds. The
    ranks take their next variables in turn while the round holds at most `limit` bytes (one
    larger variable goes alone): what a round copies stays that small, as the allreduce's
    groups do."""
    queues = [collections.deque(i for i in range(len(sizes)) if owner[i] == rank)
              for rank in range(num_workers)]
    plan = []
    while any(queues):
        members: list[list[int]] = [[] for _ in range(num_workers)]
        total, taking = 0, True
        while taking:
            taking = False
            for part, queue in zip(members, queues):
                if queue and (total == 0 or total + sizes[queue[0]] <= limit):
                    total += sizes[queue[0]]
                    part.append(queue.popleft())
                    taking = True
        plan.append(members)
    return plan


def _nbytes(variable) -> int:
    return Piece(variable).nbytes


def _flat(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """`tensors` as one float32 vector; one tensor is only reshaped (no copy of a large one)."""
    flat = [tf.reshape(t, [-1]) for t in tensors]
    return flat[0] if len(flat) == 1 else tf.concat([tf.zeros([0])] + flat, axis=0)


class ShardedState:
    """Owns which worker holds which trainable variable's optimizer state, and the collectives
    that take a window's sums to their owners and the owners' new weights to every worker.

    Does not own the optimizer (the `Trainer` builds it on `owned_variables`) nor the update's
    arithmetic (`steps`).

    Args:
        backend: the communication backend, with more than one worker.
        variables: the model's trainable variables, in order.
    """

    def __init__(self, backend, variables: Sequence) -> None:
        self.backend = backend
        self.variables = list(variables)
        workers = backend.num_workers()
        if len(self.variables) < workers:
            raise ValueError(
                f"shard_optimizer_state gives each worker whole variables: the model has "
                f"{len(self.variables)} trainable variables for {workers} workers. Received: "
                "shard_optimizer_state=True")
        self.owners = owners([_nbytes(v) for v in self.variables], workers)
        self.owned = [i for i, owner in enumerate(self.owners) if owner == backend.rank()]
        self._sum_owners: dict[int, int] = {}

    @property
    def owned_variables(self) -> list:
        return [self.variables[i] for i in self.owned]

    def owned_bytes(self) -> list[int]:
        """Per rank, the bytes of the variables it owns."""
        totals = [0] * self.backend.num_workers()
        for variable, owner in zip(self.variables, self.owners):
            totals[owner] += _nbytes(variable)
        return totals

    def add_sums(self, sums: Sequence) -> None:
        """The accumulator's gradient sums, every normaliser's in turn: each is owned by its
        variable's owner."""
        for index, total in enumerate(sums):
            self._sum_owners[id(total)] = self.owners[index % len(self.variables)]

    def sum_in_place(self, sums: Sequence[tf.Variable], others: Sequence[tf.Tensor],
                     name: str) -> list[tf.Tensor]:
        """`comm.sum_in_place` for owners: each of `sums` is summed over workers into its
        owner's copy only (the others' copies are left as they were, to be overwritten by the
        next window), one reduce-scatter per round; `others` summed on every worker. In a graph.
        """
        travelling = pieces.travelling(sums)
        sizes = [math.prod(piece.shape) for piece in travelling]
        extra = _flat([tf.cast(t, tf.float32) for t in others])
        plan = rounds([piece.nbytes for piece in travelling],
                      [self._sum_owners[id(piece.variable)] for piece in travelling],
                      self.backend.num_workers())
        plan = plan or [[[]] * self.backend.num_workers()]
        # The riders go with the round of fewest bytes: a round of one large variable would
        # otherwise be concatenated with them, a copy of that variable on every rank.
        riding = min(range(len(plan)),
                     key=lambda r: sum(sizes[i] for part in plan[r] for i in part))
        written: list = []
        reduced_extra = extra
        for index, members in enumerate(plan):
            riders = [extra] if index == riding else []
            with tf.control_dependencies(written):
                segments = [_flat([travelling[i].read() for i in part] + riders)
                            for part in members]
                mine = self.backend.reduce_scatter(segments, f"{name}{index}")
                own = members[self.backend.rank()]
                counts = [sizes[i] for i in own] + [extra.shape.num_elements()] * len(riders)
                values = tf.split(mine, counts) if counts else []
                # The collective too: the next round waits for it where this rank owns none
                # of this one's sums.
                written.append(mine)
                written += [travelling[i].write(tf.reshape(v, travelling[i].shape))
                            for i, v in zip(own, values)]
            if riders:
                reduced_extra = values[-1]
        with tf.control_dependencies(written):
            parts = tf.split(reduced_extra, [t.shape.num_elements() for t in others])
            return [tf.cast(tf.reshape(p, t.shape), t.dtype) for p, t in zip(parts, others)]

    def global_norm(self, gradients: Sequence[tf.Tensor]) -> tf.Tensor:
        """The norm of the whole gradient, from this worker's share of it (`gradients`, those
        of its variables): the shards' sums of squares, summed over workers."""
        # l2_loss is half the sum of squares, in one kernel: no squared copy of a gradient.
        partial = tf.add_n([tf.zeros([])] + [2.0 * tf.nn.l2_loss(tf.cast(g, tf.float32))
                                            for g in gradients])
        [total] = self.backend.sum_all([tf.reshape(partial, [1])], "norm")
        return tf.sqrt(total[0])

    def share_weights(self, name: str = "weights") -> list:
        """Every owner's values of its variables on every worker: one allgather per round, each
        written before the next travels. Returns the writes (in a graph, to wait for).

        Each variable travels as a tensor of its own (its owner's bytes, nothing from the
        others): one buffer per round, cut into variables, peaked 1.3 W higher on Figure 4's
        Dense stack."""
        rank = self.backend.rank()
        owner_of = {id(v): owner for v, owner in zip(self.variables, self.owners)}
        travelling = pieces.travelling(self.variables)
        owner = [owner_of[id(piece.variable)] for piece in travelling]
        written: list = []
        for index, members in enumerate(rounds([piece.nbytes for piece in travelling], owner,
                                               self.backend.num_workers())):
            sent = [i for part in members for i in part]
            with tf.control_dependencies(written):
                mine = [as_bytes(travelling[i].read()) if owner[i] == rank
                        else tf.zeros([0], tf.uint8) for i in sent]
                gathered = self.backend.gather_all(mine, f"{name}{index}")
                # The collective too: the next round waits for it where all it brings is this
                # rank's own (in a graph; eagerly it has run, and holding it would keep every
                # round's buffer).
                if not tf.executing_eagerly():
                    written.append(gathered[0][0])
                written += [travelling[i].write(from_bytes(parts[owner[i]], travelling[i]))
                            for i, parts in zip(sent, gathered) if owner[i] != rank]
        return written
