"""Figure 3, overhead: distaccum's micro-step vs Keras 3's own compiled training step.

One process, one intra-op thread, the synthetic ≈2.1 M-parameter MLP and one fixed micro-batch of
32 samples (so the input pipeline plays no part). Keras runs `train_on_batch` and `fit` on a
repeating dataset of that batch; the faster of the two is the reference. distaccum runs its
micro-step alone, and whole windows as `fit` runs them: at k = 1 one call (the update step trains
the micro-batch itself), at k = 8 the first 7 micro-batches in one compiled call and the update
step with the 8th; beside it the same window with one call per micro-batch (what `fit` did
before: the comparison that decided), and the k = 8 window under Keras's `mixed_bfloat16` policy
(the speed-up bfloat16 compute gives on this CPU). With XLA forced on (`jit_compile=True`):
Keras's `train_on_batch` (`compile(jit_compile=True)`), and distaccum's micro-step, k = 1 and
k = 8 windows (micro-steps as XLA clusters, the update step as two around its allreduce), each
taken against Keras's XLA step. In every repeat each runner trains the same number of
micro-batches in turn, so each repeat's ratios compare runs made moments apart. Start-up: one
fresh process per case and repeat, seconds from `compile` (distaccum: creating the Trainer) to
the end of the first update, with XLA and without; the difference is what XLA's compiling adds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import common

KERAS_RUNNERS = {"keras_train_on_batch": "Keras `train_on_batch`", "keras_fit": "Keras `fit`"}
KERAS_XLA_RUNNER = "keras_train_on_batch_xla"
KERAS_XLA_RUNNERS = {KERAS_XLA_RUNNER: "Keras `train_on_batch`, XLA (`compile(jit_compile=True)`)"}
DISTACCUM_RUNNERS = {
    "micro_step": "distaccum micro-step",
    "window_k1": "distaccum k=1 window (one call: the update step trains the micro-batch)",
    "window_k8": "distaccum k=8 window (7 micro-steps in one call + update step)",
    "window_k8_call_each": "distaccum k=8 window, one call per micro-batch",
    "window_k8_mixed_bfloat16": "distaccum k=8 window, mixed_bfloat16",
}
DISTACCUM_XLA_RUNNERS = {
    "micro_step_xla": "distaccum micro-step, XLA (`jit_compile=True`)",
    "window_k1_xla": "distaccum k=1 window, XLA (the update step's two XLA clusters)",
    "window_k8_xla": "distaccum k=8 window, XLA (7 micro-steps in one XLA call + update step)",
}
RUNNERS = {**KERAS_RUNNERS, **KERAS_XLA_RUNNERS, **DISTACCUM_RUNNERS, **DISTACCUM_XLA_RUNNERS}
# Start-up: each case's first update without XLA and with it (the case's name + "_xla").
START_UP_CASES = {"keras_train_on_batch": "Keras `train_on_batch`",
                  "window_k1": "distaccum k=1 window", "window_k8": "distaccum k=8 window"}
TARGET = 0.95
FULL_STEPS = 160  # micro-batches per timed run: about a second each
SMOKE_STEPS = 8


def measure(repeats: int, steps: int, smoke: bool) -> tuple[list[dict], list[dict]]:
    """Samples/s of every runner, then seconds to the first update of each start-up case with
    XLA and without: one fresh process per case and repeat (cases in turn within a repeat). A
    smoke run times the first two cases once, in the runners' process before them."""
    cases = [f"{case}{suffix}" for case in list(START_UP_CASES)[:2 if smoke else None]
             for suffix in ("", "_xla")]
    with common.work_directory("overhead") as work:
        def run_worker(*arguments) -> None:
            (work / common.START_UP_RESULT).unlink(missing_ok=True)
            common.run_command([str(common.PYTHON), __file__, "worker", "--out", str(work),
                                *map(str, arguments)], work / "worker.log", timeout=900)

        run_worker("--repeats", repeats, "--steps", steps,
                   *(["--start-up-cases", *cases] if smoke else []))
        throughput = common.read_json(work / common.CHIEF_RESULT)
        if smoke:
            return throughput, common.read_json(work / common.START_UP_RESULT)
        start_up = []
        for repeat in range(repeats):
            for case in cases:
                run_worker("--start-up-cases", case)
                start_up += [{"repeat": repeat, **m}
                             for m in common.read_json(work / common.START_UP_RESULT)]
        return throughput, start_up


def summarize(measurements: list[dict]) -> tuple[dict, dict, dict, dict]:
    """Samples/s per runner, and ratios within each repeat: per distaccum runner (and Keras's
    XLA step) to the faster Keras runner; per distaccum XLA runner to Keras's XLA step; per
    XLA runner to the same runner without XLA."""
    by_repeat = defaultdict(dict)
    for m in measurements:
        by_repeat[m["repeat"]][m["method"]] = m["samples_per_second"]
    runs = list(by_repeat.values())
    rates = {name: common.summarize(run[name] for run in runs) for name in RUNNERS}
    ratios = {name: common.summarize(run[name] / max(run[k] for k in KERAS_RUNNERS)
                                     for run in runs)
              for name in {**DISTACCUM_RUNNERS, **KERAS_XLA_RUNNERS}}
    ratios["bfloat16_over_float32"] = common.summarize(
        run["window_k8_mixed_bfloat16"] / run["window_k8"] for run in runs)
    ratios["one_call_over_call_each"] = common.summarize(
        run["window_k8"] / run["window_k8_call_each"] for run in runs)
    xla_ratios = {name: common.summarize(run[name] / run[KERAS_XLA_RUNNER] for run in runs)
                  for name in DISTACCUM_XLA_RUNNERS}
    xla_speed_ups = {name: common.summarize(run[name] / run[name.removesuffix("_xla")]
                                            for run in runs)
                     for name in {**KERAS_XLA_RUNNERS, **DISTACCUM_XLA_RUNNERS}}
    return rates, ratios, xla_ratios, xla_speed_ups


def summarize_start_up(measurements: list[dict]) -> dict:
    """Per case: seconds to the first update without XLA, with it, and the difference (each
    repeat's, so both halves of a difference were timed moments apart)."""
    by_repeat = defaultdict(dict)
    for m in measurements:
        by_repeat[m.get("repeat", 0)][m["case"]] = m["seconds"]
    runs = list(by_repeat.values())
    return {case: {"without": common.summarize(run[case] for run in runs),
                   "with": common.summarize(run[f"{case}_xla"] for run in runs),
                   "adds": common.summarize(run[f"{case}_xla"] - run[case] for run in runs)}
            for case in START_UP_CASES if case in runs[0]}


def table(rates: dict, ratios: dict, xla_ratios: dict, xla_speed_ups: dict,
          start_up: dict) -> str:
    rows = [[label, rates[name].format(),
             ratios[name].format(3) if name in ratios else "—",
             xla_ratios[name].format(3) if name in xla_ratios else "—"]
            for name, label in RUNNERS.items()]
    speed_ups = "; ".join(f"{short_label(RUNNERS[name]).removesuffix(', XLA')} "
                          f"{ratio.format(2)}" for name, ratio in xla_speed_ups.items())
    start_up_rows = [[label, *(start_up[case][column].format(2)
                               for column in ("without", "with", "adds"))]
                     for case, label in START_UP_CASES.items() if case in start_up]
    return "\n\n".join([
        common.markdown_table(["runner (one process, micro-batch 32)", "samples/s",
                               "÷ faster Keras runner (no XLA)", "÷ Keras `train_on_batch`, XLA"],
                              rows),
        "mixed_bfloat16 ÷ float32, k=8 windows: "
        f"{ratios['bfloat16_over_float32'].format(2)}; 7 micro-steps in one call ÷ one call "
        f"each, k=8 windows: {ratios['one_call_over_call_each'].format(2)}",
        f"XLA ÷ no XLA, samples/s of the same runner: {speed_ups}",
        common.markdown_table(["seconds from `compile` (distaccum: creating the Trainer) to the "
                               "end of the first update, a fresh process each", "without XLA",
                               "with XLA", "XLA adds"], start_up_rows)])


def short_label(label: str) -> str:
    return label.replace("`", "").split(" (")[0]


def plot(rates: dict, start_up: dict) -> list[dict]:
    bars = [{"label": short_label(label), **rates[name].as_dict()}
            for name, label in RUNNERS.items()]
    start_up_bars = [{"label": short_label(label) + (", XLA" if column == "with" else ""),
                      **start_up[case][column].as_dict()}
                     for case, label in START_UP_CASES.items() if case in start_up
                     for column in ("without", "with")]
    return [{"kind": "bars", "title": "3. Overhead, one process", "ylabel": "samples/s",
             "bars": bars},
            {"kind": "bars", "title": "3. Overhead: compile to the first update",
             "ylabel": "seconds", "bars": start_up_bars}]


def checks(ratios: dict, xla_ratios: dict, start_up: dict, judged: bool) -> list[dict]:
    """The issue's targets (judged unless a smoke run), and the XLA rows reported beside."""
    def ratio_check(claim, ratio, target=TARGET):
        return common.check(claim, f"≥ {target}" if target else "—", ratio.format(3),
                            ratio.median >= target if judged and target else None)

    adds = [start_up[case]["adds"].format(2) for case in ("window_k1", "keras_train_on_batch")]
    return [
        ratio_check("overhead: distaccum micro-step ÷ Keras training step", ratios["micro_step"]),
        ratio_check("overhead: distaccum k=1 window ÷ Keras training step", ratios["window_k1"]),
        ratio_check("overhead, XLA: distaccum k=1 window ÷ Keras XLA training step",
                    xla_ratios["window_k1_xla"]),
        ratio_check("overhead, XLA: distaccum micro-step ÷ Keras XLA training step",
                    xla_ratios["micro_step_xla"], target=None),
        ratio_check("overhead, XLA: distaccum k=8 window ÷ Keras XLA training step",
                    xla_ratios["window_k8_xla"], target=None),
        common.check("overhead, XLA: seconds it adds to the first update, distaccum k=1 window "
                     "/ Keras `train_on_batch`", "—", " / ".join(adds), None),
    ]


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=5)
    throughput, start_up = measure(args.repeats, SMOKE_STEPS if args.smoke else FULL_STEPS,
                                   args.smoke)
    rates, ratios, xla_ratios, xla_speed_ups = summarize(throughput)
    start_up = summarize_start_up(start_up)
    common.emit({
        "figure": "overhead", "smoke": args.smoke,
        "title": "3. Overhead: distaccum's micro-step vs Keras's training step",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": table(rates, ratios, xla_ratios, xla_speed_ups, start_up),
        "checks": checks(ratios, xla_ratios, start_up, judged=not args.smoke),
        "plots": plot(rates, start_up),
    }, args.json)


# The measured process: `overhead.py worker ...`, started by `measure`. It alone imports TensorFlow
# (with `workers.py`, whose runners without XLA it times unchanged).


def worker(argv: list[str]) -> None:
    """Seconds to the first update of each `--start-up-cases` case, in turn; then, with
    `--steps`, samples/s of every runner on one fixed micro-batch, interleaved in each repeat."""
    parser = argparse.ArgumentParser(prog="overhead.py worker", description=worker.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--repeats", type=common.positive_int, default=1)
    parser.add_argument("--steps", type=common.positive_int, help="micro-batches per timed run")
    parser.add_argument("--start-up-cases", nargs="+", default=(), choices=[
        f"{case}{suffix}" for case in START_UP_CASES for suffix in ("", "_xla")])
    args = parser.parse_args(argv)
    import distaccum  # here only: the figure itself runs without TensorFlow
    import workers
    import workload

    workload.configure_threads()
    distaccum.init()
    x, y = workload.first_micro_batch()
    if args.start_up_cases:
        (args.out / common.START_UP_RESULT).write_text(json.dumps(
            [{"case": case, "seconds": first_update_seconds(case, x, y)}
             for case in args.start_up_cases]))
    if args.steps is None:
        return
    runners = {**workers.keras_runners(x, y), KERAS_XLA_RUNNER: keras_xla_runner(x, y),
               **workers.distaccum_runners(x, y), **distaccum_xla_runners(x, y)}
    for run in runners.values():
        run(8)  # warm-up: tracing (and XLA's compiling) stays out of the timings
    measurements = []
    for repeat in range(args.repeats):
        for method, run in runners.items():
            started = time.perf_counter()
            run(args.steps)
            seconds = time.perf_counter() - started
            measurements.append({"repeat": repeat, "method": method, "samples_per_second":
                                 args.steps * common.MICRO_BATCH_SIZE / seconds})
    workers.write_chief(args.out, measurements)


def trainer_on(model, accumulation_steps: int, jit_compile: bool):
    """`workload.synthetic_trainer`'s Trainer, `jit_compile` given (it leaves "auto": no XLA on
    a CPU)."""
    import distaccum
    import workload

    return distaccum.Trainer(model, workload.make_optimizer(), loss=workload.classification_loss(),
                             accumulation_steps=accumulation_steps, jit_compile=jit_compile)


def keras_xla_runner(x, y):
    """`train_on_batch` of the model `workers.keras_runners` times, compiled for XLA."""
    import workload

    model = workload.synthetic_model()
    model.compile(optimizer=workload.make_optimizer(), loss=workload.classification_loss(),
                  jit_compile=True)

    def run(steps: int) -> None:
        for _ in range(steps):
            model.train_on_batch(x, y)
    return run


def windows(trainer, x, y):
    """Windows as `fit` runs them, as `workers.distaccum_runners` times them."""
    def run(steps: int) -> None:
        stored = [(x, y, None)] * (trainer.accumulation_steps - 1)
        for _ in range(steps // trainer.accumulation_steps):
            trainer.micro_steps(stored)
            trainer.update_step(last_micro_batch=(x, y, None))
    return run


def distaccum_xla_runners(x, y) -> dict:
    """The micro-step, the k=1 and the k=8 window with XLA forced on (`jit_compile=True`)."""
    import tensorflow as tf
    import workload

    spec = (tf.TensorSpec.from_tensor(x), tf.TensorSpec.from_tensor(y))
    trainers = {name: trainer_on(workload.synthetic_model(), k, jit_compile=True)
                for name, k in (("micro_step_xla", 1), ("window_k1_xla", 1), ("window_k8_xla", 8))}
    for trainer in trainers.values():
        trainer.prepare(spec)
        if not trainer.jit_compile:
            raise SystemExit("overhead.py: error: jit_compile=True trains without XLA (see the "
                             "XLAWarning above)")

    def micro_steps(steps: int) -> None:
        for _ in range(steps):
            trainers["micro_step_xla"].micro_step(x, y)

    return {"micro_step_xla": micro_steps,
            **{name: windows(trainers[name], x, y) for name in ("window_k1_xla", "window_k8_xla")}}


def first_update_seconds(case: str, x, y) -> float:
    """Seconds from `compile` (distaccum: creating the Trainer) to the end of the first update,
    the model built before: the tracing, and XLA's compiling, the first update costs."""
    import tensorflow as tf
    import workload

    jit_compile = case.endswith("_xla")
    model = workload.synthetic_model()
    started = time.perf_counter()
    if case.startswith("keras"):
        model.compile(optimizer=workload.make_optimizer(), loss=workload.classification_loss(),
                      jit_compile=jit_compile)
        model.train_on_batch(x, y)
        optimizer = model.optimizer
    else:
        trainer = trainer_on(model, 8 if "_k8" in case else 1, jit_compile)
        trainer.prepare((tf.TensorSpec.from_tensor(x), tf.TensorSpec.from_tensor(y)))
        windows(trainer, x, y)(trainer.accumulation_steps)
        optimizer = trainer.optimizer
    if int(optimizer.iterations.numpy()) != 1:  # reading it waits for the update
        raise SystemExit(f"overhead.py: error: {case}: not one update after the first window")
    return time.perf_counter() - started


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2:])
    else:
        common.run_main("overhead", main)
