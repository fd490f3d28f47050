"""The sample order: which samples each worker trains on in each update of an epoch.

A pure function of the data's layout (records per file), `seed`, `epoch` and `global_batch_size`,
in NumPy, with no I/O, so it can be read and tested alone. Samples are numbered 0…n−1 in file
order (arrays: row order). An epoch's order is built in two levels:

1. **Chunks.** Each file is cut into chunks of `CHUNK_RECORDS` consecutive records (a table's
   row group is one chunk); the chunks are permuted, seeded by (seed, epoch). Their
   concatenation is the epoch's *stream*.
2. **Partitions and blocks.** The stream is cut into `partitions` contiguous partitions, and each
   partition into blocks of `shuffle_buffer // partitions` samples; each block is permuted,
   seeded by (seed, epoch, partition, block). A reader holds one block per partition at a time.

Update u of the epoch takes, from every partition p, its next `quota(p)` samples, where the
quotas spread the global batch over the partitions as evenly as integers allow. Worker r of N
owns the contiguous partitions r·P/N … (r+1)·P/N − 1, so it reads only its own stretch of the
stream, and the samples of update u are the same set whatever N, `micro_batch_size` and
`accumulation_steps` are, as long as `global_batch_size` is: the contract this module exists for.
The one constraint it needs: N must divide the number of partitions.

The last update of an epoch takes what remains (fewer samples than a global batch), spread over
the partitions, and so over the workers, as evenly as the global batch is. Every sample is in
exactly one update per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

# Records per chunk: the unit of the first shuffle level and of reading.
CHUNK_RECORDS = 64
# Defaults: every worker count dividing 48 (1, 2, 3, 4, 6, 8, 12, 16, 24, 48) is admitted.
DEFAULT_PARTITIONS = 48
DEFAULT_SHUFFLE_BUFFER = 8192


def even_split(total: int, parts: int) -> np.ndarray:
    """`parts` integers summing to `total`, any two differing by at most one, and any `parts/N`
    consecutive ones summing to `total/N` when N divides both (the floors of i·total/parts)."""
    bounds = (np.arange(parts + 1, dtype=np.int64) * total) // parts
    return np.diff(bounds)


@dataclass(frozen=True)
class Layout:
    """What, besides (seed, epoch, global_batch_size), the order depends on: fixed for a run.

    Attributes:
        file_sizes: records per file, in file order (arrays: one entry, their length).
        partitions: logical partitions; every worker count must divide it.
        shuffle_buffer: samples shuffled at once over all partitions (a worker holds at most
            `shuffle_buffer / num_workers` of them).
        chunk_records: records per chunk, the unit of the first shuffle level and of reading
            (tables: a row group, which is read whole).
    """

    file_sizes: tuple[int, ...]
    partitions: int = DEFAULT_PARTITIONS
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    chunk_records: int = CHUNK_RECORDS

    def __post_init__(self) -> None:
        if not self.file_sizes or min(self.file_sizes) < 0 or sum(self.file_sizes) == 0:
            raise ValueError(f"the data holds no samples. Received: file_sizes={self.file_sizes}")
        for name in ("partitions", "shuffle_buffer", "chunk_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1. Received: {name}={getattr(self, name)}")

    @property
    def num_samples(self) -> int:
        return int(sum(self.file_sizes))

    @property
    def block_size(self) -> int:
        """Samples per shuffle block of one partition."""
        return max(self.shuffle_buffer // self.partitions, 1)

    @cached_property
    def chunks(self) -> tuple[np.ndarray, np.ndarray]:
        """(first sample, record count) of every chunk, chunks never straddling files."""
        firsts, counts = [], []
        file_start = 0
        for size in self.file_sizes:
            offsets = np.arange(0, size, self.chunk_records, dtype=np.int64)
            firsts.append(file_start + offsets)
            counts.append(np.minimum(self.chunk_records, size - offsets))
            file_start += size
        return np.concatenate(firsts), np.concatenate(counts)


def check_num_workers(num_workers: int, partitions: int) -> None:
    """The order's one constraint: the partitions split evenly over the workers."""
    if partitions % num_workers:
        raise ValueError(
            f"num_workers {num_workers} does not divide partitions {partitions} (the data's fixed "
            f"logical partitions, which keep the order the same for any worker count): run on a "
            f"divisor of {partitions}, or set partitions to a multiple of {num_workers} for the "
            f"whole run. Received: num_workers={num_workers}, partitions={partitions}")


class EpochOrder:
    """The order of one epoch for one global batch size: which samples each update trains on.

    Blocks are computed on demand and the last one per partition is kept, so walking an epoch
    costs memory for one block per partition, not for the epoch.
    """

    def __init__(self, layout: Layout, seed: int, epoch: int, global_batch_size: int,
                 quota: np.ndarray | None = None) -> None:
        """`quota`: the samples each partition gives a full update, summing to
        `global_batch_size` (default: as even as integers allow; a mixture's source gives
        `mixture.apportion`'s)."""
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1. Received: {global_batch_size}")
        self.layout = layout
        self._seed = (seed % 2**63, epoch)
        n, partitions = layout.num_samples, layout.partitions
        self.updates = math.ceil(n / global_batch_size)
        tail = n - (self.updates - 1) * global_batch_size
        self._quota = even_split(global_batch_size, partitions) if quota is None else quota
        self._tail_quota = even_split(tail, partitions)
        sizes = (self.updates - 1) * self._quota + self._tail_quota
        self._partition_start = np.concatenate([[0], np.cumsum(sizes)])
        firsts, counts = layout.chunks
        permutation = np.random.default_rng([*self._seed, 0]).permutation(len(firsts))
        self._chunk_first, self._chunk_count = firsts[permutation], counts[permutation]
        self._chunk_start = np.concatenate([[0], np.cumsum(self._chunk_count)])
        self._blocks: dict[int, tuple[int, np.ndarray]] = {}

    def partition_size(self, partition: int) -> int:
        return int(self._partition_start[partition + 1] - self._partition_start[partition])

    def stream(self, start: int, stop: int) -> np.ndarray:
        """Samples at positions [start, stop) of the epoch's stream (the permuted chunks)."""
        positions = np.arange(start, stop, dtype=np.int64)
        chunk = np.searchsorted(self._chunk_start, positions, side="right") - 1
        return self._chunk_first[chunk] + (positions - self._chunk_start[chunk])

    def block(self, partition: int, index: int) -> np.ndarray:
        """Block `index` of `partition`: its samples in training order."""
        kept = self._blocks.get(partition)
        if kept is not None and kept[0] == index:
            return kept[1]
        size = self.layout.block_size
        start = int(self._partition_start[partition]) + index * size
        stop = min(start + size, int(self._partition_start[partition + 1]))
        samples = self.stream(start, stop)
        rng = np.random.default_rng([*self._seed, 1, partition, index])
        samples = samples[rng.permutation(len(samples))]
        self._blocks[partition] = (index, samples)
        return samples

    def partition_update(self, partition: int, update: int) -> np.ndarray:
        """The samples `partition` gives to `update` (0-based), in training order."""
        first = update * int(self._quota[partition])
        count = int((self._tail_quota if update == self.updates - 1 else self._quota)[partition])
        size = self.layout.block_size
        pieces, position = [], first
        while position < first + count:
            index, offset = divmod(position, size)
            take = min(size - offset, first + count - position)
            pieces.append(self.block(partition, index)[offset:offset + take])
            position += take
        return np.concatenate(pieces) if pieces else np.empty(0, np.int64)

    def worker_partitions(self, num_workers: int, rank: int) -> range:
        return self.worker_partitions_of(self.layout.partitions, num_workers, rank)

    @staticmethod
    def worker_partitions_of(partitions: int, num_workers: int, rank: int) -> range:
        """The contiguous partitions worker `rank` of `num_workers` reads."""
        check_num_workers(num_workers, partitions)
        share = partitions // num_workers
        return range(rank * share, (rank + 1) * share)

    def worker_update(self, update: int, num_workers: int, rank: int) -> np.ndarray:
        """The samples worker `rank` of `num_workers` trains in `update` (0-based), in order:
        `global_batch_size / num_workers` of them, fewer in the epoch's last update."""
        return np.concatenate([self.partition_update(p, update)
                               for p in self.worker_partitions(num_workers, rank)])

    def worker_span(self, num_workers: int, rank: int) -> tuple[int, int]:
        """The positions [start, stop) of the stream worker `rank` reads in this epoch."""
        partitions = self.worker_partitions(num_workers, rank)
        return (int(self._partition_start[partitions.start]),
                int(self._partition_start[partitions.stop]))


def contiguous_share(num_samples: int, num_workers: int, rank: int) -> range:
    """Worker `rank`'s share of data read in order (validation): a contiguous range, the sizes
    differing by at most one."""
    bounds = (np.arange(num_workers + 1, dtype=np.int64) * num_samples) // num_workers
    return range(int(bounds[rank]), int(bounds[rank + 1]))
