"""Figure 7, data at scale: for each kind of data, each worker reads its share, memory stays
bounded, and training reads as fast as the pipeline an expert writes by hand for that worker's
share.

The samples are written once per run of the script (by a process of their own, seed 0), at two
sizes 8× apart, n = 8,000 and 64,000: a 32×32×3 uint8 image and a label of 10 classes each, in
four kinds holding the same samples: 64 TFRecord files of slightly uneven sizes (±10 %) of
`tf.train.Example`s (with the sample's number); class folders of PNG files (listed by class, so
the order's chunks are of one class); 16 Parquet files (image bytes, label, number) in row groups
of 1,000 rows; and a random-access source whose `__getitem__` reads memory-mapped `.npy` files.
Every run trains the same small conv net (two 3×3 convolutions with max pooling, then a dense
layer: ≈ 16 k parameters, seed 0) with `Trainer.fit`, micro-batch 32, k = 4, under `mpirun` with
the mpi4py backend, one intra-op thread per worker. (i) Each worker's share and (ii) memory:
`distaccum.micro_batches` for 2 epochs in fresh processes, N = 2 at both sizes (and N = 4 on the
8,000 records); per epoch, samples parsed per worker ÷ (n/N) are exact counts (record files:
inside `parse`; other kinds: the samples distaccum's reader takes, before decoding), and so are
samples read from storage (record files: whole chunks of 64; tables: the rows of every row group
decoded) and bytes read from storage ÷ (the data's bytes / N) (record files: the chunks' records;
images: the files opened; tables: the row groups decoded, compressed; the source: its rows).
Peak resident memory (`ru_maxrss`) is the larger worker's, and the growth compares the two sizes
within a repeat. (iii) Throughput, N = 2, n = 64,000: distaccum's pipeline against the one an
expert writes for the worker's own share, in one pair of workers, each pipeline with its own
trainer, both passed to `Trainer.fit`: after a warm-up of 8 updates each (tracing), one epoch of
each per repeat, the order swapped every repeat, nothing counted. The expert's pipelines: record
files, `list_files(shuffle=False).shard(N, rank)` before any shuffle, the shard's files
reshuffled each epoch, `interleave(TFRecordDataset, cycle_length=8, AUTOTUNE)`, `shuffle(4096)`
of serialized records (distaccum's buffer per worker, 8192 / N), `map(parse, AUTOTUNE)`; folders,
`list_files` + `shard` + `shuffle(4096)` of paths + a parallel `decode_image` and `resize` (what
Keras's reader runs); Parquet, `from_generator` over pyarrow's row groups of the worker (every
N-th), `shuffle(4096)` of rows, a parallel parse; the source, `range(rank, n, N)`, `shuffle(4096)`,
a parallel `py_function` of `__getitem__`; each then `batch(32)`, `prefetch(AUTOTUNE)`, its size
given by `assert_cardinality`. Samples/s is n ÷ the slower worker's seconds from the epoch's
start (the pipeline's start-up included) to its last update; `History.seconds` (which also
covers ending the epoch, deleting its input pipeline) is shown beside it. (iv) What the shuffle
mixes, computed from the order alone: for 64,000 samples sorted by class (10 classes, as a
folder lists them), the total variation distance between each update's classes (G = 256) and the
data's, against a full random permutation's.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

import common

PIPELINES = {"distaccum": "distaccum `micro_batches`", "expert": "hand-written tf.data"}
KINDS = {"records": "TFRecord files", "images": "image folders", "tables": "Parquet files",
         "source": "random-access source"}
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
# What the shuffle mixes: samples sorted by class, an update's global batch.
MIX_CLASSES, MIX_SAMPLES, MIX_GLOBAL_BATCH = 10, 64_000, 256


def write_records(work: Path, sizes: dict) -> dict[str, Path]:
    """The samples of both sizes in every kind, written by one `workers.py record-files`
    process."""
    command = common.worker_command("record-files", "--samples", sizes["small"], sizes["large"],
                                    "--files", sizes["files"], "--out", work)
    common.run_command(command, work / "record-files.log", timeout=1800)
    return {size: work / f"records-{sizes[size]}" for size in ("small", "large")}


def launch(work: Path, subcommand: str, num_workers: int, *arguments) -> list:
    """One launch of `workers.py SUBCOMMAND` on `num_workers` workers under `mpirun`; every
    rank's result."""
    out = Path(tempfile.mkdtemp(prefix=f"{subcommand}-{num_workers}-", dir=work))
    command = common.worker_command(subcommand, *arguments, "--accumulation-steps",
                                    ACCUMULATION_STEPS, "--out", out,
                                    num_workers=num_workers, launcher="mpirun")
    common.run_command(command, out / "workers.log", extra_env=MPI_BACKEND, timeout=1800)
    ranks = [common.read_json(out / f"rank{rank}.json") for rank in range(num_workers)]
    shutil.rmtree(out, ignore_errors=True)
    return ranks


def share_launch(work: Path, records: Path, num_workers: int, kinds) -> dict[str, dict]:
    """distaccum's pipeline on each kind in one launch: per kind, the share counts and peak
    memory (a kind's own in a launch of its own kind)."""
    ranks = launch(work, "data-share", num_workers, "--records", records, "--epochs", EPOCHS,
                   "--kinds", *kinds)
    return {kind: {"counts": parse_counts([r[kind] for r in ranks]),
                   "peak_mb": max(r[kind]["peak_mb"] for r in ranks),
                   "training_mb": max(r[kind]["peak_mb"] - r[kind]["before_training_mb"]
                                      for r in ranks)}
            for kind in kinds}


def shares(work: Path, records: dict[str, Path], smoke: bool) -> dict[str, dict[str, dict]]:
    """One repeat of the share runs, `{kind: {size: run}}`: each kind at each size in fresh
    processes of its own (its own peak memory); the smoke, every kind in one launch per size."""
    runs: dict[str, dict[str, dict]] = {}
    for kinds in [list(KINDS)] if smoke else [[kind] for kind in KINDS]:
        for size in ("small", "large"):
            for kind, run in share_launch(work, records[size], THROUGHPUT_WORKERS, kinds).items():
                runs.setdefault(kind, {})[size] = run
    return runs


def parse_counts(ranks: list[dict]) -> list[dict]:
    """Per epoch: parsed and read per worker ÷ (n/N), bytes read ÷ (the data's bytes / N), and
    how many samples were parsed exactly once over all workers."""
    n, workers = ranks[0]["num_samples"], len(ranks)
    share, byte_share = n / workers, ranks[0]["data_bytes"] / workers
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
            "bytes": [rank["epochs"][epoch].get("bytes", 0) / byte_share for rank in ranks],
            "exactly_once": sum(t == 1 for t in times), "num_samples": n,
        })
    return epochs


def throughput(work: Path, records: Path, repeats: int) -> dict[str, list[dict]]:
    """Per kind, per repeat and pipeline: samples/s of one epoch (the slower worker's) and by
    `History`."""
    ranks = launch(work, "data-throughput", THROUGHPUT_WORKERS, "--records", records,
                   "--repeats", repeats, "--warm-up-updates", WARM_UP_UPDATES,
                   "--kinds", *KINDS)
    runs = {kind: [{} for _ in range(repeats)] for kind in KINDS}
    for measured in zip(*ranks):  # the same fit on every rank
        first = measured[0]
        epoch_seconds = max(m["epoch_seconds"] for m in measured)
        fit_seconds = max(m["fit_seconds"] for m in measured)
        runs[first["kind"]][first["repeat"]][first["pipeline"]] = {
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


def count_rows(share_runs: dict[tuple[str, int, int], list[dict]]) -> list[dict]:
    """Per (kind, workers, samples, epoch), over every worker of every repeat: samples parsed
    and read ÷ (n/N), bytes ÷ (bytes/N), and the fewest samples parsed exactly once in any
    repeat."""
    rows = []
    for (kind, workers, samples), runs in share_runs.items():
        for epoch in range(EPOCHS):
            of_epoch = [run["counts"][epoch] for run in runs]
            rows.append({"kind": kind, "workers": workers, "samples": samples,
                         "epoch": epoch + 1,
                         **{part: [v for e in of_epoch for v in e[part]]
                            for part in ("parsed", "read", "bytes")},
                         "exactly_once": min(e["exactly_once"] for e in of_epoch),
                         "runs": len(runs)})
    return rows


def counts_table(rows: list[dict]) -> str:
    return common.markdown_table(
        ["data", "workers N", "samples n", "epoch", "samples parsed per worker ÷ (n/N)",
         "samples read from storage per worker ÷ (n/N)", "bytes read per worker ÷ (bytes/N)",
         "samples parsed exactly once, over the workers"],
        [[KINDS[r["kind"]], r["workers"], f"{r['samples']:,}", r["epoch"], spread(r["parsed"]),
          spread(r["read"]), spread(r["bytes"]), f"{r['exactly_once']:,} of {r['samples']:,}"]
         for r in rows])


def memory_summary(repeats: list[dict]) -> dict:
    """Per kind: peak and training part at each size, and the growth, each within one
    repeat."""
    summary = {}
    for kind in KINDS:
        runs = [run[kind] for run in repeats]
        summary[kind] = {f"{part}_{size}": common.summarize(run[size][part] for run in runs)
                         for part in ("peak_mb", "training_mb") for size in ("small", "large")}
        summary[kind]["growth_percent"] = common.summarize(
            100 * (run["large"]["peak_mb"] / run["small"]["peak_mb"] - 1) for run in runs)
    return summary


def memory_table(summary: dict, sizes: dict) -> str:
    rows = []
    for kind, label in KINDS.items():
        of_kind = summary[kind]
        rows += [[label, f"{sizes[size]:,}", of_kind[f"peak_mb_{size}"].format(),
                  of_kind[f"training_mb_{size}"].format()] for size in ("small", "large")]
        rows.append([label, "growth, 8× the data", f"+{of_kind['growth_percent'].format(1)} %",
                     ""])
    return common.markdown_table(
        ["data", f"samples n ({THROUGHPUT_WORKERS} workers)", "peak RSS of the larger worker, MB",
         "training part (peak minus the peak before `fit`), MB"], rows)


def throughput_summary(runs: dict[str, list[dict]]) -> dict:
    summary = {}
    for kind, of_kind in runs.items():
        summary[kind] = {f"{p}_{measure}": common.summarize(run[p][measure] for run in of_kind)
                         for p in PIPELINES
                         for measure in ("samples_per_second", "fit_samples_per_second")}
        for measure in ("samples_per_second", "fit_samples_per_second"):
            summary[kind][f"ratio_{measure}"] = common.summarize(
                run["distaccum"][measure] / run["expert"][measure] for run in of_kind)
    return summary


def throughput_table(summary: dict, sizes: dict) -> str:
    rows = []
    for kind, label in KINDS.items():
        of_kind = summary[kind]
        rows += [[label, name, of_kind[f"{p}_samples_per_second"].format(),
                  of_kind[f"{p}_fit_samples_per_second"].format()]
                 for p, name in PIPELINES.items()]
        rows.append([label, "distaccum ÷ hand-written",
                     of_kind["ratio_samples_per_second"].format(3),
                     of_kind["ratio_fit_samples_per_second"].format(3)])
    return common.markdown_table(
        ["data", f"pipeline ({THROUGHPUT_WORKERS} workers, n = {sizes['large']:,})",
         "samples/s: epoch start to last update", "samples/s: `History.seconds`"], rows)


def class_mix() -> dict:
    """How far each update's classes are from the data's (total variation distance, mean and
    largest over an epoch's updates), for samples sorted by class: distaccum's order against a
    full random permutation of the n samples."""
    from distaccum import order
    labels = np.repeat(np.arange(MIX_CLASSES), MIX_SAMPLES // MIX_CLASSES)
    layout = order.Layout((MIX_SAMPLES,))
    epoch = order.EpochOrder(layout, 0, 1, MIX_GLOBAL_BATCH)
    full = np.random.default_rng(0).permutation(MIX_SAMPLES)

    def distances(updates):
        return [0.5 * np.abs(np.bincount(labels[u], minlength=MIX_CLASSES) / len(u)
                             - 1 / MIX_CLASSES).sum() for u in updates if len(u)]

    ours = distances(epoch.worker_update(u, 1, 0) for u in range(epoch.updates))
    shuffled = distances(np.array_split(full, epoch.updates))
    return {"distaccum": {"mean": float(np.mean(ours)), "max": float(np.max(ours))},
            "permutation": {"mean": float(np.mean(shuffled)), "max": float(np.max(shuffled))}}


def class_mix_table(mix: dict) -> str:
    return common.markdown_table(
        [f"order ({MIX_SAMPLES:,} samples sorted by class, {MIX_CLASSES} classes, G = "
         f"{MIX_GLOBAL_BATCH})", "an update's classes against the data's: total variation "
         "distance, mean over the epoch", "largest"],
        [["distaccum (chunks of 64, 48 partitions, blocks of 170)",
          f"{mix['distaccum']['mean']:.3f}", f"{mix['distaccum']['max']:.3f}"],
         ["a full random permutation", f"{mix['permutation']['mean']:.3f}",
          f"{mix['permutation']['max']:.3f}"]])


def checks(rows: list[dict], memory: dict, speed: dict, speed_runs: dict,
           smoke: bool) -> list[dict]:
    judged = (lambda passed: None) if smoke else (lambda passed: passed)
    result = []
    for kind, label in KINDS.items():
        of_kind = [r for r in rows if r["kind"] == kind]
        for workers in sorted({r["workers"] for r in of_kind}):
            worst = max(max(r["parsed"]) for r in of_kind if r["workers"] == workers)
            result.append(common.check(
                f"data, {label}, {workers} workers: samples parsed per worker per epoch ÷ (n/N)",
                f"≤ {PARSED_TARGET}", f"{worst:.3f} (the largest, over workers, epochs, runs)",
                judged(worst <= PARSED_TARGET)))
        once = all(r["exactly_once"] == r["samples"] for r in of_kind)
        result.append(common.check(
            f"data, {label}: every sample parsed exactly once per epoch, over the workers",
            "n of n", "yes" if once else "no (see the table)", judged(once)))
        growth = memory[kind]["growth_percent"]
        result.append(common.check(
            f"data, {label}: peak RSS per worker at 8× the data", f"grows ≤ {GROWTH_TARGET:.0%}",
            f"+{growth.format(1)} %", judged(growth.median <= 100 * GROWTH_TARGET),
            held_row_groups() if kind == "tables" else ""))
        ratio = speed[kind]["ratio_samples_per_second"]
        result.append(common.check(
            f"data, {label}: samples/s, {THROUGHPUT_WORKERS} workers, distaccum ÷ hand-written "
            "tf.data for the worker's share", f"≥ {THROUGHPUT_TARGET}", ratio.format(3),
            judged(ratio.median >= THROUGHPUT_TARGET), slow_endings(speed_runs[kind])))
    return result


def held_row_groups() -> str:
    """What a worker holds of Parquet files: about one decoded row group per partition it reads
    (`tables.DecodedGroups`), a bound the larger size reaches."""
    from distaccum import order
    partitions = order.DEFAULT_PARTITIONS // THROUGHPUT_WORKERS
    group_mb = common.TABLE_ROW_GROUP * 32 * 32 * 3 / 1e6
    return (f"a worker holds about one decoded row group per partition it reads: {partitions} × "
            f"{group_mb:.1f} MB ≈ {partitions * group_mb:.0f} MB here, which the larger size "
            f"reaches ({FULL['large'] // THROUGHPUT_WORKERS // common.TABLE_ROW_GROUP} row groups "
            f"of {common.TABLE_ROW_GROUP:,} rows per worker) and the smaller does not; it is a "
            "bound, not a share of the data (docs/data.md, Parquet and Arrow IPC files)")


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
    throughput = [{"label": f"{KINDS[kind]}: {'distaccum' if p == 'distaccum' else 'expert'}",
                   **speed[kind][f"{p}_samples_per_second"].as_dict()}
                  for kind in KINDS for p in PIPELINES]
    peaks = [{"label": f"{KINDS[kind]}, n = {sizes[size]:,}",
              **memory[kind][f"peak_mb_{size}"].as_dict()}
             for kind in KINDS for size in ("small", "large")]
    return [{"kind": "bars", "title": "7. Data: samples/s per kind of data, 2 workers",
             "ylabel": "samples/s", "bars": throughput},
            {"kind": "bars", "title": "7. Data: peak RSS per worker, 2 workers", "ylabel": "MB",
             "bars": peaks}]


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=3)
    sizes = SMOKE if args.smoke else FULL
    with common.work_directory("data") as work:
        records = write_records(work, sizes)
        repeats = [shares(work, records, args.smoke) for _ in range(args.repeats)]
        share_runs = {(kind, THROUGHPUT_WORKERS, sizes[size]): [run[kind][size]
                                                                for run in repeats]
                      for kind in KINDS for size in ("small", "large")}
        if not args.smoke:
            share_runs["records", 4, sizes["small"]] = [
                share_launch(work, records["small"], 4, ["records"])["records"]]
        speed_runs = throughput(work, records["large"], args.repeats)
    rows = count_rows(share_runs)
    memory, speed = memory_summary(repeats), throughput_summary(speed_runs)
    mix = class_mix()
    common.emit({
        "figure": "data", "smoke": args.smoke,
        "title": "7. Data at scale: each kind of data, each worker's share, memory, throughput",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": "\n\n".join([counts_table(rows), memory_table(memory, sizes),
                              throughput_table(speed, sizes), class_mix_table(mix)]),
        "checks": checks(rows, memory, speed, speed_runs, args.smoke),
        "plots": plots(memory, speed, sizes),
        "counts": rows, "memory_runs": repeats, "throughput_runs": speed_runs,
        "class_mix": mix,
    }, args.json)


if __name__ == "__main__":
    common.run_main("data", main)
