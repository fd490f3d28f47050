"""Elastic in place: workers come and go while the job trains, on the same trajectory.

Under `horovodrun --gloo --min-np A --max-np B --host-discovery-script S` Horovod adds and
removes worker processes; it does not keep what distaccum's update means. That is kept here and in
the `Controller`:

- **A commit is the update itself.** An update is applied only once its collectives have
  completed, so a worker lost mid-collective leaves the survivors at the last update they all
  applied: nothing is copied to commit (no second W in memory). The window in progress is dropped
  (its sums and its metrics' window states) and trained again.
- **A change is a regroup at an update's boundary.** Rank 0 hears from the launcher that workers
  will join or leave; its vote travels in the update's own allreduce (no collective of its own),
  so every worker regroups after the same update. A failed collective (`comm.WorkersChanged`)
  regroups the survivors at once.
- **Regrouping** (`Controller`): every worker rejoins (`comm.rejoin`), rebuilds what holds the
  worker count (k from `global_batch_size`, the compiled steps, the data sources; the job also
  runs its start-up collectives again, as a joining process does), then `synchronize`s: the
  worker whose state is the furthest along (a survivor, or the chief with its checkpoint) sends
  it to the others with the loop's counters, and training goes on from that update by
  arithmetic. The order depends only on (seed, epoch, global batch), so each update trains on the
  same samples whatever the worker count.

Owns what a worker's claim to hold the state is, the counters that travel with it, and the
refusals of what cannot be elastic. Not the loop (`Controller`), nor Horovod (`comm`).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import numpy as np
import tensorflow as tf

from distaccum import comm
from distaccum.history import Position


@dataclass(frozen=True)
class Progress:
    """Where the loop stands and what it has counted: what a worker that joins (or that fell
    one update behind) takes from the one whose state it takes.

    Attributes:
        position: the last update applied.
        epoch_loss_sum, epoch_samples: the epoch's loss, weighted by samples, and its samples.
        update_steps, samples, skipped_updates: the run's counters (`History`'s).
        consecutive_skips: non-finite updates in a row up to this one.
    """

    position: Position = Position()
    epoch_loss_sum: float = 0.0
    epoch_samples: float = 0.0
    update_steps: int = 0
    samples: int = 0
    skipped_updates: int = 0
    consecutive_skips: int = 0

    def encoded(self) -> tf.Tensor:
        return tf.constant([*astuple(self.position), *astuple(self)[1:]], tf.float64)

    @classmethod
    def decoded(cls, values) -> "Progress":
        values = [float(v) for v in np.asarray(values)]
        return cls(Position(*(int(v) for v in values[:3])), values[3], values[4],
                   *(int(v) for v in values[5:]))


def claim(progress: Progress | None, survivor: bool) -> int:
    """How far along this worker's state is, for `synchronize` (0: it holds none of the run's:
    a process that joined, or a fresh start's other ranks). A survivor wins a tie with the
    chief's checkpoint of the same update."""
    if progress is None:
        return 0
    return 2 * (progress.position.update_step + 1) + survivor


def synchronize(variables, progress: Progress | None, survivor: bool) -> tuple[Progress, int]:
    """Every worker's `variables` and progress from the worker furthest along (the lowest rank
    of those): one small max over workers, then the broadcasts. Returns the progress and that
    rank.

    Args:
        variables: what every worker holds alike (model, optimizer, running metrics).
        progress: this worker's, or None when it holds none of the run's.
        survivor: this worker trained in the group before this one.
    """
    backend = comm.current()
    claims = np.zeros(backend.num_workers(), np.int64)
    claims[backend.rank()] = claim(progress, survivor)
    with comm.collective("choosing the worker whose state the others take"):
        claims = backend.max_all(tf.constant(claims)).numpy()
    root = int(np.argmax(claims))
    with comm.collective(f"the state's broadcast from rank {root}"):
        [encoded] = backend.broadcast([(progress or Progress()).encoded()], root)
        comm.broadcast_in_place(backend, variables, root)
    return Progress.decoded(encoded), root


def refuse_unless_exact(global_batch_size: int | None, data_source) -> None:
    """What an elastic job cannot keep, refused in one line: a batch given as k (the global batch
    would change with the workers), and the user's own dataset of this worker's micro-batches
    (its share would not change with them)."""
    if global_batch_size is None:
        raise ValueError(
            "an elastic job keeps the global batch while workers come and go: give "
            "global_batch_size (k then follows the worker count), not accumulation_steps. "
            "Received: global_batch_size=None")
    if not hasattr(data_source, "num_samples"):
        raise ValueError(
            "an elastic job needs data that every worker count reads in one order: "
            "distaccum.micro_batches(...) or a config's dataset, not this worker's own "
            f"tf.data.Dataset. Received: {type(data_source).__name__}")
