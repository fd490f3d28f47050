"""What every benchmark script shares: the command line, starting workers, statistics, output.

Nothing here imports TensorFlow: the figure scripts only start measured processes and summarise
what those write, so they should not pay TensorFlow's import time and memory themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
WORKERS_SCRIPT = BENCHMARKS_DIR / "workers.py"
# Each figure's latest full run (`run.sh`, or a script run with `--json` into it): the one source
# of the figures that `report.py` turns into results.md, results.png and the README's targets.
RESULTS_DIR = BENCHMARKS_DIR / "results"
# Failed runs keep their logs here (git-ignored); successful runs leave nothing behind.
WORK_ROOT = BENCHMARKS_DIR / ".work"
PYTHON = Path(sys.executable)
# Open MPI refuses to start as root without both; harmless for other users.
MPI_ROOT_VARIABLES = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
CHIEF_RESULT = "result.json"
START_UP_RESULT = "start-up.json"  # the overhead figure's seconds to the first update
MICRO_BATCH_SIZE = 32
# The data figure's Parquet row groups: rows of one 32×32×3 image each (3 KB), so 3 MB.
TABLE_ROW_GROUP = 1000
# A command to run instead of `horovodrun` (words split as a shell would): the test suite's smoke
# runs name horovodrun's own launcher without its build check (tests/workers/horovodrun_gloo.py),
# which costs a TensorFlow import per launch. Unset, as `run.sh` leaves it: `horovodrun`.
HOROVODRUN_VARIABLE = "DISTACCUM_BENCH_HOROVODRUN"
# The ways of training the slow-link figure compares (workers.py runs them).
DISTACCUM = "distaccum"
DISTACCUM_BFLOAT16 = "distaccum_bfloat16"  # gradient sums travel as bfloat16 (mpi4py backend)
ALLREDUCE_EVERY_MICRO_BATCH = "allreduce_every_micro_batch"  # baseline (a)
NO_COMMUNICATION = "no_communication"  # baseline (b), the compute limit
# startup.py puts time.time() here just before it launches; the workers subtract it.
LAUNCHED_AT_VARIABLE = "DISTACCUM_BENCH_LAUNCHED_AT"


class BenchmarkError(Exception):
    """A benchmark could not produce its figure; the message is the one line the user sees."""


def parse_arguments(description: str, *, default_repeats: int | None,
                    flags: dict[str, str] | None = None) -> argparse.Namespace:
    """`--smoke` (a tiny run proving the script works), `--json FILE`, and `--repeats N` for
    figures that take a median over runs (`default_repeats=None` for exact counts); `flags`: a
    script's own on/off options, by name with their help."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run, for the test suite")
    parser.add_argument("--json", type=Path, help="also write the figure as JSON for report.py")
    if default_repeats is not None:
        parser.add_argument("--repeats", type=positive_int, default=default_repeats,
                            help=f"runs to take the median of (default {default_repeats})")
    for flag, help_text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=help_text)
    return parser.parse_args()


def positive_int(text: str) -> int:
    """argparse type: an int >= 1, refused with one clear line otherwise."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Received: {text!r}")
    return int(text)


def run_main(name: str, main) -> None:
    """Run `main()`; a `BenchmarkError` becomes one line on stderr and exit status 1.

    SIGTERM is turned into SystemExit so `finally` blocks (network namespace clean-up) still run.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        main()
    except BenchmarkError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(1)


# Open MPI between two ranks on one host would use shared memory and bypass the rate-limited
# loopback; TCP over `lo` (which Open MPI leaves out by default) is what Gloo uses too.
MPIRUN_OVER_LOOPBACK = ("--mca", "pml", "ob1", "--mca", "btl", "tcp,self",
                        "--mca", "btl_tcp_if_include", "lo")


def worker_command(subcommand: str, *arguments, num_workers: int = 1,
                   launcher: str = "horovodrun") -> list[str]:
    """`python workers.py SUBCOMMAND ARGS`; for more than one worker under `horovodrun --gloo`,
    or under `mpirun` over TCP on the loopback (run it with `DISTACCUM_BACKEND=mpi`)."""
    command = [str(PYTHON), str(WORKERS_SCRIPT), subcommand, *map(str, arguments)]
    if num_workers == 1:
        return command
    if launcher == "mpirun":
        # More workers than cores (4 on a 2-core machine) only when asked for: Open MPI refuses
        # to oversubscribe by default.
        oversubscribe = ["--oversubscribe"] if num_workers > len(os.sched_getaffinity(0)) else []
        return [str(PYTHON.parent / "mpirun"), "-np", str(num_workers), *oversubscribe,
                *MPIRUN_OVER_LOOPBACK, *command]
    return [*horovodrun(), "--gloo", "-np", str(num_workers), *command]


def horovodrun() -> list[str]:
    """`horovodrun`, or the command `HOROVODRUN_VARIABLE` names instead."""
    return (shlex.split(os.environ.get(HOROVODRUN_VARIABLE, ""))
            or [str(PYTHON.parent / "horovodrun")])


def worker_environment(extra_env: dict | None = None) -> dict[str, str]:
    """The caller's environment plus what launchers need, with TensorFlow's start-up chatter off."""
    env = {**os.environ, **MPI_ROOT_VARIABLES, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PATH"] = f"{PYTHON.parent}:{env.get('PATH', '')}"
    env.update(extra_env or {})
    return env


def run_command(command: list[str], log: Path, *, extra_env=None, timeout: float = 1800) -> None:
    """Run `command` with its output in `log`; raise a one-line `BenchmarkError` if it fails.

    The command gets its own process group: on a timeout, or when this script is stopped, the
    launcher and its workers are stopped with it instead of running on unseen.
    """
    with open(log, "a") as output:
        output.write(f"$ {' '.join(command)}\n")
        output.flush()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   env=worker_environment(extra_env), cwd=REPO_ROOT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"`{short(command)}` timed out after {timeout:.0f} s "
                                 f"(output in {log})") from None
        finally:
            stop_process_group(process)
    if returncode != 0:
        raise BenchmarkError(f"`{short(command)}` exited {returncode}: "
                             f"{last_error_line(log.read_text())} (output in {log})")


def stop_process_group(process: subprocess.Popen) -> None:
    """End a still running command's process group: SIGTERM first, so horovodrun can stop its
    workers, then SIGKILL after a grace period."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def short(command: list[str]) -> str:
    """The command with programs and scripts by their file names, for error messages."""
    return " ".join(Path(part).name if "/" in part else part for part in command)


def last_error_line(output: str) -> str:
    """The line that says what went wrong: the last one naming an error, else the last line."""
    lines = [line.split(">:", 1)[-1].strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1]


@contextlib.contextmanager
def work_directory(name: str):
    """A fresh directory for one script's worker outputs; removed only if the script succeeds,
    so a failure's logs stay for reading."""
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=WORK_ROOT))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def read_json(path: Path):
    """A JSON result; a missing file means the process meant to write it died first."""
    if not path.exists():
        raise BenchmarkError(f"{path} is missing: the process that writes it did not finish")
    return json.loads(path.read_text())


def timeline_path(directory: Path, accumulation_steps: int) -> Path:
    """Where the communication worker records Horovod's timeline for one k."""
    return Path(directory) / f"timeline-k{accumulation_steps}.json"


@dataclass(frozen=True)
class Summary:
    """The median of several runs and its spread (the smallest and largest run)."""

    median: float
    low: float
    high: float
    runs: int

    def format(self, digits: int = 0) -> str:
        """`median (low–high)`, or just the value for a single run."""
        values = [f"{v:,.{digits}f}" for v in (self.median, self.low, self.high)]
        return values[0] if self.runs == 1 else f"{values[0]} ({values[1]}–{values[2]})"

    def as_dict(self) -> dict:
        return {"median": self.median, "low": self.low, "high": self.high, "runs": self.runs}


def summarize(values) -> Summary:
    values = list(values)
    return Summary(statistics.median(values), min(values), max(values), len(values))


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def check(claim: str, target: str, measured: str, passed: bool | None, note: str = "") -> dict:
    """One target of the issue with what was measured; `passed=None` when there is no target
    or it is not judged (smoke runs, skipped figures)."""
    return {"claim": claim, "target": target, "measured": measured, "passed": passed, "note": note}


def verdict(passed: bool | None) -> str:
    """pass / FAIL, or a dash for a figure with no target or not judged (smoke runs)."""
    return {True: "pass", False: "**FAIL**", None: "—"}[passed]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    """What the numbers depend on: cores, CPU, memory and the versions of the moving parts."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:  # the cpu variant's distribution, else the gpu variant's
        tensorflow = "tensorflow-cpu"
        importlib.metadata.version(tensorflow)
    except importlib.metadata.PackageNotFoundError:
        tensorflow = "tensorflow"
    versions = ", ".join(f"{name} {_version(package)}" for name, package in
                         ((f"TensorFlow ({tensorflow})", tensorflow), ("Keras", "keras"),
                          ("Horovod", "horovod")))
    return (f"{len(os.sched_getaffinity(0))} cores (`nproc`), {cpu_model()}, "
            f"{memory_gib:.0f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {versions}")


def emit(figure: dict, json_path: Path | None) -> None:
    """Print the figure (its table and targets) and write it as JSON for `report.py`, stamped
    with when and where it was measured."""
    figure = {**figure, "date": datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC"), "machine": machine()}
    print(f"## {figure['title']}\n\n{figure['how']}\n\n{figure['table']}\n")
    for item in figure["checks"]:
        line = f"target: {item['claim']} {item['target']}: {item['measured']} -> "
        print(line + verdict(item["passed"]) + (f" ({item['note']})" if item["note"] else ""))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(figure, indent=1))
