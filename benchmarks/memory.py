"""Figure 4, memory: peak resident memory of distaccum (micro-batch b, k = 8) vs one step on 8b.

An activation-heavy convolutional model: six full-resolution 3×3 convolutions of 16 filters on
64×64×3 images (≈12 k parameters, but 64×64×16 activations per layer and sample). distaccum runs
one update of 8 micro-steps on b = 64 images; the direct step is Keras's `train_on_batch` on 512.
Each measurement is a fresh process with one intra-op thread (`ru_maxrss`, the peak, never goes
down), the two kinds alternating. The target's figure is the whole process's peak, TensorFlow's
own ≈0.6 GB included; the training part alone (peak minus the peak before the first step) is
shown too.
"""

from __future__ import annotations

import common

ACCUMULATION_STEPS = 8
TARGET = 0.5
FULL_MODEL = {"micro_batch": 64, "conv_layers": 6, "conv_filters": 16}
SMOKE_MODEL = {"micro_batch": 2, "conv_layers": 1, "conv_filters": 4}
MODES = {"direct": "one Keras step on 8b", "accumulate": "distaccum, b × 8 micro-steps"}


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
    runs = [{mode: measure_once(mode, model) for mode in MODES} for _ in range(args.repeats)]
    summary = summarize(runs)
    ratio = summary["ratio_peak"]
    common.emit({
        "figure": "memory", "smoke": args.smoke,
        "title": "4. Memory: peak resident memory, k = 8 vs one direct step on 8b",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": table(summary, model["micro_batch"]),
        "checks": [common.check("memory: distaccum peak ÷ direct step peak", f"≤ {TARGET}",
                                ratio.format(3), None if args.smoke else ratio.median <= TARGET)],
        "plots": [plot(summary)],
    }, args.json)


if __name__ == "__main__":
    common.run_main("memory", main)
