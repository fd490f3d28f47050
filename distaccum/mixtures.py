"""A weighted mixture of sources as one training set, under the order's contract: update u of an
epoch trains on the same samples for any number of workers with the same global batch, the
weights hold in every update (not only on average), and a resume is arithmetic.

Each update's global batch B is dealt to the sources once, from (weights, B, partitions) alone
(`apportion`): source s gets q_s = w_s / Σw × B samples, rounded to whole samples by largest
remainder, and each partition's share of the update is dealt to the sources in the same
proportions. Source s then follows its own order (`order.EpochOrder`) with q_s samples per
update, its partitions giving their dealt counts, so each worker reads only its own partitions of
every source and trains on exactly B / N samples per update.

A source turns over on its own: its epoch is its n_s // q_s full updates (the n_s mod q_s samples
its order leaves for last sit out that turn; its next turn is another order), so a source
weighted above its share of the data repeats within an epoch of the mixture, one below it sees
part of its data. An epoch of the mixture is ceil(Σ n_s / B) updates: as many samples as the
sources hold together.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import tensorflow as tf

from distaccum import comm, order
from distaccum.data import EpochPlan
from distaccum.microbatches import MicroBatches, batch_micro_batches


def apportion(weights, global_batch_size: int, partitions: int) -> np.ndarray:
    """[sources, partitions] samples each source gives each partition's share of an update.

    Source s's total is its weight's share of the batch, rounded by largest remainder (ties to
    the earlier source); the update's slots, in partition order, are dealt to the source whose
    count lags its share most, so every partition's share holds the sources in proportion (to a
    sample)."""
    shares = [Fraction(w).limit_denominator(10**9) for w in weights]
    exact = [share / sum(shares) * global_batch_size for share in shares]
    totals = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda s: (-(exact[s] - totals[s]), s))
    for s in by_remainder[:global_batch_size - sum(totals)]:
        totals[s] += 1
    dealt = np.zeros(len(totals), np.int64)
    slot_source = np.empty(global_batch_size, np.int64)
    targets = np.asarray(totals, np.int64)
    for slot in range(global_batch_size):
        # Lag of each source after this slot, times B: its share of slot+1 slots minus its count.
        chosen = int(np.argmax(targets * (slot + 1) - dealt * global_batch_size))
        dealt[chosen] += 1
        slot_source[slot] = chosen
    bounds = np.concatenate([[0], np.cumsum(order.even_split(global_batch_size, partitions))])
    counted = np.stack([np.concatenate([[0], np.cumsum(slot_source == s)])
                        for s in range(len(totals))])
    return counted[:, bounds[1:]] - counted[:, bounds[:-1]]


class Mixture:
    """Sources (each a `MicroBatches`) mixed by weight, as the training loop reads them.

    Build one with `distaccum.mixture`. Owns which source gives which samples to an update; not
    the order within a source (`order`) nor reading (`MicroBatches`).
    """

    def __init__(self, sources: list[MicroBatches], weights: list[float]) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError("a mixture needs one weight per source, and a source")
        for index, weight in enumerate(weights):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                    or not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"source {index}: a weight must be a number > 0. Received: "
                                 f"weight={weight!r}")
        sizes = {(s.micro_batch_size, s.layout.partitions) for s in sources}
        if len(sizes) > 1:
            raise ValueError("a mixture's sources need one micro_batch_size and one partitions. "
                             f"Received: {sorted(sizes)} (micro_batch_size, partitions)")
        specs = [tf.nest.map_structure(lambda spec: spec.dtype, s.element_spec) for s in sources]
        for index, spec in enumerate(specs[1:], 1):
            if spec != specs[0]:
                raise ValueError(f"source {index} gives samples of {spec}, source 0 of "
                                 f"{specs[0]}: a mixture's sources give one form of sample")
        self.sources = sources
        self.weights = list(weights)
        self.micro_batch_size = sources[0].micro_batch_size
        self._transforms: tuple = ()
        self._dealt: dict[int, np.ndarray] = {}

    @property
    def num_samples(self) -> list[int]:
        return [source.layout.num_samples for source in self.sources]

    @property
    def fingerprint(self) -> str | None:
        """The sources' listings (folders of images), when one has one."""
        prints = [getattr(source.samples, "fingerprint", None) or "" for source in self.sources]
        return "+".join(prints) if any(prints) else None

    def map(self, transform) -> "Mixture":
        mapped = Mixture(self.sources, self.weights)
        mapped._transforms = self._transforms + (transform,)
        return mapped

    @property
    def element_spec(self):
        return self._batched(self.sources[0].parsed(
            tf.data.Dataset.range(0), lambda index: np.empty(0, np.int64))).element_spec

    def global_batch_size(self, accumulation_steps: int) -> int:
        return comm.num_workers() * accumulation_steps * self.micro_batch_size

    def dealt(self, global_batch_size: int) -> np.ndarray:
        """`apportion`'s [sources, partitions] for this global batch; every source must get a
        sample per update, and hold at least as many as it gets."""
        if global_batch_size not in self._dealt:
            dealt = apportion(self.weights, global_batch_size,
                              self.sources[0].layout.partitions)
            for index, (source, row) in enumerate(zip(self.sources, dealt)):
                share = self.weights[index] / sum(self.weights) * global_batch_size
                if row.sum() == 0:
                    raise ValueError(
                        f"source {index}: weight {self.weights[index]!r} gives it {share:.2f} of "
                        f"an update's {global_batch_size} samples, which rounds to none: raise "
                        "its weight or the global batch")
                if source.layout.num_samples < row.sum():
                    raise ValueError(
                        f"source {index} holds {source.layout.num_samples} samples, fewer than "
                        f"the {int(row.sum())} its weight gives it in every update")
            self._dealt = {global_batch_size: dealt}
        return self._dealt[global_batch_size]

    def updates_per_epoch(self, global_batch_size: int) -> int:
        return math.ceil(sum(self.num_samples) / global_batch_size)

    def plan(self, accumulation_steps: int) -> EpochPlan:
        """Every update is full: B / N samples per worker, k micro-batches."""
        batch = self.global_batch_size(accumulation_steps)
        self.dealt(batch)  # each weight gives its source samples, and it holds them
        updates = self.updates_per_epoch(batch)
        return EpochPlan(updates, updates * accumulation_steps)

    def worker_window(self, epoch: int, update: int, accumulation_steps: int) -> list[np.ndarray]:
        """This worker's samples of each source in update `update` (0-based) of `epoch`."""
        return [self._source_window(s, epoch, update, accumulation_steps)
                for s in range(len(self.sources))]

    def _source_window(self, index: int, epoch: int, update: int,
                       accumulation_steps: int) -> np.ndarray:
        """This worker's samples of source `index` in update `update` of `epoch`: its turn's
        order, by arithmetic."""
        batch = self.global_batch_size(accumulation_steps)
        source, quota = self.sources[index], self.dealt(batch)[index]
        run_update = (epoch - 1) * self.updates_per_epoch(batch) + update
        turn, within = divmod(run_update, source.layout.num_samples // int(quota.sum()))
        return source.order(turn + 1, int(quota.sum()), quota).worker_update(
            within, comm.num_workers(), comm.rank())

    def epoch(self, epoch: int, accumulation_steps: int, first_update: int = 0) -> tf.data.Dataset:
        """The epoch's micro-batches from update `first_update` on: each source's samples of a
        window read and parsed by its own pipeline, then taken source by source (a worker's
        count from each is the same in every update: its partitions' dealt samples)."""
        order.check_num_workers(comm.num_workers(), self.sources[0].layout.partitions)
        batch = self.global_batch_size(accumulation_steps)
        updates = tf.data.Dataset.range(first_update, self.updates_per_epoch(batch))
        per_source = [
            source.parsed(updates, lambda u, s=s: self._source_window(
                s, epoch, int(u), accumulation_steps))
            for s, source in enumerate(self.sources)]
        mine = order.EpochOrder.worker_partitions_of(self.sources[0].layout.partitions,
                                                     comm.num_workers(), comm.rank())
        counts = self.dealt(batch)[:, mine.start:mine.stop].sum(axis=1)
        pattern = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        chosen = tf.data.Dataset.from_tensor_slices(pattern).repeat(
            self.updates_per_epoch(batch) - first_update)
        return self._batched(tf.data.Dataset.choose_from_datasets(per_source, chosen))

    def evaluation(self) -> tf.data.Dataset:
        """Every source's share, in order, source after source (unweighted)."""
        evaluations = [source.evaluation() for source in self.sources]
        combined = evaluations[0]
        for more in evaluations[1:]:
            combined = combined.concatenate(more)
        return combined

    def describe(self, epoch: int, accumulation_steps: int, micro_batch: int) -> str:
        """Where micro-batch `micro_batch` (1-based) of this worker's epoch comes from."""
        update, within = divmod(micro_batch - 1, accumulation_steps)
        windows = self.worker_window(epoch, update, accumulation_steps)
        m = self.micro_batch_size
        start, stop, at, parts = within * m, (within + 1) * m, 0, []
        for index, (source, samples) in enumerate(zip(self.sources, windows)):
            mine = samples[max(start - at, 0):max(stop - at, 0)]
            if len(mine):
                parts.append(f"source {index}: {source.samples.describe(mine)}")
            at += len(samples)
        return "; ".join(parts)

    def _batched(self, samples: tf.data.Dataset) -> tf.data.Dataset:
        return batch_micro_batches(samples, self.micro_batch_size, self._transforms)


def mixture(sources, weights) -> Mixture:
    """Sources mixed by weight, for `Trainer.fit`: each a `distaccum.micro_batches(...)` of one
    micro_batch_size and partitions; each update takes weight / Σ weights of its samples from
    each (to a whole sample)."""
    return Mixture(list(sources), list(weights))
