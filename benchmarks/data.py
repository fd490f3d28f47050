"""Figure 7, data at scale: each worker reads its share, shuffles in bounded memory, and trains
from record files as fast as a hand-written tf.data pipeline.

TFRecord files are written once per run of the script (by a process of their own, seed 0): 64
files of slightly uneven sizes (±10 %) of `tf.train.Example`s holding a 32×32×3 uint8 image, a
label of 10 classes and the sample's number, at two sizes 8× apart, 8,000 and 64,000 samples.
Every run trains the same small conv net (two 3×3 convolutions with max pooling, then a dense
layer: ≈ 16 k parameters, seed 0) with `Trainer.fit`, micro-batch 32, k = 4, for 2 epochs, under
`mpirun` with the mpi4py backend, one intra-op thread per worker, the same `parse` for every
pipeline (`parse_single_example`, `decode_raw`, to float32). (i) Records parsed: `parse` counts
each record it parses and which sample it was; per epoch, the records a worker parsed ÷ (n/N) on
the 8,000 samples with N = 2 and 4, and the records distaccum's reader took from the files (whole
chunks of 64 records). Counts are exact, so one run each. (ii) Memory: peak resident memory
(`ru_maxrss`) of the larger worker, N = 2, distaccum's pipeline at both sizes, each a fresh
process. (iii) Throughput, N = 2, 64,000 samples: `distaccum.micro_batches(glob, 32,
parse=parse)` against the pipeline an expert writes by hand (`list_files(shuffle=False)
.shard(N, rank)` before any shuffle, the shard's files reshuffled each epoch,
`interleave(TFRecordDataset, cycle_length=8, AUTOTUNE)`, `shuffle(4096)` of serialized records,
which is distaccum's buffer per worker, 8192 / N, `map(parse, AUTOTUNE)`, `batch(32)`,
`prefetch(AUTOTUNE)`, its size given by `assert_cardinality`), both passed to the same
`Trainer.fit`. Samples/s is the second epoch's (the first traces the steps): n ÷ the slower
worker's seconds from the epoch's start (the pipeline's start-up included) to its last update.
Throughput runs count nothing. Each repeat runs distaccum, the hand-written pipeline, then
distaccum on the 8,000 samples; ratios and growth are taken within a repeat.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import common

PIPELINES = {"distaccum": "distaccum `micro_batches`", "expert": "hand-written tf.data"}
ACCUMULATION_STEPS = 4
EPOCHS = 2
FULL = {"small": 8_000, "large": 64_000, "files": 64, "count_workers": (2, 4)}
SMOKE = {"small": 256, "large": 2_048, "files": 8, "count_workers": (2,)}
THROUGHPUT_WORKERS = 2
PARSED_TARGET = 1.1
GROWTH_TARGET = 0.10
THROUGHPUT_TARGET = 0.95
MPI_BACKEND = {"DISTACCUM_BACKEND": "mpi"}


def write_records(work: Path, sizes: dict) -> dict[str, Path]:
    """The record files of both sizes, written by one `workers.py record-files` process."""
    command = common.worker_command("record-files", "--samples", sizes["small"], sizes["large"],
                                    "--files", sizes["files"], "--out", work)
    common.run_command(command, work / "record-files.log", timeout=900)
    return {size: work / f"records-{sizes[size]}" for size in ("small", "large")}


def train(work: Path, records: Path, pipeline: str, num_workers: int, *,
          count: bool = False) -> list[dict]:
    """One launch of `workers.py data` on `num_workers` workers; every rank's result."""
    out = Path(tempfile.mkdtemp(prefix=f"{pipeline}-{num_workers}-", dir=work))
    arguments = ["--pipeline", pipeline, "--records", records, "--epochs", EPOCHS,
                 "--accumulation-steps", ACCUMULATION_STEPS, "--out", out]
    command = common.worker_command("data", *arguments, *["--count"] * count,
                                    num_workers=num_workers, launcher="mpirun")
    common.run_command(command, out / "workers.log", extra_env=MPI_BACKEND, timeout=1200)
    ranks = [common.read_json(out / f"rank{rank}.json") for rank in range(num_workers)]
    shutil.rmtree(out, ignore_errors=True)
    return ranks


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


def samples_per_second(ranks: list[dict]) -> float:
    """The last epoch's samples (n, all workers) ÷ the slower worker's seconds for it."""
    return ranks[0]["num_samples"] / max(rank["epochs"][-1]["seconds"] for rank in ranks)


def fit_samples_per_second(ranks: list[dict]) -> float:
    """`History.samples / History.seconds` over both epochs (tracing and first epoch included)."""
    return ranks[0]["history_samples"] / max(rank["history_seconds"] for rank in ranks)


def peak_mb(ranks: list[dict]) -> float:
    return max(rank["peak_mb"] for rank in ranks)


def measure_repeat(work: Path, records: dict[str, Path]) -> dict:
    """distaccum and the hand-written pipeline on the large files, then distaccum on the small
    ones, moments apart."""
    large = {pipeline: train(work, records["large"], pipeline, THROUGHPUT_WORKERS)
             for pipeline in PIPELINES}
    small = train(work, records["small"], "distaccum", THROUGHPUT_WORKERS)
    return {
        **{f"{p}_samples_per_second": samples_per_second(large[p]) for p in PIPELINES},
        **{f"{p}_fit_samples_per_second": fit_samples_per_second(large[p]) for p in PIPELINES},
        **{f"{p}_peak_mb_large": peak_mb(large[p]) for p in PIPELINES},
        "distaccum_peak_mb_small": peak_mb(small),
        "distaccum_training_mb_large": max(r["peak_mb"] - r["before_training_mb"]
                                           for r in large["distaccum"]),
        "distaccum_training_mb_small": max(r["peak_mb"] - r["before_training_mb"]
                                           for r in small),
    }


def spread(values) -> str:
    values = list(values)
    low, high = min(values), max(values)
    return f"{low:.3f}" if f"{low:.3f}" == f"{high:.3f}" else f"{low:.3f}–{high:.3f}"


def counts_table(counts: dict[int, list[dict]]) -> str:
    rows = [[workers, e["epoch"], spread(e["parsed"]), spread(e["read"]),
             f"{e['exactly_once']:,} of {e['num_samples']:,}"]
            for workers, epochs in counts.items() for e in epochs]
    return common.markdown_table(
        ["workers N", "epoch", "records parsed per worker ÷ (n/N), over workers",
         "records read from the files ÷ (n/N)", "samples parsed exactly once (all workers)"],
        rows)


def memory_table(summary: dict, sizes: dict) -> str:
    rows = [[f"{sizes['small']:,}", summary["distaccum_peak_mb_small"].format(),
             summary["distaccum_training_mb_small"].format(), "—"],
            [f"{sizes['large']:,}", summary["distaccum_peak_mb_large"].format(),
             summary["distaccum_training_mb_large"].format(),
             summary["expert_peak_mb_large"].format()],
            ["growth, 8× the data", f"+{summary['growth_percent'].format(1)} %", "", ""]]
    return common.markdown_table(
        ["samples n", "distaccum: peak RSS per worker, MB", "distaccum: training part, MB",
         "hand-written: peak RSS per worker, MB"], rows)


def throughput_table(summary: dict, sizes: dict) -> str:
    rows = [[label, summary[f"{p}_samples_per_second"].format(),
             summary[f"{p}_fit_samples_per_second"].format()]
            for p, label in PIPELINES.items()]
    rows.append(["distaccum ÷ hand-written", summary["ratio"].format(3),
                 summary["fit_ratio"].format(3)])
    return common.markdown_table(
        [f"pipeline ({THROUGHPUT_WORKERS} workers, {sizes['large']:,} samples)",
         "samples/s, epoch 2", "samples/s, whole fit (History)"], rows)


def summarize(runs: list[dict]) -> dict:
    keys = [key for key in runs[0]]
    summary = {key: common.summarize(run[key] for run in runs) for key in keys}
    summary["ratio"] = common.summarize(
        run["distaccum_samples_per_second"] / run["expert_samples_per_second"] for run in runs)
    summary["fit_ratio"] = common.summarize(
        run["distaccum_fit_samples_per_second"] / run["expert_fit_samples_per_second"]
        for run in runs)
    summary["growth_percent"] = common.summarize(
        100 * (run["distaccum_peak_mb_large"] / run["distaccum_peak_mb_small"] - 1)
        for run in runs)
    return summary


def checks(counts: dict[int, list[dict]], summary: dict, smoke: bool) -> list[dict]:
    judged = (lambda passed: None) if smoke else (lambda passed: passed)
    result = []
    for workers, epochs in counts.items():
        worst = max(max(e["parsed"]) for e in epochs)
        result.append(common.check(
            f"data, {workers} workers: records parsed per worker per epoch ÷ (n/N)",
            f"≤ {PARSED_TARGET}", f"{worst:.3f} (largest over workers and epochs)",
            judged(worst <= PARSED_TARGET)))
    once = all(e["exactly_once"] == e["num_samples"] for epochs in counts.values()
               for e in epochs)
    result.append(common.check(
        "data: every sample parsed exactly once per epoch over the workers", "n of n",
        "yes" if once else "no (see the table)", judged(once)))
    growth = summary["growth_percent"]
    result.append(common.check(
        "data: peak RSS per worker, 8× the data", f"grows ≤ {GROWTH_TARGET:.0%}",
        f"+{growth.format(1)} %", judged(growth.median <= 100 * GROWTH_TARGET)))
    ratio = summary["ratio"]
    result.append(common.check(
        f"data: samples/s from record files, {THROUGHPUT_WORKERS} workers, distaccum ÷ "
        "hand-written tf.data", f"≥ {THROUGHPUT_TARGET}", ratio.format(3),
        judged(ratio.median >= THROUGHPUT_TARGET)))
    return result


def plots(summary: dict) -> list[dict]:
    throughput = [{"label": label, **summary[f"{p}_samples_per_second"].as_dict()}
                  for p, label in (("distaccum", "distaccum micro_batches"),
                                   ("expert", "hand-written tf.data"))]
    memory = [{"label": "distaccum, small", **summary["distaccum_peak_mb_small"].as_dict()},
              {"label": "distaccum, 8× data", **summary["distaccum_peak_mb_large"].as_dict()},
              {"label": "hand-written, 8× data", **summary["expert_peak_mb_large"].as_dict()}]
    return [{"kind": "bars", "title": "7. Data: samples/s from record files, 2 workers",
             "ylabel": "samples/s", "bars": throughput},
            {"kind": "bars", "title": "7. Data: peak RSS per worker", "ylabel": "MB",
             "bars": memory}]


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=3)
    sizes = SMOKE if args.smoke else FULL
    with common.work_directory("data") as work:
        records = write_records(work, sizes)
        counts = {workers: parse_counts(train(work, records["small"], "distaccum", workers,
                                              count=True))
                  for workers in sizes["count_workers"]}
        runs = [measure_repeat(work, records) for _ in range(args.repeats)]
    summary = summarize(runs)
    common.emit({
        "figure": "data", "smoke": args.smoke,
        "title": "7. Data at scale: each worker's share, memory, throughput from record files",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": "\n\n".join([counts_table(counts), memory_table(summary, sizes),
                              throughput_table(summary, sizes)]),
        "checks": checks(counts, summary, args.smoke),
        "plots": plots(summary),
        "runs": runs, "counts": counts,
    }, args.json)


if __name__ == "__main__":
    common.run_main("data", main)
