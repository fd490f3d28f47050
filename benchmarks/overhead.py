"""Figure 3, overhead: distaccum's micro-step vs Keras 3's own compiled training step.

One process, one intra-op thread, the synthetic ≈2.1 M-parameter MLP and one fixed micro-batch of
32 samples (so the input pipeline plays no part). Keras runs `train_on_batch` and `fit` on a
repeating dataset of that batch; the faster of the two is the reference. distaccum runs its
micro-step alone, and whole windows as `fit` runs them: at k = 1 one call (the update step trains
the micro-batch itself), at k = 8 the first 7 micro-batches in one compiled call and the update
step with the 8th; beside it the same window with one call per micro-batch (what `fit` did
before: the comparison that decided), and the k = 8 window under Keras's `mixed_bfloat16` policy
(the speed-up bfloat16 compute gives on this CPU). In every repeat each runner trains the same
number of micro-batches in turn, so each repeat's ratios compare runs made moments apart.
"""

from __future__ import annotations

from collections import defaultdict

import common

KERAS_RUNNERS = {"keras_train_on_batch": "Keras `train_on_batch`", "keras_fit": "Keras `fit`"}
DISTACCUM_RUNNERS = {
    "micro_step": "distaccum micro-step",
    "window_k1": "distaccum k=1 window (one call: the update step trains the micro-batch)",
    "window_k8": "distaccum k=8 window (7 micro-steps in one call + update step)",
    "window_k8_call_each": "distaccum k=8 window, one call per micro-batch",
    "window_k8_mixed_bfloat16": "distaccum k=8 window, mixed_bfloat16",
}
TARGET = 0.95
FULL_STEPS = 160  # micro-batches per timed run: about a second each
SMOKE_STEPS = 8


def measure(repeats: int, steps: int) -> list[dict]:
    with common.work_directory("overhead") as work:
        command = common.worker_command("overhead", "--repeats", repeats, "--steps", steps,
                                        "--out", work)
        common.run_command(command, work / "worker.log", timeout=900)
        return common.read_json(work / common.CHIEF_RESULT)


def summarize(measurements: list[dict]) -> tuple[dict, dict]:
    """Samples/s per runner, and per distaccum runner its ratio to the faster Keras runner of
    the same repeat."""
    by_repeat = defaultdict(dict)
    for m in measurements:
        by_repeat[m["repeat"]][m["method"]] = m["samples_per_second"]
    runs = list(by_repeat.values())
    rates = {name: common.summarize(run[name] for run in runs)
             for name in {**KERAS_RUNNERS, **DISTACCUM_RUNNERS}}
    ratios = {name: common.summarize(run[name] / max(run[k] for k in KERAS_RUNNERS)
                                     for run in runs)
              for name in DISTACCUM_RUNNERS}
    ratios["bfloat16_over_float32"] = common.summarize(
        run["window_k8_mixed_bfloat16"] / run["window_k8"] for run in runs)
    ratios["one_call_over_call_each"] = common.summarize(
        run["window_k8"] / run["window_k8_call_each"] for run in runs)
    return rates, ratios


def table(rates: dict, ratios: dict) -> str:
    rows = [[label, rates[name].format(), ratios[name].format(3) if name in ratios else "—"]
            for name, label in {**KERAS_RUNNERS, **DISTACCUM_RUNNERS}.items()]
    return common.markdown_table(
        ["runner (one process, micro-batch 32)", "samples/s", "÷ faster Keras runner"], rows) + (
        "\n\nmixed_bfloat16 ÷ float32, k=8 windows: "
        f"{ratios['bfloat16_over_float32'].format(2)}; 7 micro-steps in one call ÷ one call "
        f"each, k=8 windows: {ratios['one_call_over_call_each'].format(2)}")


def plot(rates: dict) -> dict:
    labels = {**KERAS_RUNNERS, **DISTACCUM_RUNNERS}
    bars = [{"label": labels[name].replace("`", "").split(" (")[0], **rates[name].as_dict()}
            for name in labels]
    return {"kind": "bars", "title": "3. Overhead, one process", "ylabel": "samples/s",
            "bars": bars}


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=5)
    rates, ratios = summarize(measure(args.repeats, SMOKE_STEPS if args.smoke else FULL_STEPS))
    judged = not args.smoke
    common.emit({
        "figure": "overhead", "smoke": args.smoke,
        "title": "3. Overhead: distaccum's micro-step vs Keras's training step",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": table(rates, ratios),
        "checks": [common.check(f"overhead: {claim} ÷ Keras training step", f"≥ {TARGET}",
                                ratios[name].format(3),
                                ratios[name].median >= TARGET if judged else None)
                   for name, claim in (("micro_step", "distaccum micro-step"),
                                       ("window_k1", "distaccum k=1 window"))],
        "plots": [plot(rates)],
    }, args.json)


if __name__ == "__main__":
    common.run_main("overhead", main)
