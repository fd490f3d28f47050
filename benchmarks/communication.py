"""Figure 1, communication: allreduces and bytes per 1,000 samples for each k, from the timeline.

Two workers under `horovodrun --gloo`, micro-batch 32, the synthetic ≈2.1 M-parameter MLP; every
k trains the same number of micro-batches per worker while Horovod records its timeline
(`HOROVOD_TIMELINE=DYNAMIC`, one file per k). Operations and bytes are read from that timeline, not
computed from distaccum's own bookkeeping: counts are exact, so one run suffices.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

import common
from distaccum.timeline import collective_counts, load_events

FULL_ACCUMULATION_STEPS = (1, 2, 4, 8, 16)
SMOKE_ACCUMULATION_STEPS = (1, 2)
# Per worker, for every k: divisible by every k, so each run is whole windows of equal samples.
FULL_MICRO_BATCHES = 64
SMOKE_MICRO_BATCHES = 4
# distaccum's update step is one grouped allreduce; Horovod names its rows after the group.
GROUPED_ROW_PREFIX = "HorovodGroupedAllreduce"
# The worker brackets each k's run with two barriers (one collective each) of its own.
BENCHMARK_BARRIERS = 2
# What else distaccum may run in one `fit`: its agreement on the number of updates.
OTHER_COLLECTIVES_PER_FIT = 1


@dataclass(frozen=True)
class Traffic:
    """Grouped allreduces in one timeline (how many ran, over how many tensors, how many bytes)
    and how many other collectives distaccum ran (the benchmark's own barriers left out)."""

    collectives: int
    tensors_per_collective: int
    bytes: int
    other_collectives: int


def tensor_bytes(args: dict) -> int:
    """Bytes of the tensor an activity's end event describes (`{"dtype", "shape": "[a, b]"}`)."""
    return math.prod(json.loads(args["shape"])) * np.dtype(args["dtype"]).itemsize


def allreduce_traffic(path: Path) -> Traffic:
    """Count the collectives (every tensor row of a group runs once per grouped allreduce)."""
    events = load_events(path)
    rows = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
            and e["args"].get("name", "").startswith(GROUPED_ROW_PREFIX)}
    open_activities: dict[int, list[str]] = {row: [] for row in rows}
    per_row, total_bytes = Counter(), 0
    for event in (e for e in events if e.get("pid") in rows):
        if event["ph"] == "B":
            open_activities[event["pid"]].append(event["name"])
        elif event["ph"] == "E" and open_activities[event["pid"]].pop() == "ALLREDUCE":
            per_row[event["pid"]] += 1
            total_bytes += tensor_bytes(event["args"])
    if len(set(per_row.values())) != 1:
        raise common.BenchmarkError(f"{path}: tensor rows of the group ran unequally often: "
                                    f"{sorted(set(per_row.values()))}")
    others = sum(sum(c.values()) for name, c in collective_counts(path).items()
                 if not name.startswith(GROUPED_ROW_PREFIX))
    return Traffic(next(iter(per_row.values())), len(per_row), total_bytes,
                   others - BENCHMARK_BARRIERS)


def measure(accumulation_steps, micro_batches: int) -> list[dict]:
    """Run both workers once over every k; return per k its updates, samples and traffic."""
    with common.work_directory("communication") as work:
        command = common.worker_command(
            "communication", "--accumulation-steps", *accumulation_steps,
            "--micro-batches", micro_batches, "--out", work, num_workers=2)
        common.run_command(command, work / "workers.log",
                           extra_env={"HOROVOD_TIMELINE": "DYNAMIC"}, timeout=900)
        runs = common.read_json(work / common.CHIEF_RESULT)
        for run in runs:
            run["traffic"] = allreduce_traffic(common.timeline_path(work, run["k"]))
    return runs


def per_thousand_samples(run: dict) -> tuple[Fraction, Fraction]:
    """(allreduces, bytes) per 1,000 samples, as exact fractions."""
    traffic = run["traffic"]
    return (Fraction(traffic.collectives * 1000, run["samples"]),
            Fraction(traffic.bytes * 1000, run["samples"]))


def times_k_over_base(value: Fraction, k: int, base: Fraction) -> str:
    """`value × k ÷ base`: exactly 1 when the figure scales as 1/k."""
    ratio = value * k / base
    return "1 (exact)" if ratio == 1 else f"{float(ratio):.6f}"


def table(runs: list[dict]) -> str:
    base_ops, base_bytes = per_thousand_samples(runs[0])
    rows = []
    for run in runs:
        ops, volume = per_thousand_samples(run)
        traffic = run["traffic"]
        rows.append([
            run["k"], run["updates"], f"{run['samples']:,}", traffic.collectives,
            traffic.tensors_per_collective, traffic.other_collectives,
            f"{float(ops):.3f}", f"{float(volume) / 1e6:.2f}",
            times_k_over_base(ops, run["k"], base_ops),
            times_k_over_base(volume, run["k"], base_bytes),
        ])
    return common.markdown_table(
        ["k", "updates", "samples", "grouped allreduces", "tensors each", "other collectives",
         "allreduces / 1,000 samples", "MB / 1,000 samples",
         "allreduces × k ÷ k=1", "bytes × k ÷ k=1"], rows)


def checks(runs: list[dict]) -> list[dict]:
    """One grouped allreduce per update (none per micro-step), and exact 1/k scaling."""
    one_per_update = all(r["traffic"].collectives == r["updates"]
                         and r["traffic"].other_collectives <= OTHER_COLLECTIVES_PER_FIT
                         for r in runs)
    base = per_thousand_samples(runs[0])
    exact = all(tuple(v * r["k"] for v in per_thousand_samples(r)) == base for r in runs)
    ks = ", ".join(str(r["k"]) for r in runs)
    return [
        common.check("communication: collectives per run",
                     "one grouped allreduce per update, one other per fit, none per micro-step",
                     f"so for k = {ks}" if one_per_update else "not so: see the table",
                     one_per_update),
        common.check("communication: allreduces and bytes per 1,000 samples", "exactly 1/k",
                     "exactly 1/k" if exact else "not 1/k", exact),
    ]


def plot(runs: list[dict]) -> dict:
    ks = [r["k"] for r in runs]
    ops, volume = zip(*(per_thousand_samples(r) for r in runs))
    ideal = [float(volume[0]) / 1e6 / k for k in ks]
    series = [("allreduces / 1,000 samples", [float(v) for v in ops], "o-"),
              ("MB / 1,000 samples", [float(v) / 1e6 for v in volume], "s-"),
              ("1/k from k=1 (MB)", ideal, "k:")]
    return {"kind": "lines", "title": "1. Communication (2 workers)", "xlabel": "k",
            "ylabel": "per 1,000 samples", "log": True,
            "series": [{"label": label, "x": ks, "y": y, "style": style}
                       for label, y, style in series]}


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=None)
    ks = SMOKE_ACCUMULATION_STEPS if args.smoke else FULL_ACCUMULATION_STEPS
    runs = measure(ks, SMOKE_MICRO_BATCHES if args.smoke else FULL_MICRO_BATCHES)
    common.emit({
        "figure": "communication", "smoke": args.smoke,
        "title": "1. Communication: allreduces and bytes per 1,000 samples",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": table(runs), "checks": checks(runs), "plots": [plot(runs)],
    }, args.json)


if __name__ == "__main__":
    common.run_main("communication", main)
