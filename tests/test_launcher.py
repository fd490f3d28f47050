"""`distaccum stop-ranks`, a worker pod's preStop hook: which processes it takes for ranks, its
one-line answers, and a real 2-rank job stopped by it in a container of its own (a PID
namespace, as a pod's is), with a checkpoint. `distaccum launch` is tested in test_cli.py and
benchmarks/preemption.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess

import psutil
import pytest

from conftest import REPO_ROOT, VENV_BIN, launcher_command
from distaccum import cli, launcher

SYNTHETIC = str(REPO_ROOT / "distaccum" / "configs" / "synthetic.yaml")
DISTACCUM = str(VENV_BIN / "distaccum")
# Each rank under a shell that writes its exit code to $0.<rank>: mpirun names only the first
# non-zero one, and SIGTERMs the other shells then (the trap lets them wait for their rank, which
# starts with SIGTERM's default action, as exec resets a trap).
REPORT_EXIT = 'trap : TERM; "$@"; code=$?; echo $code > "$0.$OMPI_COMM_WORLD_RANK"; exit $code'


@pytest.mark.parametrize("argv, expected", [
    (["/opt/distaccum/.venv/bin/python", "/opt/distaccum/.venv/bin/distaccum", "train",
      "--config", "/etc/distaccum/config.yaml"], True),
    (["distaccum", "train"], True),
    (["python3", "-m", "distaccum.cli", "train", "--set", "epochs=1"], True),
    (["python", "/venv/bin/distaccum", "launch", "mpirun", "distaccum", "train"], False),
    (["mpirun", "--hostfile", "/etc/mpi/hostfile", "distaccum", "train"], False),
    (["python", "/venv/bin/distaccum", "stop-ranks"], False),
    (["/usr/sbin/sshd", "-De", "-f", "/home/mpiuser/.sshd_config"], False),
    (["python", "train.py", "distaccum", "train"], False),
    ([], False),
], ids=["console_script", "direct", "module", "launch", "mpirun", "stop_ranks", "sshd",
        "other_script", "kernel_thread"])
def test_is_train_command_when_argv_varies(argv, expected):
    assert launcher.is_train_command(argv) is expected


def _fake_process(proc, pid: int, argv: list[str], state: str = "S") -> None:
    (proc / str(pid)).mkdir()
    (proc / str(pid) / "cmdline").write_bytes(b"".join(w.encode() + b"\0" for w in argv))
    # pid (comm) state, then fields 4..21, then the start time (field 22).
    fields = [state, *["0"] * 18, str(1000 + pid)]
    (proc / str(pid) / "stat").write_text(f"{pid} (a (b) c) {' '.join(fields)}\n")


def test_train_ranks_are_the_live_train_processes_when_proc_lists_a_container(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr(launcher, "PROC", tmp_path)
    _fake_process(tmp_path, 1, ["/usr/sbin/sshd", "-De"])
    _fake_process(tmp_path, 7, ["prted", "--leave-session-attached"])
    _fake_process(tmp_path, 8, ["python", "/venv/bin/distaccum", "train", "--config", "x.yaml"])
    _fake_process(tmp_path, 9, ["python", "/venv/bin/distaccum", "train"], state="Z")  # exited
    (tmp_path / "self").mkdir()
    assert launcher.train_ranks() == {8: "1008"}


def test_stop_ranks_exits_0_with_one_line_when_no_rank_runs_here(tmp_path, monkeypatch, capsys):
    # A /proc of a worker pod between jobs (sshd alone): nothing here may be signalled.
    monkeypatch.setattr(launcher, "PROC", tmp_path)
    _fake_process(tmp_path, 1, ["/usr/sbin/sshd", "-De"])
    assert cli.main(["stop-ranks", "--timeout", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ("distaccum: stop-ranks: no `distaccum train` process running here, "
                            "nothing to stop\n") and captured.err == ""


@pytest.mark.parametrize("arguments, expected", [
    (["--timeout", "0"], "--timeout must be a number of seconds > 0. Received: --timeout=0.0"),
    (["--timeout", "-3"], "--timeout must be a number of seconds > 0. Received: --timeout=-3.0"),
    (["--timeout", "inf"], "--timeout must be a number of seconds > 0. Received: --timeout=inf"),
    (["--timeout", "soon"], "argument --timeout: invalid float value: 'soon'"),
    (["--pid", "12"], "unrecognized arguments: --pid 12"),
], ids=["zero", "negative", "infinite", "not_a_number", "unknown_option"])
def test_stop_ranks_exits_2_with_one_line_when_arguments_are_bad(arguments, expected):
    # In a process of its own: the arguments are refused before /proc is read.
    completed = subprocess.run([DISTACCUM, "stop-ranks", *arguments], capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.count("\n") == 1 and expected in completed.stderr, completed.stderr


def _ranks(job: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for process in psutil.Process(job.pid).children(recursive=True):
        try:
            if launcher.is_train_command(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.multiworker
def test_stop_ranks_stops_the_job_with_a_checkpoint_when_run_as_the_prestop_hook(tmp_path):
    # The pod's container is a PID namespace: mpirun and its ranks in one, stop-ranks entering it
    # as the kubelet's exec does, so that no other process of this machine can be signalled.
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")):
        pytest.skip("a PID namespace needs root, unshare and nsenter")
    from test_reliability import _environment, _wait_for

    logdir, log = tmp_path / "logdir", tmp_path / "job.log"
    # The namespace's first process outlives mpirun, as a worker pod's sshd does: when the first
    # process ends, the kernel kills every other in the namespace, stop-ranks too (under load it
    # was killed before it could report, 1 CI run in 5).
    command = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
               "sh", "-c", '"$@"; code=$?; sleep 5; exit $code', "init",
               *launcher_command("mpirun", 2), "sh", "-c", REPORT_EXIT, str(tmp_path / "exit-code"),
               DISTACCUM, "train", "--config", SYNTHETIC,
               "--set", f"logdir={logdir}", "--set", "checkpoint_interval=1000"]
    env = {**_environment(), "DISTACCUM_BACKEND": "mpi", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as output:
        job = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    try:
        _wait_for(lambda: "update 10/" in log.read_text(errors="replace"), job)
        ranks = _ranks(job)
        assert len(ranks) == 2
        [init] = psutil.Process(job.pid).children()
        stop = subprocess.run(["nsenter", "--target", str(init.pid), "--pid", "--mount",
                               DISTACCUM, "stop-ranks", "--timeout", "60"],
                              capture_output=True, text=True, timeout=120, env=env)
        ranks_gone = all(_gone(rank) for rank in ranks)
        code = job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert stop.returncode == 0 and stop.stderr == "", stop.stderr
    assert re.fullmatch(r"distaccum: stop-ranks: 2 `distaccum train` processes stopped "
                        r"[\d.]+ s after SIGTERM: \d+, \d+\n", stop.stdout), stop.stdout
    assert ranks_gone  # when stop-ranks returned: the kubelet may then SIGTERM sshd
    assert code != 0, text[-3000:]
    assert [(tmp_path / f"exit-code.{rank}").read_text() for rank in (0, 1)] == ["143\n"] * 2
    stopped = re.search(r"stopped by SIGTERM after update step (\d+)", text)
    assert stopped, text[-3000:]
    [checkpoint] = (logdir / "checkpoints").glob("update-*")
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["position"]["update_step"] == int(stopped.group(1)) >= 10
