"""Figure 5, start-up: seconds from launch to first update, with set-up's bytecode and without.

The launch is stamped (`time.time()`, passed to the workers in an environment variable) just
before the process starts: `python workers.py startup` for one worker, `horovodrun --gloo -np 2`
for two. Each worker notes when its first update ends (an `on_update` callback); the figure is the
later worker's. It covers Python and TensorFlow imports, Horovod's rendezvous, data and model
set-up, the start-up broadcast and tracing both step functions, for the synthetic MLP with
micro-batch 32 and k = 4. Every process runs as in the pods, where Python may not write bytecode
(PYTHONDONTWRITEBYTECODE=1): once loading the `.pyc` files set-up compiled, once with none to
find (PYTHONPYCACHEPREFIX at an empty directory), so every process compiles each module it
imports, as it did before set-up compiled them. Runs alternate between the cases.
"""

from __future__ import annotations

import json
import tempfile
import time

import common

ACCUMULATION_STEPS = 4
FULL_WORKER_COUNTS = (1, 2)
SMOKE_WORKER_COUNTS = (1,)
COMPILED, SOURCE = "set-up's .pyc", "no .pyc"


def bytecode_environment(case: str, empty_directory: str) -> dict[str, str]:
    """Python's settings for one case: bytecode is never written, and found only if compiled."""
    found = {} if case == COMPILED else {"PYTHONPYCACHEPREFIX": empty_directory}
    return {"PYTHONDONTWRITEBYTECODE": "1", **found}


def measure_once(num_workers: int, bytecode: dict[str, str]) -> float:
    """Seconds from launch until every worker has done its first update."""
    with common.work_directory(f"startup-{num_workers}") as work:
        command = common.worker_command("startup", "--accumulation-steps", ACCUMULATION_STEPS,
                                        "--out", work, num_workers=num_workers)
        launched_at = {common.LAUNCHED_AT_VARIABLE: repr(time.time())}
        common.run_command(command, work / "workers.log", extra_env={**launched_at, **bytecode},
                           timeout=600)
        ranks = [json.loads(path.read_text()) for path in work.glob("rank*.json")]
    if len(ranks) != num_workers:
        raise common.BenchmarkError(
            f"{len(ranks)} of {num_workers} workers reported a first update")
    return max(rank["seconds"] for rank in ranks)


def label(num_workers: int, case: str) -> str:
    workers = f"{num_workers} worker{'s' * (num_workers > 1)}"
    return workers if case == COMPILED else f"{workers}, {case}"


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=3)
    counts = SMOKE_WORKER_COUNTS if args.smoke else FULL_WORKER_COUNTS
    cases = (COMPILED,) if args.smoke else (COMPILED, SOURCE)
    with tempfile.TemporaryDirectory(prefix="no-pyc-") as empty:
        runs = [{(n, case): measure_once(n, bytecode_environment(case, empty))
                 for n in counts for case in cases} for _ in range(args.repeats)]
    seconds = {key: common.summarize(run[key] for run in runs) for key in runs[0]}
    rows = [[n, *(seconds[n, case].format(1) for case in cases)] for n in counts]
    common.emit({
        "figure": "startup", "smoke": args.smoke,
        "title": "5. Start-up: launch to first update",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": common.markdown_table(
            ["workers", *(f"seconds to first update, {case}" for case in cases)], rows),
        "checks": [common.check(f"start-up, {label(n, case)}", "none set",
                                f"{seconds[n, case].format(1)} s", None)
                   for n in counts for case in cases],
        "plots": [{"kind": "bars", "title": "5. Start-up: launch to first update",
                   "ylabel": "seconds",
                   "bars": [{"label": label(n, case), **seconds[n, case].as_dict()}
                            for n in counts for case in cases]}],
    }, args.json)


if __name__ == "__main__":
    common.run_main("startup", main)
