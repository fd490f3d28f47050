"""Resume on another number of workers (or micro-batch size) with the same global batch: the run
continues as the uninterrupted one, within float32 summation round-off, and its ranks agree
bitwise.

Why round-off and not bitwise: update u sums the same samples' gradients, but grouped otherwise
(per micro-batch, per worker, then across workers), so float32 adds them in another order. Each
update's sum then differs by at most a few units of 2^-24 of the sum of the terms' magnitudes,
and a few dozen updates of SGD/Adam carry that forward without growing it past ~1e-6 of the
weights' size: `scenarios.assert_weights_close` allows 1e-5 of the largest weight (168 units),
far below what one sample too many or too few in an update makes (tested: a resume that changes
the global batch is refused, and the checker is shown to fail on a run one update off).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import data_kinds
import scenarios
from conftest import (MPI_ROOT_VARIABLES, REPO_ROOT, VENV_BIN, WORKERS_DIR, launcher_command,
                      worker_processes)
from distaccum import cli, data, job, microbatches, sources
from distaccum.history import Position

DIGITS = str(REPO_ROOT / "distaccum" / "configs" / "digits.yaml")


def _state(logdir: Path) -> tuple[dict, list[np.ndarray]]:
    """The newest checkpoint's meta and state (model, then optimizer variables)."""
    latest = sorted((logdir / "checkpoints").glob("update-*"))[-1]
    meta = json.loads((latest / "meta.json").read_text())
    with np.load(latest / "state.npz") as arrays:
        return meta, [arrays[f"arr_{i}"] for i in range(meta["variables"])]


# --- the start-up line --------------------------------------------------------------------------

def test_start_up_line_says_what_changed_and_that_the_global_batch_did_not():
    start = Position(40, 2, 7)
    resized = job.describe_resume(start, job.BatchShape(2, 2, 32), job.BatchShape(4, 1, 32))
    assert resized == ("distaccum: resuming after update step 40 (epoch 2) on 2 workers × k=2 "
                       "(was 4 × k=1); global batch 128 unchanged")
    micro = job.describe_resume(start, job.BatchShape(1, 2, 64), job.BatchShape(2, 4, 16))
    assert micro.endswith("on 1 worker × k=2 × micro-batch 64 (was 2 × k=4 × micro-batch 16); "
                          "global batch 128 unchanged")
    same = job.describe_resume(start, job.BatchShape(2, 2, 32), job.BatchShape(2, 2, 32))
    assert same == "distaccum: resuming after update step 40 (epoch 2)"


def test_resume_of_a_dataset_function_on_other_workers_says_its_updates_take_other_samples():
    x, y = np.zeros((8, 5), "float32"), np.zeros((8, 1), "float32")
    function = sources.JobData(data.DatasetEpochs(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(4)), None)
    [note] = job._resize_notes(function, job.BatchShape(2, 2, 32), job.BatchShape(4, 1, 32))
    assert "on 2 workers (was 4) updates keep the global batch but not their samples" in note
    # Same workers (the shards do not change), or arrays: nothing to say.
    assert job._resize_notes(function, job.BatchShape(2, 1, 64), job.BatchShape(2, 2, 32)) == ()
    arrays = sources.JobData(microbatches.micro_batches((x, y), 4), None)
    assert job._resize_notes(arrays, job.BatchShape(2, 2, 32), job.BatchShape(4, 1, 32)) == ()


# --- one process: another micro-batch size --------------------------------------------------------

@pytest.fixture
def train(monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)

    def run(logdir: Path, *overrides: str) -> tuple[int, str, str]:
        arguments = ["train", "--config", DIGITS, "--set", f"logdir={logdir}",
                     "--set", "update_steps=8", "--set", "lr_schedule=constant",
                     "--set", "warmup_steps=0"]
        for override in overrides:
            arguments += ["--set", override]
        code = cli.main(arguments)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.rounding
def test_resume_on_another_micro_batch_size_continues_the_run_when_global_batch_is_kept(
        train, tmp_path):
    code, _, err = train(tmp_path / "whole")
    assert code == 0, err
    assert train(tmp_path / "resized", "update_steps=3")[0] == 0  # k=4 x 32, mid-epoch
    code, out, err = train(tmp_path / "resized", "micro_batch_size=64")  # k=2 x 64
    assert code == 0, err
    assert ("distaccum: num_workers 1, micro_batch_size 64, accumulation_steps 2, "
            "global_batch_size 128") in out
    assert ("resuming after update step 3 (epoch 1) on 1 worker × k=2 × micro-batch 64 (was 1 × "
            "k=4 × micro-batch 32); global batch 128 unchanged") in out, out
    whole_meta, whole = _state(tmp_path / "whole")
    resized_meta, resized = _state(tmp_path / "resized")
    assert resized_meta["position"] == whole_meta["position"]
    scenarios.assert_weights_close(resized, whole)
    # The check can fail: the run one update short is not within it.
    train(tmp_path / "short", "update_steps=7")
    with pytest.raises(AssertionError):
        scenarios.assert_weights_close(_state(tmp_path / "short")[1], whole)


def test_resume_with_another_global_batch_exits_2_naming_the_one_to_set(train, tmp_path):
    assert train(tmp_path, "update_steps=2")[0] == 0
    code, out, err = train(tmp_path, "micro_batch_size=16", "accumulation_steps=2")
    assert code == cli.EXIT_BAD_INPUT and err.count("\n") == 1, err
    assert ("global_batch_size: the checkpoint in" in err
            and "was written with global_batch_size=128; resuming needs the same (set "
                "global_batch_size=128 to resume on any num_workers and micro_batch_size that "
                "divide it)" in err and "Received: global_batch_size=32" in err), err


def test_resume_on_data_of_another_size_exits_2_naming_both_counts(train, tmp_path):
    data = tmp_path / "data.npz"

    def write(rows: int) -> None:
        rng = np.random.default_rng(rows)
        np.savez(data, x=rng.normal(size=(rows, 64)).astype("float32"),
                 y=rng.integers(0, 10, rows))

    write(300)
    assert train(tmp_path / "run", f"dataset={data}", "update_steps=2")[0] == 0
    write(290)  # the same path, other data: its order would not be the run's
    code, _, err = train(tmp_path / "run", f"dataset={data}")
    assert code == cli.EXIT_BAD_INPUT and err.count("\n") == 1, err
    assert "was trained on 300 samples, this dataset holds 290" in err, err


# --- real workers: 2 -> 4 -> 2 -> 1 -------------------------------------------------------------

RECORD_SIZES = (0, 300, 37, 200, 1, 92)  # test_recordfiles' files: 630 records
# (launcher, backend, data, each stage's sharded optimizer state): each chain resizes 2 -> 4 -> 2
# -> 1 workers at mid-epoch checkpoints; in the horovodrun chain a SIGTERM ends the first stage,
# as a preemption would. Sharded state resumes from 2 workers onto 4 (switched off in one chain,
# kept in the other, which re-shards it) and onto 1, and is switched on again from 4 workers.
CHAINS = {
    "mpirun-records": ("mpirun", "mpi", "records", (True, False, True, False)),
    "horovodrun-arrays": ("horovodrun", "horovod", "arrays", (True, True, False, False)),
}
# Per data: its keys, updates per epoch (2 epochs in all), where the first 3 stages stop.
# A constant learning rate: a stage's `update_steps` would otherwise be a cosine's length.
RUNS = {
    "records": (["micro_batch_size=4", "global_batch_size=16", "parse=test_recordfiles:parse"],
                40, (10, 30, 50)),
    "arrays": (["micro_batch_size=32", "global_batch_size=128"], 12, (5, 9, 17)),
}
STAGE_WORKERS = (2, 4, 2, 1)  # k = 2, 1, 2, 4
SCHEDULE = ["lr_schedule=constant", "warmup_steps=0", "checkpoint_interval=5", "log_interval=5"]


def _environment(backend: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "HOROVOD_", "PMIX"))}
    return {**env, **MPI_ROOT_VARIABLES, "PATH": f"{VENV_BIN}:{env['PATH']}",
            "DISTACCUM_BACKEND": backend}


def _launch(launcher: str, backend: str, workers: int, dump: Path, overrides: list[str],
            preempt_after: Path | None = None) -> str:
    """One stage: `distaccum train` on `workers` workers, each rank's state dumped at its end;
    with `preempt_after`, SIGTERM to rank 1 once that checkpoint directory has one."""
    dump.mkdir(parents=True)
    command = [*launcher_command(launcher, workers), str(VENV_BIN / "python"),
               str(WORKERS_DIR / "train_job.py"), str(dump), "train", "--config", DIGITS]
    for override in overrides:
        command += ["--set", override]
    log = (dump / "job.log").open("w+")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                               cwd=REPO_ROOT, env=_environment(backend))
    if preempt_after is not None:
        deadline = time.monotonic() + 240
        while not list(preempt_after.glob("update-*")):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        worker_processes(process)[1].send_signal(signal.SIGTERM)
    code = process.wait(timeout=300)
    log.seek(0)
    text = log.read()
    if preempt_after is None:
        assert code == 0, text[-4000:]
    else:  # horovodrun exits 1 when its workers exit 143
        assert code != 0 and "stopped by SIGTERM after update step" in text, text[-4000:]
    ranks = [np.load(dump / f"rank{r}.npz") for r in range(workers)]
    for saved in ranks[1:]:  # every rank holds the same model and optimizer state, bitwise
        assert all(np.array_equal(saved[key], ranks[0][key]) for key in ranks[0].files)
    return text


def _uninterrupted(logdir: Path, overrides: list[str]) -> None:
    """The uninterrupted run, in this process: one worker, k = 4 (TensorFlow is already loaded
    here, so no launch pays its start-up again). Any worker count makes the same run to
    round-off (the same samples per update, added in another grouping: the module docstring),
    and the chain's third stage runs this very shape; the ranks' bitwise agreement is checked
    by every stage of the chain."""
    arguments = ["train", "--config", DIGITS, "--set", f"logdir={logdir}"]
    for override in overrides:
        arguments += ["--set", override]
    code = cli.main(arguments)
    assert code == 0, f"the uninterrupted run exited {code}"


@pytest.fixture(scope="module")
def record_glob(tmp_path_factory) -> str:
    from test_recordfiles import write_records
    return write_records(tmp_path_factory.mktemp("records"), sizes=RECORD_SIZES).pattern


@pytest.mark.rounding
@pytest.mark.multiworker
@pytest.mark.parametrize("chain", list(CHAINS))
def test_run_resized_2_4_2_1_at_mid_epoch_checkpoints_ends_as_the_uninterrupted_run(
        chain, tmp_path, record_glob, monkeypatch):
    launcher, backend, kind, stage_sharded = CHAINS[chain]
    keys, updates_per_epoch, stops = RUNS[kind]
    keys = keys + SCHEDULE + ([f"dataset={record_glob}"] if kind == "records" else [])
    whole, resized = tmp_path / "whole", tmp_path / "resized"
    monkeypatch.chdir(REPO_ROOT)
    _uninterrupted(whole, keys + ["epochs=2"])
    texts = []
    for stage, (workers, sharded) in enumerate(zip(STAGE_WORKERS, stage_sharded)):
        preempt = stage == 0 and launcher == "horovodrun"
        end = ["epochs=2"] if stage == len(stops) or preempt else [f"update_steps={stops[stage]}"]
        texts.append(_launch(launcher, backend, workers, tmp_path / f"dump-{stage}",
                             keys + end + [f"logdir={resized}",
                                           f"shard_optimizer_state={str(sharded).lower()}"],
                             preempt_after=resized / "checkpoints" if preempt else None))
    assert f"{updates_per_epoch} updates per epoch" in texts[0], texts[0][-3000:]
    for before, after, text in zip(STAGE_WORKERS, STAGE_WORKERS[1:], texts[1:]):
        assert re.search(
            rf"resuming after update step \d+ \(epoch \d\) on {after} workers? × k={4 // after} "
            rf"\(was {before} × k={4 // before}\); global batch \d+ unchanged", text), text[-3000:]
    assert f"distaccum: done: {2 * updates_per_epoch} update steps" in texts[-1], texts[-1][-3000:]
    whole_meta, whole_state = _state(whole)
    resized_meta, resized_state = _state(resized)
    assert resized_meta["position"] == whole_meta["position"]
    scenarios.assert_weights_close(resized_state, whole_state)
    relative = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                   for a, b in zip(resized_state, whole_state) if np.any(b))
    print(f"{chain}: largest |resized - uninterrupted| of a state tensor / its largest |value|: "
          f"{relative:.2g}")


# --- every kind of data: 2 workers, cut mid-epoch, resumed on 1 ----------------------------------

# Per kind: the keys that name it (a callable of the test's directory for written data). The
# bundled digits in each form (data_kinds), global batch 128.
KINDS = {
    "image_folders": lambda root: [
        f"dataset={data_kinds.write_folder(root / 'images')}", "model=data_kinds:image_classifier",
        "image_options={image_size: [8, 8], color_mode: grayscale}"],
    "random_access_source": lambda root: ["dataset=data_kinds:digit_rows"],
    "parquet": lambda root: [f"dataset={data_kinds.write_parquet(root / 'tables')}",
                             "columns={x: x, y: y}"],
    "mixture": lambda root: [
        f"dataset=[{{dataset: digits, weight: 3}}, "
        f"{{dataset: '{data_kinds.write_parquet(root / 'tables')}', weight: 1}}]",
        "columns={x: x, y: y}"],
}


@pytest.mark.rounding
@pytest.mark.multiworker
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_data_cut_mid_epoch_on_2_workers_resumes_on_1_as_the_uninterrupted_run(
        kind, tmp_path, monkeypatch):
    keys = KINDS[kind](tmp_path) + ["micro_batch_size=32", "global_batch_size=128"] + SCHEDULE
    whole, resized = tmp_path / "whole", tmp_path / "resized"
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    _uninterrupted(whole, keys + ["epochs=2"])
    first = _launch("mpirun", "mpi", 2, tmp_path / "dump", keys + ["update_steps=5",
                                                                   f"logdir={resized}"])
    assert "distaccum: done: 5 update steps" in first, first[-3000:]
    _uninterrupted(resized, keys + ["epochs=2"])
    whole_meta, whole_state = _state(whole)
    resized_meta, resized_state = _state(resized)
    assert resized_meta["position"] == whole_meta["position"]
    scenarios.assert_weights_close(resized_state, whole_state)
