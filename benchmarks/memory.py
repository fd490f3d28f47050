"""Figure 4, memory: distaccum's peak (micro-batch b, k = 8) vs one step on 8b; bytes per parameter.

An activation-heavy convolutional model: six full-resolution 3×3 convolutions of 16 filters on
64×64×3 images (≈12 k parameters, but 64×64×16 activations per layer and sample). distaccum runs
one update of 8 micro-steps on b = 64 images; the direct step is Keras's `train_on_batch` on 512.
Each measurement is a fresh process with one intra-op thread (`ru_maxrss`, the peak, never goes
down), the two kinds alternating. The target's figure is the whole process's peak, TensorFlow's
own ≈0.6 GB included; the training part alone (peak minus the peak before the first step) is
shown too.

Memory per parameter: two models that are nearly all weights, W = 288 MB of float32 trainable
weights each: 8 Dense(3072) layers on a 3072-wide input, and one Embedding of 294,912 × 256 (16
tokens per sample, their mean through one Dense(256): one variable holds nearly all of W, as a
GPT-2's table holds most of its weights). Each, with Adam, trains 3 updates of global batch 32 in a
fresh launch per run, distaccum writing a checkpoint at the end: Keras's own `fit`; distaccum on
micro-batches of 8 (`Trainer.from_compiled`, `micro_batches`), 1 process (k = 4), and 2 workers (k
= 2) on mpi4py under `mpirun` and on Horovod under `horovodrun --gloo`; then with
`shard_optimizer_state` on 2 workers, and on 4 (k = 1, the Dense stack only: the Embedding's table
is one variable, whose owner keeps its whole state). Each figure is a worker's RSS growth over its
built, compiled model, in units of W (1 W = 4 bytes per parameter): "steady" is the RSS after the
last update (and the checkpoint), "peak" the `ru_maxrss` of the whole run; the larger rank's. These
runs use TensorFlow's system allocator (`TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1`), so that RSS is what is
live: oneDNN's default pool never returns memory, and its high-water mark varied from run to run
(Keras's own step on the Dense stack: 2.2 to 4.2 W). Keras and 1 process run again at 8 Dense(1536)
(W = 72 MB): the growth between the two sizes, per parameter added, is the slope.
The target, Keras's own peak + 1 W per gradient sum (one per distinct denominator of the loss,
`Trainer.gradient_sums`, which each run records: one for these models) + 0.25 W, is judged on the
peak, which holds the steady figure. Sharded on the Dense stack: 1 W less (each worker sheds half
of Adam's 2 W) and 0.35 W to spare, Keras's own peak + 0.35 W on 2 workers; lower on 4 workers
than on 2.
"""

from __future__ import annotations

import common

ACCUMULATION_STEPS = 8
TARGET = 0.5
FULL_MODEL = {"micro_batch": 64, "conv_layers": 6, "conv_filters": 16}
SMOKE_MODEL = {"micro_batch": 2, "conv_layers": 1, "conv_filters": 4}
MODES = {"direct": "one Keras step on 8b", "accumulate": "distaccum, b × 8 micro-steps"}
# Memory per parameter: each run's label, then the worker's mode, workers, launcher and backend.
MPI4PY = {"DISTACCUM_BACKEND": "mpi"}
GROWTH_RUNS = {
    "keras": ("Keras's own `fit`", "keras", 1, "horovodrun", None),
    "single": ("distaccum, 1 process", "distaccum", 1, "horovodrun", None),
    "mpi4py": ("distaccum, 2 workers, mpi4py", "distaccum", 2, "mpirun", MPI4PY),
    "horovod": ("distaccum, 2 workers, Horovod", "distaccum", 2, "horovodrun", None),
    "mpi4py-sharded": ("distaccum, 2 workers, mpi4py, sharded", "distaccum-sharded", 2, "mpirun",
                       MPI4PY),
    "horovod-sharded": ("distaccum, 2 workers, Horovod, sharded", "distaccum-sharded", 2,
                        "horovodrun", None),
    "mpi4py-sharded-4": ("distaccum, 4 workers, mpi4py, sharded", "distaccum-sharded", 4,
                         "mpirun", MPI4PY),
    "horovod-sharded-4": ("distaccum, 4 workers, Horovod, sharded", "distaccum-sharded", 4,
                          "horovodrun", None),
}
UNSHARDED = ("keras", "single", "mpi4py", "horovod")
SHARDED = ("mpi4py-sharded", "horovod-sharded")
SHARDED_4 = ("mpi4py-sharded-4", "horovod-sharded-4")
# The models (workers.py: `dense_stack`, `embedding_table`), each at a width and with its runs;
# the cases with every unsharded run are judged (each run against Keras's own on the same model
# and width).
# The Embedding's table is one variable: its owner keeps its whole state, so sharding it is shown
# at 2 workers, not at 4.
MODEL_LABELS = {"dense": "Dense stack", "embedding": "one Embedding"}
FULL_CASES = (("dense", 3072, UNSHARDED + SHARDED + SHARDED_4),
              ("embedding", 3072, UNSHARDED + SHARDED),
              ("dense", 1536, ("keras", "single")))
# The smoke runs every launch on the Dense stack and the Embedding's model in one process only.
SMOKE_CASES = (("dense", 256, UNSHARDED + SHARDED), ("embedding", 256, ("keras", "single")))
GROWTH_MODEL = {"layers": 8, "micro_batch": 8, "global_batch": 32, "updates": 3}
# TensorFlow's oneDNN CPU allocator keeps what it freed (a pool): RSS is then its high-water
# mark, which depends on how it fragmented and on what it held before the baseline (Keras's own
# step read 2.2 to 4.2 W on the Dense stack from run to run). Freed memory returned, RSS is what
# is live: every run, Keras's and distaccum's, is measured so.
LIVE = {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"}
# W over Keras's own peak: the accumulated sums (1 W each: one per distinct denominator of the
# loss, `Trainer.gradient_sums`), and a quarter W to spare.
SPARE = 0.25
# With sharded state on 2 workers each worker holds Adam's state (2 W) for half the weights: the
# sums, less the 1 W of state it sheds, and this to spare.
SHARDED_SPARE = 0.35


def measure_once(mode: str, model: dict) -> dict:
    """Peak memory of one update done `mode`'s way, in a process of its own."""
    with common.work_directory(f"memory-{mode}") as work:
        command = common.worker_command(
            "memory", "--mode", mode, "--micro-batch", model["micro_batch"],
            "--accumulation-steps", ACCUMULATION_STEPS, "--conv-layers", model["conv_layers"],
            "--conv-filters", model["conv_filters"], "--out", work)
        common.run_command(command, work / "worker.log", timeout=600)
        result = common.read_json(work / common.CHIEF_RESULT)
    return {**result, "training_mb": result["peak_mb"] - result["before_training_mb"]}


def measure_growth(run: str, model: str, width: int) -> dict:
    """RSS growth per worker of one run on `model` at `width`, in units of W, in a launch of its
    own: each rank's, and the larger rank's."""
    _, mode, num_workers, launcher, backend = GROWTH_RUNS[run]
    with common.work_directory(f"memory-{run}-{model}-{width}") as work:
        command = common.worker_command(
            "memory-per-parameter", "--mode", mode, "--model", model, "--width", width,
            "--layers", GROWTH_MODEL["layers"], "--micro-batch", GROWTH_MODEL["micro_batch"],
            "--global-batch", GROWTH_MODEL["global_batch"], "--updates", GROWTH_MODEL["updates"],
            "--out", work, num_workers=num_workers, launcher=launcher)
        common.run_command(command, work / "workers.log", extra_env={**LIVE, **(backend or {})},
                           timeout=900)
        ranks = [common.read_json(work / f"rank{rank}.json") for rank in range(num_workers)]
    growth = {part: [(rank[f"{part}_mb"] - rank["base_mb"]) / rank["weights_mb"]
                     for rank in ranks] for part in ("steady", "peak")}
    return {"workers": num_workers, "k": ranks[0]["k"], "weights_mb": ranks[0]["weights_mb"],
            "gradient_sums": ranks[0]["gradient_sums"],
            **{f"{part}_w": max(values) for part, values in growth.items()},
            **{f"{part}_w_ranks": values for part, values in growth.items()}}


def summarize_growth(runs: list[dict], cases: tuple) -> list[dict]:
    """One row per case and run: its workers, k and W, the steady and peak growth over the
    repeats (each repeat's larger rank), and each rank's median."""
    rows = []
    for model, width, names in cases:
        for name in names:
            measured = [run[name, model, width] for run in runs]
            rows.append({
                "run": name, "label": GROWTH_RUNS[name][0], "model": model, "width": width,
                "judged": set(UNSHARDED) <= set(names),
                **{key: measured[0][key]
                   for key in ("workers", "k", "weights_mb", "gradient_sums")},
                **{part: common.summarize(m[part] for m in measured)
                   for part in ("steady_w", "peak_w")},
                **{f"{part}_ranks": [common.summarize(ranks).median for ranks in
                                     zip(*(m[f"{part}_ranks"] for m in measured))]
                   for part in ("steady_w", "peak_w")}})
    return rows


def growth_table(rows: list[dict]) -> str:
    """The rows, then the slope between the two sizes of the Dense stack, for each run measured
    at both."""
    text = common.markdown_table(
        ["run", "model", "W, MB", "workers", "k", "steady growth, W", "peak growth, W",
         "peak growth by rank, W"],
        [[row["label"], MODEL_LABELS[row["model"]], f"{row['weights_mb']:,.0f}", row["workers"],
          row["k"] or "—",
          row["steady_w"].format(2), row["peak_w"].format(2),
          ", ".join(f"{peak:.2f}" for peak in row["peak_w_ranks"])] for row in rows])
    slopes = []
    for name, (label, *_) in GROWTH_RUNS.items():
        sizes = sorted((row for row in rows if row["run"] == name and row["model"] == "dense"),
                       key=lambda r: r["weights_mb"])
        if len(sizes) == 2:
            small, large = sizes
            # MB of growth per MB of weights added, times 4 bytes a float32 parameter.
            slope = [4 * (large[part].median * large["weights_mb"] -
                          small[part].median * small["weights_mb"]) /
                     (large["weights_mb"] - small["weights_mb"]) for part in ("steady_w", "peak_w")]
            slopes.append(f"{label} {slope[0]:.1f} steady, {slope[1]:.1f} peak")
    if slopes:
        text += ("\n\nSlope, the growth per parameter added from the smaller model to the larger, "
                 f"in bytes: {'; '.join(slopes)}.")
    return text


def growth_target(row: dict, rows: list[dict]) -> tuple[str, float]:
    """A judged run's target, as text and as a peak in W: no waste (Keras + 1 W per gradient
    sum + 0.25 W); sharded on the Dense stack, Keras + 1 W per gradient sum − 0.65 W on 2
    workers (Keras + 0.35 W for these models' one sum) and lower still on 4 (the same
    backend's 2-worker peak). The Embedding's owner holds the table's whole state: no waste is
    its target."""
    keras = next(r for r in rows if r["judged"] and r["model"] == row["model"]
                 and r["width"] == row["width"] and r["run"] == "keras")["peak_w"].median
    sums = row["gradient_sums"]
    if row["run"] in SHARDED and row["model"] == "dense":
        allowance = sums - 1 + SHARDED_SPARE
    elif row["run"] in SHARDED_4:
        two = row["run"].removesuffix("-4")
        two_workers = next(r for r in rows if r["model"] == row["model"]
                           and r["width"] == row["width"] and r["run"] == two)
        return f"< {GROWTH_RUNS[two][0]}", two_workers["peak_w"].median - 1e-9
    else:
        allowance = sums + SPARE
    return (f"≤ Keras + {allowance:.2f} ({sums} gradient sum{'s' if sums != 1 else ''})",
            keras + allowance)


def growth_checks(rows: list[dict], smoke: bool) -> list[dict]:
    """Each judged distaccum run's peak against its target."""
    keras_peak = {(row["model"], row["width"]): row["peak_w"] for row in rows
                  if row["judged"] and row["run"] == "keras"}
    checks = []
    for row in rows:
        if not row["judged"] or row["run"] == "keras":
            continue
        target, limit = growth_target(row, rows)
        checks.append(common.check(
            f"memory per parameter, {MODEL_LABELS[row['model']]}: {row['label']}, peak growth ÷ W",
            target,
            f"{row['peak_w'].format(2)} (Keras {keras_peak[row['model'], row['width']].format(2)})",
            None if smoke else row["peak_w"].median <= limit))
    return checks


def growth_plot(rows: list[dict]) -> dict:
    bars = [{"label": (f"{row['label'].replace('`', '')}\n{MODEL_LABELS[row['model']]}, "
                       f"W = {row['weights_mb']:,.0f} MB"),
             **row["peak_w"].as_dict()} for row in rows]
    return {"kind": "bars", "title": "4. Memory per parameter: peak growth", "ylabel": "W",
            "bars": bars}


def summarize(runs: list[dict]) -> dict:
    """Per mode, peak and training part; and the two ratios, each within one repeat."""
    summary = {
        f"{mode}_{part}": common.summarize(run[mode][f"{part}_mb"] for run in runs)
        for mode in MODES for part in ("peak", "training")
    }
    for part in ("peak", "training"):
        summary[f"ratio_{part}"] = common.summarize(
            run["accumulate"][f"{part}_mb"] / run["direct"][f"{part}_mb"] for run in runs)
    return summary


def table(summary: dict, micro_batch: int) -> str:
    rows = [[f"{label} (b = {micro_batch})", summary[f"{mode}_peak"].format(),
             summary[f"{mode}_training"].format()] for mode, label in MODES.items()]
    rows.append(["distaccum ÷ direct", summary["ratio_peak"].format(3),
                 summary["ratio_training"].format(3)])
    return common.markdown_table(["update", "peak RSS, MB", "training part, MB"], rows)


def plot(summary: dict) -> dict:
    bars = [{"label": f"{label}\n{part}", **summary[f"{mode}_{part}"].as_dict()}
            for mode, label in MODES.items() for part in ("peak", "training")]
    return {"kind": "bars", "title": "4. Memory, conv model, k = 8", "ylabel": "MB",
            "bars": bars}


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=3)
    model = SMOKE_MODEL if args.smoke else FULL_MODEL
    cases = SMOKE_CASES if args.smoke else FULL_CASES
    runs, growth_runs = [], []
    for _ in range(args.repeats):
        runs.append({mode: measure_once(mode, model) for mode in MODES})
        growth_runs.append({(name, model, width): measure_growth(name, model, width)
                            for model, width, names in cases for name in names})
    summary = summarize(runs)
    growth = summarize_growth(growth_runs, cases)
    ratio = summary["ratio_peak"]
    common.emit({
        "figure": "memory", "smoke": args.smoke,
        "title": "4. Memory: peak resident memory, k = 8 vs one direct step on 8b; memory per "
                 "parameter",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": (f"Activation memory, conv model:\n\n{table(summary, model['micro_batch'])}\n\n"
                  f"Memory per parameter, Adam, global batch "
                  f"{GROWTH_MODEL['global_batch']}:\n\n{growth_table(growth)}"),
        "checks": [common.check("memory: distaccum peak ÷ direct step peak", f"≤ {TARGET}",
                                ratio.format(3), None if args.smoke else ratio.median <= TARGET),
                   *growth_checks(growth, args.smoke)],
        "plots": [plot(summary), growth_plot(growth)],
        "per_parameter": [{**row, **{part: row[part].as_dict() for part in ("steady_w", "peak_w")}}
                          for row in growth],
    }, args.json)


if __name__ == "__main__":
    common.run_main("memory", main)
