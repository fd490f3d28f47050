"""Figure 8, preemption: seconds from SIGTERM to a complete checkpoint on disk, and to every
process of the job gone, for the synthetic config with 2 workers.

Each run is `distaccum train --config distaccum/configs/synthetic.yaml` as shipped (the 2.1 M
parameter MLP with Adam, 25 MB of state; micro-batch 32, global batch 256, so k = 4; 2 epochs of
26 updates), only its logdir set, on 2 workers: under `mpirun` (the mpi4py backend), under
`distaccum launch mpirun` (the same, its SIGTERM turned into the SIGUSR1 mpirun passes on), or
under `horovodrun --gloo` (the Horovod backend). Once rank 0 has logged update 10 (both step
functions traced) and a random 0–1 s more (so the signal lands anywhere in an update), SIGTERM
goes to rank 1 alone (one worker's node preempted), to the launcher alone, or to the launcher and
both ranks at once (Kubernetes stopping every pod of the job, each container's main process
signalled). From then on the script polls every 10 ms for (a) the checkpoint directory
`update-<step>` (it appears complete: written, fsynced, then renamed from its staging name;
afterwards its step is checked against the one the job reports stopping after, and its SHA-256
against its `meta.json`) and (b) every process of the job gone: the launcher and everything it
started (ranks, shells, Horovod's helpers), each exited or a zombie. A run that leaves no
checkpoint counts as failed whatever its times. Runs go through the cases in turn, repeat by
repeat; the machine is shared, so a median and its spread are shown.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

import common

CONFIG = common.REPO_ROOT / "distaccum" / "configs" / "synthetic.yaml"
DISTACCUM = common.PYTHON.parent / "distaccum"
NUM_WORKERS = 2
READY_LINE = "update 10/"  # the first progress line (log_interval 10): training is under way
MAX_DELAY = 1.0  # seconds after it, at random, before the signal
POLL_SECONDS = 0.01
TIMEOUT = 180.0  # for the start-up, and again for the stop
TARGET_SECONDS = 15.0  # GKE Spot's notice; cluster schedulers give ~30 s
STOPPED = re.compile(r"stopped by SIGTERM after update step (\d+)")
RANK = "rank 1"
LAUNCHER = "launcher"
EVERYONE = "launcher and both ranks"


@dataclass(frozen=True)
class Case:
    launcher: str  # a key of LAUNCHERS
    target: str  # RANK, LAUNCHER or EVERYONE

    @property
    def label(self) -> str:
        return f"{self.launcher}, SIGTERM to {self.target}"


LAUNCHERS = {
    "mpirun": ("mpi", [str(common.PYTHON.parent / "mpirun"), "-np", str(NUM_WORKERS)]),
    "distaccum launch mpirun": ("mpi", [str(DISTACCUM), "launch",
                                        str(common.PYTHON.parent / "mpirun"),
                                        "-np", str(NUM_WORKERS)]),
    "horovodrun --gloo": ("horovod", [str(common.PYTHON.parent / "horovodrun"), "--gloo",
                                      "-np", str(NUM_WORKERS)]),
}
FULL_CASES = (Case("mpirun", RANK), Case("mpirun", LAUNCHER), Case("mpirun", EVERYONE),
              Case("distaccum launch mpirun", LAUNCHER), Case("distaccum launch mpirun", EVERYONE),
              Case("horovodrun --gloo", RANK), Case("horovodrun --gloo", LAUNCHER),
              Case("horovodrun --gloo", EVERYONE))
SMOKE_CASES = (Case("distaccum launch mpirun", LAUNCHER),)
# Open MPI's mpirun answers its own SIGTERM with SIGTERM to the ranks 0.25 s later and SIGKILL
# 0.5 s later (PRRTE's odls, not configurable): shown, not judged against the target.
_KILLED = ("mpirun SIGKILLs its ranks 0.5 s after its own SIGTERM: the checkpoint races that "
           "kill{}; start mpirun under `distaccum launch`")
UNSUPPORTED = {
    Case("mpirun", LAUNCHER): _KILLED.format(" with 0.25 s from the ranks' SIGTERM"),
    Case("mpirun", EVERYONE): _KILLED.format(", and a larger model's loses it"),
}


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _ranks(processes: list[psutil.Process]) -> dict[int, psutil.Process]:
    """The workers among the launcher's descendants, by rank (from the launcher's variables)."""
    found = {}
    for process in processes:
        try:
            environ, command = process.environ(), " ".join(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rank = environ.get("HOROVOD_RANK") or environ.get("OMPI_COMM_WORLD_RANK")
        if rank is not None and "distaccum" in command:
            found[int(rank)] = process
    return found


def _wait_until_training(launcher: subprocess.Popen, log: Path) -> dict[int, psutil.Process]:
    """Block until the job logs READY_LINE and both ranks are found; the ranks."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        if launcher.poll() is not None:
            raise common.BenchmarkError(f"the job exited {launcher.returncode} before training "
                                        f"(output in {log})")
        if time.monotonic() > deadline:
            raise common.BenchmarkError(f"no `{READY_LINE}` within {TIMEOUT:.0f} s ({log})")
        if READY_LINE in log.read_text(errors="replace"):
            ranks = _ranks(psutil.Process(launcher.pid).children(recursive=True))
            if sorted(ranks) == list(range(NUM_WORKERS)):
                return ranks
        time.sleep(0.05)


def _signal(case: Case, launcher: subprocess.Popen, ranks: dict[int, psutil.Process]) -> None:
    if case.target in (LAUNCHER, EVERYONE):
        launcher.send_signal(signal.SIGTERM)
    if case.target == EVERYONE:
        for rank in ranks.values():
            rank.send_signal(signal.SIGTERM)
    if case.target == RANK:
        ranks[1].send_signal(signal.SIGTERM)


def _watch(launcher: subprocess.Popen, processes: list[psutil.Process], ranks: dict,
           checkpoints: Path, sent: float) -> dict:
    """Poll until every process is gone: seconds since `sent` of the first checkpoint seen, of
    the last rank gone and of the last process gone."""
    seen = {"checkpoint": None, "ranks": None, "all": None}
    while seen["all"] is None:
        now = time.monotonic() - sent
        if now > TIMEOUT:
            raise common.BenchmarkError(f"the job was still running {TIMEOUT:.0f} s after SIGTERM")
        if seen["checkpoint"] is None and any(checkpoints.glob("update-*")):
            seen["checkpoint"] = now
        if seen["ranks"] is None and all(_gone(p) for p in ranks.values()):
            seen["ranks"] = now
        if launcher.poll() is not None and all(_gone(p) for p in processes):
            seen["all"] = now
        time.sleep(POLL_SECONDS)
    return seen


def _checkpoint_complete(checkpoints: Path, step: int | None) -> bool:
    """The checkpoint written after the signal (the only one: `checkpoint_interval` is 100) says
    the step in its name, its state matches its SHA-256, and the step is the one the job reports
    stopping after (a job killed before it could say so is judged on the files alone)."""
    found = sorted(checkpoints.glob("update-*"))
    if len(found) != 1 or not (found[0] / "meta.json").exists():
        return False
    meta = json.loads((found[0] / "meta.json").read_text())
    saved = meta["position"]["update_step"]
    digest = hashlib.sha256((found[0] / "state.npz").read_bytes()).hexdigest()
    return (found[0].name == f"update-{saved:09d}" and digest == meta["sha256"]
            and step in (None, saved))


def measure_once(case: Case, work: Path, rng: random.Random) -> dict:
    """One run of `case`: the seconds watched for, the exit code, and whether the checkpoint is
    complete."""
    backend, prefix = LAUNCHERS[case.launcher]
    run = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    command = [*prefix, str(DISTACCUM), "train", "--config", str(CONFIG),
               "--set", f"logdir={run / 'logdir'}"]
    log = run / "job.log"
    with open(log, "w") as output:
        launcher = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, cwd=common.REPO_ROOT,
            env=common.worker_environment({"DISTACCUM_BACKEND": backend}),
            start_new_session=True)
    processes = []
    try:
        ranks = _wait_until_training(launcher, log)
        time.sleep(rng.uniform(0.0, MAX_DELAY))
        processes = psutil.Process(launcher.pid).children(recursive=True)
        sent = time.monotonic()
        _signal(case, launcher, ranks)
        seen = _watch(launcher, processes, ranks, run / "logdir" / "checkpoints", sent)
    finally:
        _end(launcher, processes)
    stopped = STOPPED.search(log.read_text(errors="replace"))
    step = int(stopped.group(1)) if stopped else None
    result = {**seen, "exit_code": launcher.returncode, "step": step,
              "complete": _checkpoint_complete(run / "logdir" / "checkpoints", step)}
    shutil.rmtree(run, ignore_errors=True)
    return result


def _end(launcher: subprocess.Popen, processes: list[psutil.Process]) -> None:
    """Whatever is still running after a failure: the launcher's group, then any process of
    the job that left it (Horovod's helpers start sessions of their own)."""
    common.stop_process_group(launcher)
    for process in processes:
        if not _gone(process):
            process.kill()


def summarize(case: Case, runs: list[dict]) -> dict:
    complete = sum(run["complete"] for run in runs)
    timed = [run for run in runs if run["checkpoint"] is not None]
    return {
        "case": case.label, "launcher": case.launcher, "target": case.target,
        "runs": len(runs), "complete": complete,
        "checkpoint": common.summarize(r["checkpoint"] for r in timed) if timed else None,
        "ranks": common.summarize(r["ranks"] for r in runs),
        "all": common.summarize(r["all"] for r in runs),
        "exit_codes": sorted({r["exit_code"] for r in runs}),
        "steps": [r["step"] for r in runs],
    }


def table(rows: list[dict]) -> str:
    def seconds(summary) -> str:
        return summary.format(2) if summary is not None else "none"

    return common.markdown_table(
        ["launcher (backend)", "SIGTERM to", "checkpoint on disk, s", "last rank gone, s",
         "every process gone, s", "complete checkpoints", "launcher's exit code"],
        [[f"{r['launcher']} ({LAUNCHERS[r['launcher']][0]})", r["target"],
          seconds(r["checkpoint"]), seconds(r["ranks"]), seconds(r["all"]),
          f"{r['complete']} of {r['runs']}", ", ".join(map(str, r["exit_codes"]))]
         for r in rows])


def checks(rows: list[dict], cases, smoke: bool) -> list[dict]:
    result = []
    for case, row in zip(cases, rows):
        every = row["complete"] == row["runs"]
        measured = (f"{row['all'].format(2)} s to every process gone, checkpoint at "
                    f"{row['checkpoint'].format(2)} s" if every else
                    f"no complete checkpoint in {row['runs'] - row['complete']} of {row['runs']} "
                    "runs")
        passed = every and row["all"].high <= TARGET_SECONDS
        judged = None if smoke or case in UNSUPPORTED else passed
        result.append(common.check(
            f"preemption, synthetic config, {NUM_WORKERS} workers, {case.label}: SIGTERM to a "
            "complete checkpoint and every process gone (largest run)",
            f"≤ {TARGET_SECONDS:.0f} s", measured, judged, UNSUPPORTED.get(case, "")))
    return result


def plots(rows: list[dict]) -> list[dict]:
    shown = [r for r in rows if r["complete"] == r["runs"]]
    return [{"kind": "bars", "title": "8. Preemption: SIGTERM to every process gone, 2 workers",
             "ylabel": "seconds",
             "bars": [{"label": r["case"], **r["all"].as_dict()} for r in shown]}]


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=3)
    cases = SMOKE_CASES if args.smoke else FULL_CASES
    rng = random.Random(8)
    with common.work_directory("preemption") as work:
        runs = [{case: measure_once(case, work, rng) for case in cases}
                for _ in range(args.repeats)]
    rows = [summarize(case, [run[case] for run in runs]) for case in cases]
    common.emit({
        "figure": "preemption", "smoke": args.smoke,
        "title": "8. Preemption: SIGTERM to checkpoint and exit",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": table(rows),
        "checks": checks(rows, cases, args.smoke),
        "plots": plots(rows),
        "runs": [{case.label: run[case] for case in cases} for run in runs],
    }, args.json)


if __name__ == "__main__":
    common.run_main("preemption", main)
