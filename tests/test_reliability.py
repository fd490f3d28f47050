"""Reliability with real processes and real signals: SIGTERM then resume (exact), SIGKILL of a
worker (no hang), NaN on one rank (same skip everywhere), damaged checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator

from distaccum import cli
from conftest import MPI_ROOT_VARIABLES, REPO_ROOT, VENV_BIN, WORKERS_DIR, launcher_command, run_script

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


def _workers(process) -> dict[int, psutil.Process]:
    """The launcher's worker processes by rank (read from the variables the launcher set)."""
    found = {}
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            environ = child.environ()
            if "distaccum" not in " ".join(child.cmdline()):
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rank = environ.get("HOROVOD_RANK") or environ.get("OMPI_COMM_WORLD_RANK")
        if rank is not None:
            found[int(rank)] = child
    return found


def _finish(process, output, timeout: float = 240) -> tuple[int, str]:
    code = process.wait(timeout=timeout)
    output.seek(0)
    return code, output.read()


def _run_interrupted_at(launcher: str, backend: str, logdir: Path, after_checkpoint: int) -> str:
    """Start (or resume) the job; once checkpoint `after_checkpoint` exists, SIGTERM rank 1 only."""
    process, output = _start(launcher, logdir, *_SCHEDULE, backend=backend)
    marker = logdir / "checkpoints" / f"update-{after_checkpoint:09d}"
    _wait_for(marker.exists, process)
    _workers(process)[1].send_signal(signal.SIGTERM)
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


@pytest.mark.parametrize("launcher, backend", BACKENDS)
def test_resumed_run_equals_uninterrupted_run_when_sigterm_twice(tmp_path, launcher, backend):
    reference = tmp_path / "uninterrupted"
    process, output = _start(launcher, reference, *_SCHEDULE, backend=backend)
    code, text = _finish(process, output)
    assert code == 0, text[-3000:]

    resumed = tmp_path / "resumed"
    _run_interrupted_at(launcher, backend, resumed, after_checkpoint=10)
    second = _run_interrupted_at(launcher, backend, resumed, after_checkpoint=40)
    assert "resuming after update step" in second
    process, output = _start(launcher, resumed, *_SCHEDULE, backend=backend)
    code, text = _finish(process, output)
    assert code == 0, text[-3000:]
    assert f"distaccum: done: {TOTAL_UPDATES} update steps" in text

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
    workers = _workers(process)
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
