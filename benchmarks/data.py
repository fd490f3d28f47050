"""Figure 7, data at scale: each worker reads its share, shuffles in bounded memory, and trains
from record files as fast as a hand-written tf.data pipeline.

TFRecord files are written once per run of the script (by a process of their own, seed 0): 64
files of slightly uneven sizes (±10 %) of `tf.train.Example`s holding a 32×32×3 uint8 image, a
label of 10 classes and the sample's number, at two sizes 8× apart, n = 8,000 and 64,000. Every
run trains the same small conv net (two 3×3 convolutions with max pooling, then a dense layer:
≈ 16 k parameters, seed 0) with `Trainer.fit`, micro-batch 32, k = 4, under `mpirun` with the
mpi4py backend, one intra-op thread per worker, the same `parse` for every pipeline
(`parse_single_example`, `decode_raw`, to float32). (i) Each worker's share and (ii) memory:
`distaccum.micro_batches(glob, 32, parse=parse)` for 2 epochs in fresh processes, N = 2 at both
sizes (and N = 4 on the 8,000); `parse` counts every record it parses and which sample it was, and
the records distaccum's reader takes from the files (whole chunks of 64) are counted too. Per
epoch, records parsed per worker ÷ (n/N) are exact counts; peak resident memory (`ru_maxrss`,
the counting included alike at both sizes) is the larger worker's, and the growth compares the
two sizes within a repeat. (iii) Throughput,
N = 2, n = 64,000: distaccum's pipeline against the one an expert writes by hand
(`list_files(shuffle=False).shard(N, rank)` before any shuffle, the shard's files reshuffled each
epoch, `interleave(TFRecordDataset, cycle_length=8, AUTOTUNE)`, `shuffle(4096)` of serialized
records, which is distaccum's buffer per worker, 8192 / N, `map(parse, AUTOTUNE)`, `batch(32)`,
`prefetch(AUTOTUNE)`, its size given by `assert_cardinality`), in one pair of workers, each
pipeline with its own trainer, both passed to `Trainer.fit`: after a warm-up of 8 updates each
(tracing), one epoch of each per repeat, the order swapped every repeat, nothing counted.
Samples/s is n ÷ the slower worker's seconds from the epoch's start (the pipeline's start-up
included) to its last update; `History.seconds` (which also covers ending the epoch, deleting its
input pipeline) is shown beside it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import common

PIPELINES = {"distaccum": "distaccum `micro_batches`", "expert": "hand-written tf.data"}
ACCUMULATION_STEPS = 4
EPOCHS = 2  # of the share and memory runs
WARM_UP_UPDATES = 8
FULL = {"small": 8_000, "large": 64_000, "files": 64}
SMOKE = {"small": 256, "large": 2_048, "files": 8}
THROUGHPUT_WORKERS = 2
PARSED_TARGET = 1.1
GROWTH_TARGET = 0.10
THROUGHPUT_TARGET = 0.95
SLOW_ENDING = 0.5  # an epoch's ending, ÷ its seconds, above which the figure says so
MPI_BACKEND = {"DISTACCUM_BACKEND": "mpi"}


def write_records(work: Path, sizes: dict) -> dict[str, Path]:
    """The record files of both sizes, written by one `workers.py record-files` process."""
    command = common.worker_command("record-files", "--samples", sizes["small"], sizes["large"],
                                    "--files", sizes["files"], "--out", work)
    common.run_command(command, work / "record-files.log", timeout=900)
    return {size: work / f"records-{sizes[size]}" for size in ("small", "large")}


def launch(work: Path, subcommand: str, num_workers: int, *arguments) -> list:
    """One launch of `workers.py SUBCOMMAND` on `num_workers` workers under `mpirun`; every
    rank's result."""
    out = Path(tempfile.mkdtemp(prefix=f"{subcommand}-{num_workers}-", dir=work))
    command = common.worker_command(subcommand, *arguments, "--accumulation-steps",
                                    ACCUMULATION_STEPS, "--out", out,
                                    num_workers=num_workers, launcher="mpirun")
    common.run_command(command, out / "workers.log", extra_env=MPI_BACKEND, timeout=1200)
    ranks = [common.read_json(out / f"rank{rank}.json") for rank in range(num_workers)]
    shutil.rmtree(out, ignore_errors=True)
    return ranks


def share_run(work: Path, records: Path, num_workers: int) -> dict:
    """distaccum's pipeline in fresh processes: the share counts and peak memory."""
    ranks = launch(work, "data-share", num_workers, "--records", records, "--epochs", EPOCHS)
    return {"counts": parse_counts(ranks), "peak_mb": max(r["peak_mb"] for r in ranks),
            "training_mb": max(r["peak_mb"] - r["before_training_mb"] for r in ranks)}


def parse_counts(ranks: list[dict]) -> list[dict]:
    """Per epoch: parsed and read per worker ÷ (n/N), and how many samples were parsed exactly
    once over all workers."""
    n, workers = ranks[0]["num_samples"], len(ranks)
    share = n / workers
    epochs = []
    for epoch in range(EPOCHS):
        times = [0] * n
        for rank in ranks:
            for sample in rank["epochs"][epoch]["samples"]:
                times[sample] += 1
        epochs.append({
            "epoch": epoch + 1,
            "parsed": [rank["epochs"][epoch]["parsed"] / share for rank in ranks],
            "read": [rank["epochs"][epoch].get("read", 0) / share for rank in ranks],
            "exactly_once": sum(t == 1 for t in times), "num_samples": n,
        })
    return epochs


def throughput(work: Path, records: Path, repeats: int) -> list[dict]:
    """Per repeat and pipeline: samples/s of one epoch (the slower worker's) and by
    `History`."""
    ranks = launch(work, "data-throughput", THROUGHPUT_WORKERS, "--records", records,
                   "--repeats", repeats, "--warm-up-updates", WARM_UP_UPDATES)
    runs = [{} for _ in range(repeats)]
    for measured in zip(*ranks):  # the same fit on every rank
        first = measured[0]
        epoch_seconds = max(m["epoch_seconds"] for m in measured)
        fit_seconds = max(m["fit_seconds"] for m in measured)
        runs[first["repeat"]][first["pipeline"]] = {
            "samples_per_second": first["samples"] / epoch_seconds,
            "fit_samples_per_second": first["samples"] / fit_seconds,
            "epoch_seconds": epoch_seconds, "fit_seconds": fit_seconds,
            "ending_seconds": max(m["ending_seconds"] for m in measured),
        }
    return runs


def spread(values) -> str:
    """`low–high` of ratios to three places, or the one value when they agree."""
    values = list(values)
    low, high = f"{min(values):.3f}", f"{max(values):.3f}"
    return low if low == high else f"{low}–{high}"


def count_rows(share_runs: dict[tuple[int, int], list[dict]]) -> list[dict]:
    """Per (workers, samples, epoch), over every worker of every repeat: records parsed and read
    ÷ (n/N), and the fewest samples parsed exactly once in any repeat."""
    rows = []
    for (workers, samples), runs in share_runs.items():
        for epoch in range(EPOCHS):
            of_epoch = [run["counts"][epoch] for run in runs]
            rows.append({"workers": workers, "samples": samples, "epoch": epoch + 1,
                         "parsed": [v for e in of_epoch for v in e["parsed"]],
                         "read": [v for e in of_epoch for v in e["read"]],
                         "exactly_once": min(e["exactly_once"] for e in of_epoch),
                         "runs": len(runs)})
    return rows


def counts_table(rows: list[dict]) -> str:
    return common.markdown_table(
        ["workers N", "samples n", "epoch", "records parsed per worker ÷ (n/N)",
         "records read from the files per worker ÷ (n/N)",
         "samples parsed exactly once, over the workers"],
        [[r["workers"], f"{r['samples']:,}", r["epoch"], spread(r["parsed"]), spread(r["read"]),
          f"{r['exactly_once']:,} of {r['samples']:,}"] for r in rows])


def memory_summary(repeats: list[dict]) -> dict:
    """Peak and training part at each size, and the growth, each within one repeat."""
    summary = {f"{part}_{size}": common.summarize(run[size][part] for run in repeats)
               for part in ("peak_mb", "training_mb") for size in ("small", "large")}
    summary["growth_percent"] = common.summarize(
        100 * (run["large"]["peak_mb"] / run["small"]["peak_mb"] - 1) for run in repeats)
    return summary


def memory_table(summary: dict, sizes: dict) -> str:
    rows = [[f"{sizes[size]:,}", summary[f"peak_mb_{size}"].format(),
             summary[f"training_mb_{size}"].format()] for size in ("small", "large")]
    rows.append(["growth, 8× the data", f"+{summary['growth_percent'].format(1)} %", ""])
    return common.markdown_table(
        [f"samples n ({THROUGHPUT_WORKERS} workers)", "peak RSS of the larger worker, MB",
         "training part (peak minus the peak before `fit`), MB"], rows)


def throughput_summary(runs: list[dict]) -> dict:
    summary = {f"{p}_{measure}": common.summarize(run[p][measure] for run in runs)
               for p in PIPELINES for measure in ("samples_per_second", "fit_samples_per_second")}
    for measure in ("samples_per_second", "fit_samples_per_second"):
        summary[f"ratio_{measure}"] = common.summarize(
            run["distaccum"][measure] / run["expert"][measure] for run in runs)
    return summary


def throughput_table(summary: dict, sizes: dict) -> str:
    rows = [[label, summary[f"{p}_samples_per_second"].format(),
             summary[f"{p}_fit_samples_per_second"].format()] for p, label in PIPELINES.items()]
    rows.append(["distaccum ÷ hand-written", summary["ratio_samples_per_second"].format(3),
                 summary["ratio_fit_samples_per_second"].format(3)])
    return common.markdown_table(
        [f"pipeline ({THROUGHPUT_WORKERS} workers, n = {sizes['large']:,})",
         "samples/s: epoch start to last update", "samples/s: `History.seconds`"], rows)


def checks(rows: list[dict], memory: dict, speed: dict, speed_runs: list[dict],
           smoke: bool) -> list[dict]:
    judged = (lambda passed: None) if smoke else (lambda passed: passed)
    result = []
    for workers in sorted({r["workers"] for r in rows}):
        worst = max(max(r["parsed"]) for r in rows if r["workers"] == workers)
        result.append(common.check(
            f"data, {workers} workers: records parsed per worker per epoch ÷ (n/N)",
            f"≤ {PARSED_TARGET}", f"{worst:.3f} (the largest, over workers, epochs, runs)",
            judged(worst <= PARSED_TARGET)))
    once = all(r["exactly_once"] == r["samples"] for r in rows)
    result.append(common.check(
        "data: every sample parsed exactly once per epoch, over the workers", "n of n",
        "yes" if once else "no (see the table)", judged(once)))
    growth = memory["growth_percent"]
    result.append(common.check(
        "data: peak RSS per worker at 8× the data", f"grows ≤ {GROWTH_TARGET:.0%}",
        f"+{growth.format(1)} %", judged(growth.median <= 100 * GROWTH_TARGET)))
    ratio = speed["ratio_samples_per_second"]
    result.append(common.check(
        f"data: samples/s from record files, {THROUGHPUT_WORKERS} workers, distaccum ÷ "
        "hand-written tf.data", f"≥ {THROUGHPUT_TARGET}", ratio.format(3),
        judged(ratio.median >= THROUGHPUT_TARGET), slow_endings(speed_runs)))
    return result


def slow_endings(speed_runs: list[dict]) -> str:
    """A note when an epoch took long to end: from its last update to `on_epoch_end` (the
    controller finds the epoch's iterator exhausted, deletes it, and sums the epoch's metrics
    over the workers), time `History.seconds` counts and the samples/s of the epoch does not."""
    epochs = [(p, run[p]) for run in speed_runs for p in PIPELINES]
    slow = [(p, e) for p, e in epochs if e["ending_seconds"] > SLOW_ENDING * e["epoch_seconds"]]
    if not slow:
        return ""
    which = ", ".join(f"{e['ending_seconds']:.1f} s ({p})" for p, e in slow)
    return (f"{len(slow)} of {len(epochs)} timed epochs took more than "
            f"{SLOW_ENDING:.0%} of the epoch's own time to end after its last update: {which}, "
            "spent deleting the epoch's tf.data iterator (see `workload.without_autotune`); "
            "the `History.seconds` column counts it, for either pipeline alike")


def plots(memory: dict, speed: dict, sizes: dict) -> list[dict]:
    throughput = [{"label": label, **speed[f"{p}_samples_per_second"].as_dict()}
                  for p, label in (("distaccum", "distaccum micro_batches"),
                                   ("expert", "hand-written tf.data"))]
    peaks = [{"label": f"distaccum, n = {sizes[size]:,}", **memory[f"peak_mb_{size}"].as_dict()}
             for size in ("small", "large")]
    return [{"kind": "bars", "title": "7. Data: samples/s from record files, 2 workers",
             "ylabel": "samples/s", "bars": throughput},
            {"kind": "bars", "title": "7. Data: peak RSS per worker, 2 workers", "ylabel": "MB",
             "bars": peaks}]


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=3)
    sizes = SMOKE if args.smoke else FULL
    with common.work_directory("data") as work:
        records = write_records(work, sizes)
        repeats = [{size: share_run(work, records[size], THROUGHPUT_WORKERS)
                    for size in ("small", "large")} for _ in range(args.repeats)]
        share_runs = {(THROUGHPUT_WORKERS, sizes[size]): [run[size] for run in repeats]
                      for size in ("small", "large")}
        if not args.smoke:
            share_runs[4, sizes["small"]] = [share_run(work, records["small"], 4)]
        speed_runs = throughput(work, records["large"], args.repeats)
    rows = count_rows(share_runs)
    memory, speed = memory_summary(repeats), throughput_summary(speed_runs)
    common.emit({
        "figure": "data", "smoke": args.smoke,
        "title": "7. Data at scale: each worker's share, memory, throughput from record files",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": "\n\n".join([counts_table(rows), memory_table(memory, sizes),
                              throughput_table(speed, sizes)]),
        "checks": checks(rows, memory, speed, speed_runs, args.smoke),
        "plots": plots(memory, speed, sizes),
        "counts": rows, "memory_runs": repeats, "throughput_runs": speed_runs,
    }, args.json)


if __name__ == "__main__":
    common.run_main("data", main)
