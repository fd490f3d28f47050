"""The sample order alone: pure NumPy, no TensorFlow, no I/O."""

from __future__ import annotations

import numpy as np
import pytest

from distaccum.order import CHUNK_RECORDS, EpochOrder, Layout, contiguous_share, even_split

# Files of uneven sizes, one empty, one shorter than a chunk.
FILE_SIZES = (300, 37, 0, 251, 1, 129)
N_SAMPLES = sum(FILE_SIZES)


def _updates(layout, global_batch_size, num_workers, epoch=1, seed=5):
    """[update][rank] -> sample numbers."""
    order = EpochOrder(layout, seed, epoch, global_batch_size)
    return [[order.worker_update(u, num_workers, r) for r in range(num_workers)]
            for u in range(order.updates)]


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_every_sample_exactly_once_per_epoch_when_files_are_uneven(num_workers):
    layout = Layout(FILE_SIZES, partitions=12, shuffle_buffer=96)
    for epoch in (1, 2):
        updates = _updates(layout, 24, num_workers, epoch)
        seen = np.concatenate([s for update in updates for s in update])
        assert len(seen) == N_SAMPLES
        assert np.array_equal(np.sort(seen), np.arange(N_SAMPLES))
        assert len(updates) == -(-N_SAMPLES // 24)
        for update in updates[:-1]:  # full updates: global_batch_size / num_workers per worker
            assert [len(s) for s in update] == [24 // num_workers] * num_workers


@pytest.mark.parametrize("global_batch_size", [8, 24, 128])
def test_same_samples_per_update_for_any_workers_when_global_batch_is_fixed(global_batch_size):
    layout = Layout(FILE_SIZES, partitions=8, shuffle_buffer=64)
    # (num_workers, accumulation_steps) = (1, 4), (2, 2), (4, 1): the order sees only their
    # product with micro_batch_size, the global batch size.
    sets = {workers: [set(np.concatenate(update).tolist())
                      for update in _updates(layout, global_batch_size, workers)]
            for workers in (1, 2, 4, 8)}
    assert sets[1] == sets[2] == sets[4] == sets[8]


def test_ragged_tail_spreads_over_workers_as_evenly_as_the_global_batch():
    layout = Layout((1000,), partitions=12)
    last = _updates(layout, 48, 3)[-1]  # 1000 = 20 x 48 + 40
    assert sorted(len(s) for s in last) == [13, 13, 14]


def test_a_worker_reads_a_contiguous_stretch_of_its_own_when_workers_split_the_epoch():
    layout = Layout(FILE_SIZES, partitions=12, shuffle_buffer=96)
    order = EpochOrder(layout, 5, 1, 24)
    spans = [order.worker_span(3, r) for r in range(3)]
    assert spans[0][0] == 0 and spans[-1][1] == N_SAMPLES
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for rank, (start, stop) in enumerate(spans):
        trained = np.concatenate([order.worker_update(u, 3, rank) for u in range(order.updates)])
        assert np.array_equal(np.sort(trained), np.sort(order.stream(start, stop)))
        assert abs((stop - start) - N_SAMPLES / 3) <= 1


def test_order_changes_with_epoch_and_seed_and_chunks_are_permuted():
    layout = Layout((64 * CHUNK_RECORDS,), partitions=4, shuffle_buffer=512)
    first = np.concatenate(_updates(layout, 32, 1, epoch=1)[0])
    assert not np.array_equal(first, np.concatenate(_updates(layout, 32, 1, epoch=2)[0]))
    assert not np.array_equal(first, np.concatenate(_updates(layout, 32, 1, seed=6)[0]))
    assert np.array_equal(first, np.concatenate(_updates(layout, 32, 1)[0]))  # pure
    stream = EpochOrder(layout, 5, 1, 32).stream(0, layout.num_samples)
    chunk_starts = stream[::CHUNK_RECORDS]
    assert set(chunk_starts % CHUNK_RECORDS) == {0}  # whole chunks, in permuted order
    assert not np.array_equal(chunk_starts, np.sort(chunk_starts))


def test_an_update_mixes_samples_from_many_chunks():
    layout = Layout((64 * CHUNK_RECORDS,), partitions=16, shuffle_buffer=4096)
    update = np.concatenate(_updates(layout, 64, 1)[0])
    assert len(set((update // CHUNK_RECORDS).tolist())) >= 32


def test_refuses_worker_count_that_does_not_divide_partitions():
    order = EpochOrder(Layout((100,), partitions=48), 0, 1, 40)
    with pytest.raises(ValueError, match=r"num_workers 5 does not divide partitions 48.*"
                                         r"Received: num_workers=5"):
        order.worker_update(0, 5, 0)


def test_even_split_sums_and_splits_by_workers():
    quotas = even_split(100, 12)
    assert quotas.sum() == 100 and quotas.max() - quotas.min() <= 1
    assert [quotas[r * 4:(r + 1) * 4].sum() for r in range(3)] == [33, 33, 34]
    assert [len(contiguous_share(10, 3, r)) for r in range(3)] == [3, 3, 4]


def test_resumed_epoch_needs_no_earlier_update():
    layout = Layout(FILE_SIZES, partitions=6, shuffle_buffer=60)
    walked = EpochOrder(layout, 5, 3, 12)
    expected = [walked.worker_update(u, 2, 1) for u in range(walked.updates)]
    fresh = EpochOrder(layout, 5, 3, 12)  # nothing computed yet: jump to update 20
    assert all(np.array_equal(fresh.worker_update(u, 2, 1), expected[u])
               for u in range(20, walked.updates))
