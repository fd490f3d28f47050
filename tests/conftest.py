"""Shared fixtures: how tests launch real worker processes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
WORKERS_DIR = Path(__file__).resolve().parent / "workers"

# Open MPI refuses to run as root without these; harmless for other users.
MPI_ROOT_VARIABLES = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@pytest.fixture(autouse=os.environ.get("DISTACCUM_TEST_JIT_COMPILE") == "true")
def every_trainer_under_xla(monkeypatch):
    """launch/test.sh runs the tolerance tests once more with distaccum's own steps under XLA
    (DISTACCUM_TEST_JIT_COMPILE=true): every Trainer the test makes compiles them, whatever its
    jit_compile says."""
    from distaccum import xla

    resolve = xla.resolve_jit_compile
    monkeypatch.setattr(xla, "resolve_jit_compile", lambda model, _: resolve(model, True))


def remove_stale_open_mpi_session_dirs() -> None:
    """Open MPI's session directories of processes that are gone (`ompi.<pid>`, `prted.<pid>`).

    A killed `mpirun` or `prted` leaves its directory, named by its PID, behind. PIDs wrap (at
    32,768 on these machines), and a later `mpirun` that gets the same PID cannot bind its PMIx
    socket there: "The PMIx server's listener thread failed to start".
    """
    for path in Path(tempfile.gettempdir()).iterdir():
        found = re.fullmatch(r"(?:ompi|prted)\.(\d+)", path.name)
        if found and not psutil.pid_exists(int(found[1])):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_stale_open_mpi_session_dirs():
    """Before and after every test: tests that kill launchers leave their directories."""
    remove_stale_open_mpi_session_dirs()
    yield
    remove_stale_open_mpi_session_dirs()


def launcher_command(launcher: str, num_workers: int) -> list[str]:
    """The command prefix that starts `num_workers` copies of a Python script."""
    if launcher == "horovodrun":  # horovodrun's own launcher, minus its build check
        return [str(VENV_BIN / "python"), str(WORKERS_DIR / "horovodrun_gloo.py"), "--gloo",
                "-np", str(num_workers)]
    if launcher == "mpirun":
        # More ranks than cores (4 on a 2-core machine) need Open MPI's leave to oversubscribe.
        spare = [] if num_workers <= (os.cpu_count() or 1) else ["--map-by", ":OVERSUBSCRIBE"]
        return [str(VENV_BIN / "mpirun"), *spare, "-np", str(num_workers)]
    if launcher == "python":
        return []
    raise ValueError(launcher)


def worker_processes(process) -> dict[int, psutil.Process]:
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


def run_script(
    launcher: str,
    *python_arguments: str | Path,
    num_workers: int = 2,
    extra_env: dict | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run `python ARGS…` under a launcher (really starting the processes); fail with its output."""
    env = {**os.environ, **MPI_ROOT_VARIABLES, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.update(extra_env or {})
    command = [*launcher_command(launcher, num_workers), sys.executable, *map(str, python_arguments)]
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )
    if completed.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {completed.returncode}\n"
            f"stdout:\n{completed.stdout[-4000:]}\nstderr:\n{completed.stderr[-4000:]}"
        )
    return completed


@pytest.fixture(scope="session")
def keras_models_run(tmp_path_factory) -> Path:
    """One 2-worker launch of `workers/train_keras_models.py` (real Keras models, metrics and
    Keras callbacks), shared by the tests that read its files."""
    out = tmp_path_factory.mktemp("keras_models")
    run_script("horovodrun", WORKERS_DIR / "train_keras_models.py", "--out", str(out))
    return out
