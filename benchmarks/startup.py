"""Figure 5, start-up: seconds from launch to the first update, with 1 and 2 workers.

The launch is stamped (`time.time()`, passed to the workers in an environment variable) just
before the process starts: `python workers.py startup` for one worker, `horovodrun --gloo -np 2`
for two. Each worker notes when its first update ends (an `on_update` callback); the figure is the
later worker's. It covers Python and TensorFlow imports, Horovod's rendezvous, data and model
set-up, the start-up broadcast and tracing both step functions, for the synthetic MLP with
micro-batch 32 and k = 4. Runs alternate between 1 and 2 workers.
"""

from __future__ import annotations

import json
import time

import common

ACCUMULATION_STEPS = 4
FULL_WORKER_COUNTS = (1, 2)
SMOKE_WORKER_COUNTS = (1,)


def measure_once(num_workers: int) -> float:
    """Seconds from launch until every worker has done its first update."""
    with common.work_directory(f"startup-{num_workers}") as work:
        command = common.worker_command("startup", "--accumulation-steps", ACCUMULATION_STEPS,
                                        "--out", work, num_workers=num_workers)
        launched_at = {common.LAUNCHED_AT_VARIABLE: repr(time.time())}
        common.run_command(command, work / "workers.log", extra_env=launched_at, timeout=600)
        ranks = [json.loads(path.read_text()) for path in work.glob("rank*.json")]
    if len(ranks) != num_workers:
        raise common.BenchmarkError(
            f"{len(ranks)} of {num_workers} workers reported a first update")
    return max(rank["seconds"] for rank in ranks)


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=3)
    counts = SMOKE_WORKER_COUNTS if args.smoke else FULL_WORKER_COUNTS
    runs = [{n: measure_once(n) for n in counts} for _ in range(args.repeats)]
    seconds = {n: common.summarize(run[n] for run in runs) for n in counts}
    rows = [[n, seconds[n].format(1)] for n in counts]
    common.emit({
        "figure": "startup", "smoke": args.smoke,
        "title": "5. Start-up: launch to first update",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": common.markdown_table(["workers", "seconds to first update"], rows),
        "checks": [common.check(f"start-up, {n} worker{'s' * (n > 1)}", "none set",
                                f"{seconds[n].format(1)} s", None) for n in counts],
        "plots": [{"kind": "bars", "title": "5. Start-up: launch to first update",
                   "ylabel": "seconds",
                   "bars": [{"label": f"{n} worker{'s' * (n > 1)}", **seconds[n].as_dict()}
                            for n in counts]}],
    }, args.json)


if __name__ == "__main__":
    common.run_main("startup", main)
