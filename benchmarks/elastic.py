"""Figure 9, elastic in place: seconds a change of worker count costs the job, in place under
`horovodrun`'s elastic mode against a stop and a resume on the new count.

Each run is `distaccum train --config distaccum/configs/synthetic.yaml` (the 2.1 M parameter MLP
with Adam; micro-batch 32, global batch 256), `epochs=6`, `log_interval=1` (rank 0 prints every
update, each line stamped here as it arrives), under `horovodrun --gloo` with two hosts on this
machine, `localhost` and `127.0.0.1`. **In place**: one elastic job (`--min-np 1 --max-np 2`,
a discovery script printing a file this script rewrites) goes 2 → 1 (rank 1's host taken out of
the file) after update 20, back 1 → 2 (the host put back: a new process starts and joins) 10
updates after it regrouped, then loses rank 1 to SIGKILL (its host comes back after
`--blacklist-cooldown-range 1 2`, not counted) 10 updates after that. **Stop and resume**: a
fixed job on 2 workers is stopped with SIGTERM to `horovodrun` after update 20 (every rank
finishes the update, rank 0 checkpoints, all exit), and the same command on 1 worker resumes
it; 10 updates later the same from 1 to 2. A change's cost is the time between the last update before it
and the first after it, less the median time between updates around it (what that update took
anyway). Stop and resume loses no update to a planned stop; a failure there would also lose the
updates since the last checkpoint, which in place are never lost. The machine is shared, so a
median and its spread are shown.
"""

from __future__ import annotations

import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

import psutil

import common

CONFIG = common.REPO_ROOT / "distaccum" / "configs" / "synthetic.yaml"
DISTACCUM = common.PYTHON.parent / "distaccum"
HOSTS = ("localhost", "127.0.0.1")
UPDATE = re.compile(r"update (\d+)/(\d+)")
REGROUPED = re.compile(r"distaccum: (\d) → (\d) workers after update step (\d+)")
LEAVE, JOIN, KILLED = "2 → 1, a host leaves", "1 → 2, a host joins", "2 → 1, rank 1 SIGKILLed"
STOP_LEAVE, STOP_JOIN = "2 → 1, stop and resume", "1 → 2, stop and resume"
TIMEOUT = 300.0


class Job:
    """A launched job whose output lines are stamped with the time they arrive."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.lines: list[tuple[float, str]] = []
        self._log = log.open("w")
        self._arrived = threading.Condition()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, cwd=common.REPO_ROOT, start_new_session=True,
                                        env=common.worker_environment({"PYTHONUNBUFFERED": "1"}))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._log.write(line)
            with self._arrived:
                self.lines.append((time.monotonic(), line))
                self._arrived.notify_all()

    def wait_for(self, pattern: re.Pattern, test=lambda match: True) -> re.Match:
        deadline = time.monotonic() + TIMEOUT
        seen = 0
        with self._arrived:
            while True:
                for _, line in self.lines[seen:]:
                    match = pattern.search(line)
                    if match and test(match):
                        return match
                seen = len(self.lines)
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise common.BenchmarkError(
                        f"no line matching {pattern.pattern!r} (output in {self._log.name})")
                self._arrived.wait(1)

    def update_times(self) -> dict[int, float]:
        """When rank 0 printed each update (the last print of a step: after a regroup that
        went back, the update as finally applied)."""
        return {int(m.group(1)): t for t, line in self.lines if (m := UPDATE.search(line))}

    def finish(self) -> int:
        try:
            code = self.process.wait(timeout=TIMEOUT)
        finally:
            common.stop_process_group(self.process)
        time.sleep(0.2)
        self._log.close()
        return code

    def worker(self, launched_rank: int) -> psutil.Process:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "train" in child.cmdline() and \
                        child.environ().get("HOROVOD_RANK") == str(launched_rank):
                    return child
            except psutil.NoSuchProcess:
                continue
        raise common.BenchmarkError(f"no worker launched as rank {launched_rank}")


def _train(logdir: Path, epochs: int) -> list[str]:
    return [str(DISTACCUM), "train", "--config", str(CONFIG), "--set", f"logdir={logdir}",
            "--set", f"epochs={epochs}", "--set", "log_interval=1"]


def cost(times: dict[int, float], before: int) -> float:
    """Seconds between update `before` and the next, less the median gap around them."""
    gaps = [times[u + 1] - times[u] for u in range(before - 6, before + 7)
            if u != before and u in times and u + 1 in times]
    return times[before + 1] - times[before] - statistics.median(gaps)


def in_place(work: Path, epochs: int, first: int) -> dict[str, float]:
    hosts = work / "hosts"
    hosts.write_text("".join(f"{host}:1\n" for host in HOSTS))
    discovery = work / "discover_hosts.sh"
    discovery.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discovery.chmod(0o755)
    job = Job([*common.horovodrun(), "--gloo", "-np", "2", "--min-np", "1", "--max-np", "2",
               "--host-discovery-script", str(discovery), "--blacklist-cooldown-range", "1", "2",
               *_train(work / "elastic", epochs)], work / "elastic.log")
    changes = {}
    try:
        job.wait_for(UPDATE, lambda m: int(m.group(1)) >= first)
        leaving = job.worker(1).environ()["HOROVOD_HOSTNAME"]
        hosts.write_text("".join(f"{host}:1\n" for host in HOSTS if host != leaving))
        left = int(job.wait_for(REGROUPED, lambda m: m.group(1) == "2").group(3))
        job.wait_for(UPDATE, lambda m: int(m.group(1)) >= left + first // 2)
        hosts.write_text("".join(f"{host}:1\n" for host in HOSTS))
        joined = int(job.wait_for(REGROUPED, lambda m: m.group(2) == "2").group(3))
        job.wait_for(UPDATE, lambda m: int(m.group(1)) >= joined + first // 2)
        job.worker(1).send_signal(signal.SIGKILL)
        killed = int(job.wait_for(REGROUPED, lambda m: int(m.group(3)) > joined
                                  and m.group(2) == "1").group(3))
        changes = {LEAVE: left, JOIN: joined, KILLED: killed}
    finally:
        code = job.finish()
    if code != 0:
        raise common.BenchmarkError(f"the elastic job exited {code} (output in {work}/elastic.log)")
    times = job.update_times()
    return {change: cost(times, step) for change, step in changes.items()}


def stop_and_resume(work: Path, epochs: int, first: int) -> dict[str, float]:
    """2 workers stopped after update `first`, resumed on 1, stopped again, resumed on 2."""
    logdir = work / "resumed"
    stages = []
    for workers in (2, 1, 2):
        command = _train(logdir, epochs)
        if workers > 1:
            command = [*common.horovodrun(), "--gloo", "-np", str(workers), *command]
        job = Job(command, work / f"stage-{len(stages)}-{workers}.log")
        stop_after = max(stages[-1]) + first // 2 if stages else first
        try:
            job.wait_for(UPDATE, lambda m: int(m.group(1)) >= stop_after)
            job.process.send_signal(signal.SIGTERM)  # horovodrun passes it on to the ranks
        finally:
            job.finish()
        stages.append(job.update_times())
    results = {}
    for change, (stopped, resumed) in zip((STOP_LEAVE, STOP_JOIN), zip(stages, stages[1:])):
        last = max(stopped)
        gaps = [stopped[u + 1] - stopped[u] for u in range(last - 6, last) if u in stopped]
        gaps += [resumed[u + 1] - resumed[u] for u in range(last + 1, last + 6)
                 if u + 1 in resumed]
        results[change] = resumed[last + 1] - stopped[last] - statistics.median(gaps)
    return results


def table(rows: dict[str, common.Summary]) -> str:
    return common.markdown_table(
        ["change", "how", "seconds lost, median (low–high)"],
        [[change.split(", ", 1)[0], change.split(", ", 1)[1], summary.format(1)]
         for change, summary in rows.items()])


def checks(rows: dict, smoke: bool) -> list[dict]:
    result = []
    for in_place_change, stopped in ((LEAVE, STOP_LEAVE), (JOIN, STOP_JOIN),
                                     (KILLED, STOP_LEAVE)):
        mine, theirs = rows[in_place_change], rows[stopped]
        result.append(common.check(
            f"elastic in place, synthetic config: {in_place_change}, seconds lost (median) "
            f"against a stop and resume ({stopped.split(',')[0]})",
            f"< {theirs.median:.1f} s", f"{mine.median:.1f} s",
            None if smoke else mine.median < theirs.median))
    return result


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=2)
    epochs, first = (2, 8) if args.smoke else (6, 20)
    runs = []
    with common.work_directory("elastic") as work:
        for repeat in range(args.repeats):
            directory = work / f"run-{repeat}"
            directory.mkdir()
            runs.append({**in_place(directory, epochs, first),
                         **stop_and_resume(directory, epochs, first)})
            shutil.rmtree(directory / "resumed", ignore_errors=True)
    rows = {change: common.summarize(run[change] for run in runs)
            for change in (LEAVE, JOIN, KILLED, STOP_LEAVE, STOP_JOIN)}
    common.emit({
        "figure": "elastic", "smoke": args.smoke,
        "title": "9. Elastic in place: seconds lost per change of worker count",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": table(rows),
        "checks": checks(rows, args.smoke),
        "plots": [{"kind": "bars", "title": "9. Seconds lost per change of worker count",
                   "ylabel": "seconds",
                   "bars": [{"label": change, **summary.as_dict()}
                            for change, summary in rows.items()]}],
        "runs": runs,
    }, args.json)


if __name__ == "__main__":
    common.run_main("elastic", main)
