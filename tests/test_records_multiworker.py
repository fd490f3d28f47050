"""Record files and a random-access source read by real workers under `mpirun`: each reads its
share, every sample once per epoch, the same samples per update for any worker count with the
same global batch, and the same model at the end."""

from __future__ import annotations

import numpy as np
import pytest

import scenarios
from conftest import WORKERS_DIR, run_script

pytestmark = pytest.mark.multiworker

# Uneven files: one shorter than a chunk, one empty, the rest over several chunks.
FILE_SIZES = (150, 37, 0, 201, 5, 90)
EPOCHS = 2
MICRO_BATCH_SIZE = 4
# (data, launcher, num_workers, accumulation_steps): each kind's first two share global batch 16
# (4 workers with k = 1 train on these files in test_resize.py's chain, to the same model). The
# source holds the files' samples, as one sequence.
RUNS = (("records", "python", 1, 4), ("records", "mpirun", 2, 2), ("records", "mpirun", 3, 1),
        ("source", "python", 1, 4), ("source", "mpirun", 2, 2))
IDS = [f"{data}-n{workers}" for data, _, workers, _ in RUNS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(data, num_workers, k): [rank npz]}, one launch each on the same samples."""
    x, y, w = scenarios.make_shard(0, sum(FILE_SIZES))
    files = scenarios.write_record_files(tmp_path_factory.mktemp("records"), FILE_SIZES,
                                         x, y, w).pattern
    found = {}
    for data, launcher, workers, k in RUNS:
        out = tmp_path_factory.mktemp(f"{data}-n{workers}k{k}")
        source = (["--files", files] if data == "records"
                  else ["--source", str(sum(FILE_SIZES))])
        run_script(launcher, WORKERS_DIR / "train_records.py", *source,
                   "--accumulation-steps", str(k), "--micro-batch-size", str(MICRO_BATCH_SIZE),
                   "--epochs", str(EPOCHS), "--out", str(out), num_workers=workers,
                   extra_env={"DISTACCUM_BACKEND": "mpi"} if launcher == "mpirun" else {})
        found[data, workers, k] = [dict(np.load(out / f"rank{r}.npz")) for r in range(workers)]
    return found


def _updates(ranks, k, epoch):
    """[update] -> sorted sample ids over all ranks."""
    per_rank = []
    for saved in ranks:
        batches = [saved[key] for key in sorted(
            (key for key in saved if key.startswith(f"epoch{epoch}_mb")),
            key=lambda key: int(key.rsplit("mb", 1)[1]))]
        per_rank.append([np.concatenate(batches[u:u + k]) for u in range(0, len(batches), k)])
    updates = max(len(windows) for windows in per_rank)
    return [np.sort(np.concatenate([w[u] for w in per_rank if u < len(w)]))
            for u in range(updates)]


@pytest.mark.parametrize("data, workers, k", [(r[0], *r[2:]) for r in RUNS], ids=IDS)
def test_every_sample_exactly_once_per_epoch_when_files_are_uneven(runs, data, workers, k):
    for epoch in range(1, EPOCHS + 1):
        seen = np.concatenate(_updates(runs[data, workers, k], k, epoch))
        assert np.array_equal(np.sort(seen), np.arange(sum(FILE_SIZES)))


@pytest.mark.parametrize("data", ["records", "source"])
def test_same_samples_per_update_when_workers_change_and_global_batch_does_not(runs, data):
    for epoch in range(1, EPOCHS + 1):
        reference = _updates(runs[data, 1, 4], 4, epoch)
        got = _updates(runs[data, 2, 2], 2, epoch)
        assert len(got) == len(reference)
        assert all(np.array_equal(a, b) for a, b in zip(got, reference)), epoch


@pytest.mark.parametrize("data, workers, k", [(r[0], *r[2:]) for r in RUNS], ids=IDS)
def test_each_worker_parses_only_its_share(runs, data, workers, k):
    share = sum(FILE_SIZES) / workers
    for saved in runs[data, workers, k]:
        # Per epoch: the training's records (or samples asked of the source) only; the id pass
        # reads through its own function (source).
        assert int(saved["parsed"]) / EPOCHS <= share + 1, (int(saved["parsed"]), share)


@pytest.mark.parametrize("data", ["records", "source"])
def test_same_model_for_any_workers_when_global_batch_is_fixed(runs, data):
    def weights(saved):
        return [saved[f"weight{i}"] for i in range(sum(key.startswith("weight") for key in saved))]

    ranks = runs[data, 2, 2]
    assert all(np.array_equal(a, b) for a, b in zip(weights(ranks[1]), weights(ranks[0])))
    scenarios.assert_weights_close(weights(ranks[0]), weights(runs[data, 1, 4][0]))
