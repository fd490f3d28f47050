"""Reliability with real processes and real signals: SIGTERM then resume (exact), SIGKILL of a
worker (no hang), NaN on one rank (same skip everywhere), damaged checkpoints."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator

from distaccum import cli
from conftest import (MPI_ROOT_VARIABLES, REPO_ROOT, VENV_BIN, WORKERS_DIR, launcher_command,
                      run_script, worker_processes)

pytestmark = pytest.mark.multiworker

SYNTHETIC = str(REPO_ROOT / "distaccum" / "configs" / "synthetic.yaml")
DIGITS = str(REPO_ROOT / "distaccum" / "configs" / "digits.yaml")
TOTAL_UPDATES = 80
LOG_INTERVAL = 10


def _environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "HOROVOD_", "PMIX"))}
    return {**env, **MPI_ROOT_VARIABLES, "PATH": f"{VENV_BIN}:{env['PATH']}"}


# Each backend under a launcher it runs under: Horovod (horovodrun), mpi4py (mpirun).
BACKENDS = [("horovodrun", "horovod"), ("mpirun", "mpi")]


def _start(launcher: str, logdir: Path, *overrides: str, config: str = SYNTHETIC,
           backend: str = "horovod"):
    command = [*launcher_command(launcher, 2), str(VENV_BIN / "distaccum"), "train",
               "--config", config, "--set", f"logdir={logdir}"]
    for override in overrides:
        command += ["--set", override]
    output = (logdir.parent / f"{logdir.name}.{time.monotonic_ns()}.log").open("w+")
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True,
                               env={**_environment(), "DISTACCUM_BACKEND": backend})
    return process, output


def _wait_for(condition, process, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the job ended before the awaited moment"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _finish(process, output, timeout: float = 240) -> tuple[int, str]:
    code = process.wait(timeout=timeout)
    output.seek(0)
    return code, output.read()


def _run_interrupted_at(launcher: str, backend: str, logdir: Path, after_checkpoint: int) -> str:
    """Start (or resume) the job; once checkpoint `after_checkpoint` exists, SIGTERM rank 1 only."""
    process, output = _start(launcher, logdir, *_SCHEDULE, backend=backend)
    marker = logdir / "checkpoints" / f"update-{after_checkpoint:09d}"
    _wait_for(marker.exists, process)
    worker_processes(process)[1].send_signal(signal.SIGTERM)
    code, text = _finish(process, output)
    assert code != 0 and "stopped by SIGTERM after update step" in text, text[-3000:]
    return text


_SCHEDULE = ("epochs=null", f"update_steps={TOTAL_UPDATES}", f"log_interval={LOG_INTERVAL}",
             "checkpoint_interval=10", "accumulation_steps=2")


def _final_state(logdir: Path) -> tuple[dict, list[np.ndarray]]:
    [latest] = sorted((logdir / "checkpoints").glob("update-*"))[-1:]
    meta = json.loads((latest / "meta.json").read_text())
    with np.load(latest / "state.npz") as arrays:
        return meta, [arrays[f"arr_{i}"] for i in range(meta["variables"])]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The schedule run without interruption, once per backend: {(launcher, backend): logdir}."""
    runs = {}

    def run(launcher: str, backend: str) -> Path:
        if (launcher, backend) not in runs:
            logdir = tmp_path_factory.mktemp("uninterrupted") / backend
            process, output = _start(launcher, logdir, *_SCHEDULE, backend=backend)
            code, text = _finish(process, output)
            assert code == 0, text[-3000:]
            runs[launcher, backend] = logdir
        return runs[launcher, backend]

    return run


def _assert_equals_uninterrupted(resumed: Path, reference: Path) -> None:
    """Same final model and optimizer state, bitwise, and TensorBoard steps unique and complete."""
    reference_meta, reference_state = _final_state(reference)
    resumed_meta, resumed_state = _final_state(resumed)
    assert resumed_meta["position"] == reference_meta["position"]
    assert resumed_meta["position"]["update_step"] == TOTAL_UPDATES
    # Bitwise: same data order (shuffles seeded per epoch), same reduction order, same kernels.
    for got, expected in zip(resumed_state, reference_state):
        np.testing.assert_array_equal(got, expected)
    events = plugin_event_accumulator.EventAccumulator(
        str(resumed), size_guidance={plugin_event_accumulator.TENSORS: 0})
    events.Reload()
    steps = [e.step for e in events.Tensors("train/loss")]
    assert len(steps) == len(set(steps)), f"duplicate steps: {steps}"
    assert set(range(LOG_INTERVAL, TOTAL_UPDATES + 1, LOG_INTERVAL)) <= set(steps)
    assert max(steps) == TOTAL_UPDATES


# mpirun only: under horovodrun, test_resize.py's chain is stopped by SIGTERM and resumed (on
# other worker counts) to the uninterrupted run's state.
@pytest.mark.parametrize("launcher, backend", [("mpirun", "mpi")])
def test_resumed_run_equals_uninterrupted_run_when_sigterm_twice(tmp_path, launcher, backend,
                                                                 uninterrupted):

    resumed = tmp_path / "resumed"
    _run_interrupted_at(launcher, backend, resumed, after_checkpoint=10)
    second = _run_interrupted_at(launcher, backend, resumed, after_checkpoint=40)
    assert "resuming after update step" in second
    process, output = _start(launcher, resumed, *_SCHEDULE, backend=backend)
    code, text = _finish(process, output)
    assert code == 0, text[-3000:]
    assert f"distaccum: done: {TOTAL_UPDATES} update steps" in text
    _assert_equals_uninterrupted(resumed, uninterrupted(launcher, backend))


def test_crash_loop_of_sigkills_ends_bitwise_equal_to_uninterrupted_run(tmp_path, uninterrupted):
    """A supervisor restarts the 2-worker job after each SIGKILL of a random rank at a random
    moment after that run's first new checkpoint (so every run makes progress), the second one
    while rank 0 writes a checkpoint, as `restartPolicy: OnFailure` would; the fourth start runs
    to the end."""
    launcher, backend = "mpirun", "mpi"
    rng = random.Random(20261125)
    logdir = tmp_path / "crashing"
    checkpoints = logdir / "checkpoints"
    kills = []
    while True:
        process, output = _start(launcher, logdir, *_SCHEDULE, backend=backend)
        if len(kills) == 3:
            break
        _wait_for(lambda: sorted(worker_processes(process)) == [0, 1], process)
        if len(kills) == 1:  # mid-save: the staging directory exists only while rank 0 writes
            while not any(checkpoints.glob(".staging-*")):
                assert process.poll() is None, "the job ended before a checkpoint save"
                time.sleep(0.001)
            rank, moment = 0, "during a checkpoint save"
        else:
            known = set(checkpoints.glob("update-*"))
            _wait_for(lambda: set(checkpoints.glob("update-*")) - known, process)
            rank, delay = rng.choice([0, 1]), rng.uniform(0.0, 1.0)
            moment = f"{delay:.2f} s after a new checkpoint"
            deadline = time.monotonic() + delay
            _wait_for(lambda: time.monotonic() > deadline, process)
        worker_processes(process)[rank].send_signal(signal.SIGKILL)
        code, text = _finish(process, output, timeout=120)
        assert code != 0, text[-3000:]
        if moment == "during a checkpoint save":  # the half-written checkpoint is still there
            assert any(checkpoints.glob(".staging-*"))
        kills.append((rank, moment))
    code, text = _finish(process, output)
    assert code == 0, f"{kills}\n{text[-3000:]}"
    assert f"distaccum: done: {TOTAL_UPDATES} update steps" in text
    assert not any(checkpoints.glob(".staging-*"))  # the killed writer's debris was cleared
    _assert_equals_uninterrupted(logdir, uninterrupted(launcher, backend))


@pytest.mark.parametrize(
    "launcher, backend, names_the_lost_worker",
    [("horovodrun", "horovod", ["Process name: 1", "Exit code: 137"]),
     ("mpirun", "horovod", ["process rank 1", "signal 9"]),
     ("mpirun", "mpi", ["process rank 1", "signal 9"])],
    ids=["horovodrun", "mpirun", "mpirun-mpi4py"],
)
def test_others_exit_within_60s_when_one_worker_is_killed(tmp_path, launcher, backend,
                                                          names_the_lost_worker):
    logdir = tmp_path / "run"
    process, output = _start(launcher, logdir, "epochs=null", "update_steps=100000",
                             "log_interval=1", "checkpoint_interval=5", backend=backend)
    _wait_for((logdir / "checkpoints" / "update-000000005").exists, process)
    workers = worker_processes(process)
    assert sorted(workers) == [0, 1]
    killed_at = time.monotonic()
    workers[1].send_signal(signal.SIGKILL)
    code, text = _finish(process, output, timeout=60)
    assert time.monotonic() - killed_at < 60
    assert code != 0
    assert not [w for w in workers.values() if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    for message in names_the_lost_worker:
        assert message in text, text[-3000:]
    if launcher == "horovodrun":  # the survivor says why it stops, in one line
        assert "rank 0 lost contact with another worker during" in text


@pytest.mark.parametrize("backend", ["mpi", "horovod"])
def test_survivor_exits_within_collective_timeout_when_a_worker_stops_answering(tmp_path, backend):
    # SIGSTOP: the process lives on and its connections stay open, as when a node's network
    # vanishes, so the survivor's allreduce would wait until TCP gives up (or forever).
    timeout = 10
    logdir = tmp_path / "run"
    process, output = _start("mpirun", logdir, "epochs=null", "update_steps=100000",
                             "checkpoint_interval=5", f"collective_timeout={timeout}",
                             backend=backend)
    _wait_for((logdir / "checkpoints" / "update-000000005").exists, process)
    workers = worker_processes(process)
    workers[1].send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    workers[0].wait(timeout=timeout + 30)
    seconds = time.monotonic() - stopped_at
    code, text = _finish(process, output, timeout=60)  # mpirun then ends the stopped rank
    assert code != 0
    assert timeout <= seconds < timeout + 15, f"rank 0 exited {seconds:.1f} s after the stop"
    assert re.search(rf"distaccum: error: rank 0: update step \d+'s allreduce did not complete "
                     rf"within collective_timeout={timeout} s", text), text[-3000:]


@pytest.mark.parametrize("launcher, backend", BACKENDS)
def test_both_ranks_skip_same_update_when_nan_on_one_rank(tmp_path, launcher, backend):
    run_script(
        launcher, WORKERS_DIR / "train_shards.py", "--accumulation-steps", "1",
        "--epochs", "1", "--nan-rank", "1", "--nan-micro-batches", "1", "--out", str(tmp_path),
        extra_env={"DISTACCUM_BACKEND": backend},
    )
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for saved in ranks:
        assert saved["skipped_steps"].tolist() == [2]  # window 2 holds rank 1's micro-batch 1
        assert int(saved["iterations"]) == 6 - 1  # 6 windows, one not applied
        assert np.isfinite(saved["arr_0"]).all()
    for index in range(4):
        np.testing.assert_array_equal(ranks[0][f"arr_{index}"], ranks[1][f"arr_{index}"])


def test_training_stops_with_clear_error_when_too_many_consecutive_skips(tmp_path):
    command = [*launcher_command("horovodrun", 2), str(VENV_BIN / "python"),
               str(WORKERS_DIR / "train_shards.py"), "--accumulation-steps", "1", "--epochs", "1",
               "--nan-rank", "1", "--nan-micro-batches", "0,1,2", "--max-consecutive-skips", "3",
               "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, env=_environment(),
                               timeout=240)
    assert completed.returncode != 0
    for rank in (0, 1):
        assert (f"rank {rank}: 3 consecutive updates had NaN or Inf gradients (last at update "
                "step 3)") in completed.stdout + completed.stderr


@pytest.mark.parametrize("launcher, backend, kind", [("horovodrun", "horovod", "dtype"),
                                                     ("mpirun", "mpi", "shape")])
def test_every_rank_stops_naming_rank_epoch_and_micro_batch_when_one_rank_meets_bad_data(
        tmp_path, launcher, backend, kind):
    # Rank 1's input pipeline fails on its 3rd micro-batch of epoch 2 (a wrong dtype or shape).
    command = [*launcher_command(launcher, 2), str(VENV_BIN / "python"),
               str(WORKERS_DIR / "train_shards.py"), "--accumulation-steps", "2", "--epochs", "3",
               "--bad-rank", "1", "--bad-epoch", "2", "--bad-micro-batch", "3",
               "--bad-kind", kind, "--out", str(tmp_path)]
    started = time.monotonic()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120,
                               env={**_environment(), "DISTACCUM_BACKEND": backend})
    seconds = time.monotonic() - started
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0
    # Epoch 1: 3 windows of rank 0's 6 micro-batches; epoch 2's 2nd window holds micro-batch 3.
    expected = ("rank 1: micro-batch 3 of epoch 2 (counted from 1) cannot be trained on; every "
                "rank stopped at update step 5 without applying it")
    for rank in (0, 1):
        assert f"rank {rank} stopped: {expected}" in output, output[-3000:]
    assert "(here: " in output.split("rank 1 stopped: ", 1)[1].splitlines()[0]
    assert seconds < 60, f"took {seconds:.0f} s"  # start-up included; a hang would hit 120 s


def _local(capsys, logdir: Path, *overrides: str) -> tuple[int, str, str]:
    """The CLI in this process (no launcher: one worker), as (exit code, stdout, stderr)."""
    code = cli.main(["train", "--config", DIGITS, "--set", f"logdir={logdir}", "--set",
                     "epochs=null", "--set", "checkpoint_interval=5", *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_truncated_checkpoint_falls_back_to_previous_with_warning(tmp_path, capsys):
    code, _, err = _local(capsys, tmp_path, "--set", "update_steps=20")
    assert code == 0, err[-2000:]
    latest = tmp_path / "checkpoints" / "update-000000020" / "state.npz"
    latest.write_bytes(latest.read_bytes()[:1000])
    code, out, err = _local(capsys, tmp_path, "--set", "update_steps=30")
    assert code == 0, err[-2000:]
    assert "warning: checkpoint" in err and "update-000000020" in err
    assert "resuming after update step 15" in out
    assert "distaccum: done: 30 update steps" in out


@pytest.fixture
def tiny_disk(tmp_path):
    """A 200 KiB tmpfs: room for the logs and one checkpoint of the digits model (≈ 120 KiB),
    not for a second one."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _weights(path: Path) -> list[np.ndarray]:
    import keras

    return [np.asarray(w) for w in keras.saving.load_model(path).get_weights()]


def test_full_disk_fails_saves_with_one_line_keeps_good_checkpoints_and_resumes_exactly(
        tmp_path, capsys, tiny_disk):
    run = tiny_disk / "run"
    code, out, err = _local(capsys, run, "--set", "update_steps=30")
    # Update 5's checkpoint fits; from update 10 on the disk is full: each save fails with one
    # warning and training goes on to the end, where saving the model fails too.
    assert code == cli.EXIT_FAILED
    for step in (10, 15, 20, 25, 30):
        assert (f"distaccum: warning: checkpoint at update step {step} not saved (No space left "
                f"on device); the previous ones are intact") in err, err[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["update-000000005"]  # no debris
    # The disk grows; the same command resumes from the last good checkpoint, exactly.
    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_disk)], check=True)
    code, out, err = _local(capsys, run, "--set", "update_steps=30")
    assert code == 0, err[-2000:]
    assert "resuming after update step 5" in out and "distaccum: done: 30 update steps" in out
    code, _, err = _local(capsys, tmp_path / "uninterrupted", "--set", "update_steps=30")
    assert code == 0, err[-2000:]
    for resumed, uninterrupted in zip(_weights(run / "model.keras"),
                                      _weights(tmp_path / "uninterrupted" / "model.keras")):
        np.testing.assert_array_equal(resumed, uninterrupted)


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path, capsys):
    assert _local(capsys, tmp_path, "--set", "update_steps=10")[0] == 0
    for state in (tmp_path / "checkpoints").glob("update-*/state.npz"):
        state.write_bytes(b"")
    code, _, err = _local(capsys, tmp_path, "--set", "update_steps=20")
    assert code == 1
    [error] = [line for line in err.splitlines() if line.startswith("distaccum: error")]
    assert "no readable checkpoint" in error and "update-000000010" in error


def test_unwritable_checkpoint_directory_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "checkpoints").write_text("a file where the directory should be")
    code, out, err = _local(capsys, tmp_path, "--set", "update_steps=10")
    assert code == 2
    assert "checkpoint directory not writable" in err
    assert "update 1" not in out and not (tmp_path / "model.keras").exists()
