"""Figure 6, side by side with the real peers: Horovod's `backward_passes_per_step` and
`tf.distribute`.

Exactness: every system trains the case of `peers/case.py` (2 workers, uneven shards of 120 and 83
samples, a ragged last micro-batch, sample weights, SGD with momentum, k = 4, micro-batch 8, 2
epochs) from the same initial weights, each with the script its users would write (`peers/*.py`);
the table gives each final weights' largest error against the exact large-batch reference (float64,
`case.reference`: Keras's loss on each window's joined batch under the loss's own reduction, here
the default `sum_over_batch_size`), relative to how far training moved the weights, and its
optimizer's `iterations` (8 updates in the exact run). Throughput: 2 workers (one intra-op thread
each) inside the rate-limited namespaces of figure 2 (100 Mbit/s and 1 Gbit/s), the synthetic
≈2.1 M-parameter MLP, micro-batch 32, k = 1, 4, 16, global batch 2 × k × 32 for all: distaccum on
Horovod (and (b), its compute limit, in the same processes), Horovod's own accumulation on Keras 2
(`tf-keras`, the only Keras Horovod's API runs with), and a `MultiWorkerMirroredStrategy` custom
loop with per-replica batch b (an allreduce every micro-batch, distaccum's memory) and k·b (one
allreduce per update, k× the activation memory). Each system runs in its own pair of processes, one
after the other on the same link; ratios are of medians within one run of this script. Needs root
for the namespaces; `--smoke` runs a few systems on the host loopback instead (the MWMS loop's b
and k·b in one pair of processes); `--exactness-only` prints the exactness table and writes no
figure.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import common
import slow_link
from common import DISTACCUM, NO_COMMUNICATION

sys.path.insert(0, str(common.BENCHMARKS_DIR / "peers"))
import case  # noqa: E402  (the peers' scripts live beside it, not in a package)
import distaccum_exact  # noqa: E402
import horovod_keras  # noqa: E402
import tf_distribute  # noqa: E402

LEGACY_KERAS = {"TF_USE_LEGACY_KERAS": "1"}
# (label, module, arguments after the subcommand, extra environment)
EXACTNESS_RUNS = (
    ("distaccum (mpi4py)", distaccum_exact, [], {"DISTACCUM_BACKEND": "mpi"}),
    ("Horovod bpps, average_aggregated_gradients=True", horovod_keras,
     ["exactness", "--variant", "average"], LEGACY_KERAS),
    ("Horovod bpps, average_aggregated_gradients=False", horovod_keras,
     ["exactness", "--variant", "sum"], LEGACY_KERAS),
    ("tf.distribute MWMS, Keras 3 `fit`", tf_distribute,
     ["exactness", "--variant", "keras_fit"], {}),
    ("tf.distribute MWMS, Keras 3 `gradient_accumulation_steps`", tf_distribute,
     ["exactness", "--variant", "keras_gradient_accumulation"], {}),
    ("tf.distribute MWMS custom loop, per-replica batch b", tf_distribute,
     ["exactness", "--variant", "custom_loop_b"], {}),
    ("tf.distribute MWMS custom loop, per-replica batch k·b", tf_distribute,
     ["exactness", "--variant", "custom_loop_kb"], {}),
)
SMOKE_EXACTNESS = (0, 1, 3)  # distaccum, one Horovod run, the Keras 3 fit that fails

HOROVOD_BPPS = "horovod_bpps"
MWMS_B, MWMS_KB = "tf_distribute_b", "tf_distribute_kb"
THROUGHPUT_LABELS = {
    DISTACCUM: "distaccum (Horovod)",
    HOROVOD_BPPS: "Horovod bpps (Keras 2)",
    MWMS_B: "MWMS loop, batch b",
    MWMS_KB: "MWMS loop, batch k·b (k× memory)",
    NO_COMMUNICATION: "(b) no communication",
}
SAME_MEMORY_PEERS = (HOROVOD_BPPS, MWMS_B)
HOROVOD_TARGET = 0.95
# Why Horovod can lead at k = 1, where both allreduce every micro-batch (not measured apart).
OVERLAP_NOTE = ("at k = 1 Horovod's optimizer allreduces each gradient tensor on its own, so the "
                "first can travel while backpropagation still produces the rest; distaccum's one "
                "grouped allreduce per update starts when the whole gradient is ready")
# `mwms_launches`: the MWMS loop's per-replica batches, a pair of workers for each entry. The
# smoke run times b and k·b in one pair: each launch is mostly TensorFlow's start-up there.
FULL_SETTINGS = {"accumulation_steps": (1, 4, 16), "micro_batches": 16, "min_updates": 3,
                 "mwms_launches": (("b",), ("kb",))}
SMOKE_SETTINGS = {"accumulation_steps": (2,), "micro_batches": 2, "min_updates": 1,
                  "mwms_launches": (("b", "kb"),)}


def peer_command(module, arguments: list[str], work) -> list[str]:
    """The launch command of one peer's script (`tf_distribute` starts its own workers)."""
    if module is tf_distribute:
        return tf_distribute.command(arguments, str(work), timeout=900)
    return module.command(arguments)


def run_exactness(label: str, module, arguments: list[str], env: dict,
                  exact: list) -> dict:
    """One system's run of the case: its result, with the error against the reference."""
    with common.work_directory("peers-exactness") as work:
        command = peer_command(module, [*arguments, "--out", str(work)], work)
        failure = ""
        try:
            common.run_command(command, work / "run.log", extra_env=env, timeout=900)
        except common.BenchmarkError as error:
            failure = str(error)
        result_file = work / "result.json"
        if not result_file.exists():
            return {"label": label, "status": "error", "error": failure, "iterations": None,
                    "error_vs_exact": None, "note": ""}
        result = json.loads(result_file.read_text())
    if result.get("reduction", case.REDUCTION) != case.REDUCTION:
        raise common.BenchmarkError(f"{label} trained with reduction {result['reduction']!r}; "
                                    f"the reference uses {case.REDUCTION!r} (case.REDUCTION)")
    weights = result.get("weights")
    return {"label": label, "status": result["status"], "error": result.get("error", ""),
            "iterations": result.get("iterations"), "note": result.get("note", ""),
            "error_vs_exact": case.relative_error(weights, exact) if weights else None}


def exactness_table(rows: list[dict]) -> str:
    updates = case.EPOCHS * case.updates_per_epoch()
    return common.markdown_table(
        ["system", "ran", "max error vs exact (÷ weights' movement)",
         f"iterations (exact: {updates})", "what happened"],
        [[r["label"], r["status"],
          f"{r['error_vs_exact']:.1e}" if r["error_vs_exact"] is not None else "—",
          r["iterations"] if r["iterations"] is not None else "—",
          (r["error"] or r["note"]).replace("|", "/")] for r in rows])


def measure_throughput(prefix: list[str], settings: dict, repeats: int) -> list[dict]:
    """Every system at every k on one link, each in its own pair of processes, in turn."""
    ks = [str(k) for k in settings["accumulation_steps"]]
    common_arguments = ["--accumulation-steps", *ks, "--micro-batches",
                        str(settings["micro_batches"]), "--min-updates",
                        str(settings["min_updates"]), "--repeats", str(repeats)]
    runs = (
        (None, [], {}),  # distaccum and (b): figure 2's workers
        (horovod_keras, ["throughput", *common_arguments, "--micro-batch",
                         str(common.MICRO_BATCH_SIZE)], LEGACY_KERAS),
        *((tf_distribute, ["throughput", "--per-replica", *per_replica, *common_arguments,
                           "--micro-batch", str(common.MICRO_BATCH_SIZE)], {})
          for per_replica in settings["mwms_launches"]),
    )
    measurements = []
    for module, arguments, env in runs:
        with common.work_directory("peers-throughput") as work:
            if module is None:
                command = common.worker_command(
                    "slow-link", *common_arguments, "--methods", DISTACCUM, NO_COMMUNICATION,
                    "--out", work, num_workers=2)
            else:
                command = peer_command(module, [*arguments, "--out", str(work)], work)
            common.run_command([*prefix, *command], work / "run.log", extra_env=env,
                               timeout=3000)
            for m in common.read_json(work / common.CHIEF_RESULT):
                measurements.append({**m, "system": m.get("system", m.get("method"))})
    return measurements


def summarize_throughput(measurements: list[dict]) -> dict[int, dict[str, common.Summary]]:
    """Per k and system: samples/s over the repeats."""
    rates = defaultdict(lambda: defaultdict(list))
    for m in measurements:
        rates[m["k"]][m["system"]].append(m["samples"] / m["seconds"])
    return {k: {system: common.summarize(values) for system, values in by_system.items()}
            for k, by_system in rates.items()}


def throughput_table(links: dict[str, dict]) -> str:
    rows = []
    for link, by_k in links.items():
        for k, rates in sorted(by_k.items()):
            ours = rates[DISTACCUM].median
            rows.append([link, k, *(rates[s].format() for s in THROUGHPUT_LABELS),
                         *(f"{ours / rates[s].median:.2f}"
                           for s in (HOROVOD_BPPS, MWMS_B, MWMS_KB, NO_COMMUNICATION))])
    return common.markdown_table(
        ["link", "k", *(f"{label}, samples/s" for label in THROUGHPUT_LABELS.values()),
         "distaccum ÷ Horovod bpps", "÷ MWMS b", "÷ MWMS k·b", "÷ (b)"], rows)


def checks(links: dict[str, dict]) -> list[dict]:
    """distaccum ≥ every same-memory peer at every k, and ≥ 0.95 × Horovod bpps."""
    items = []
    for link, by_k in links.items():
        for k, rates in sorted(by_k.items()):
            ours = rates[DISTACCUM].median
            for peer in SAME_MEMORY_PEERS:
                ratio = ours / rates[peer].median
                note = OVERLAP_NOTE if peer == HOROVOD_BPPS and k == 1 and ratio < 1 else ""
                items.append(common.check(
                    f"{link}, k={k}: distaccum ÷ {THROUGHPUT_LABELS[peer]} (same memory)",
                    "≥ 1", f"{ratio:.2f}", ratio >= 1, note))
            ratio = ours / rates[HOROVOD_BPPS].median
            items.append(common.check(f"{link}, k={k}: distaccum ÷ Horovod bpps",
                                      f"≥ {HOROVOD_TARGET}", f"{ratio:.2f}",
                                      ratio >= HOROVOD_TARGET))
    return items


def plot(link: str, by_k: dict[int, dict]) -> dict:
    ks = sorted(by_k)
    series = [{"label": label, "x": ks, "y": [by_k[k][system].median for k in ks],
               "low": [by_k[k][system].low for k in ks],
               "high": [by_k[k][system].high for k in ks], "style": "o-"}
              for system, label in THROUGHPUT_LABELS.items()]
    return {"kind": "lines", "title": f"6. Peers, 2 workers, {link}", "xlabel": "k",
            "ylabel": "samples/s", "log": True, "series": series}


def figure(exactness: list[dict], links: dict[str, dict], smoke: bool, skipped: str = "") -> dict:
    tables = exactness_table(exactness) + "\n\n" + (
        f"throughput skipped: {skipped}" if skipped else throughput_table(links))
    return {"figure": "peer_systems", "smoke": smoke, "title": "6. Side by side with the peers",
            "how": __doc__.split("\n\n", 1)[1].strip(), "table": tables,
            "checks": [] if smoke or skipped else checks(links),
            "plots": [plot(link, by_k) for link, by_k in links.items()]}


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=3, flags={
        "--exactness-only": "only the exactness runs: print their table, write no figure"})
    if args.exactness_only and args.json:
        raise common.BenchmarkError("--exactness-only writes no figure: leave out --json")
    runs = [EXACTNESS_RUNS[i] for i in SMOKE_EXACTNESS] if args.smoke else EXACTNESS_RUNS
    exact, _ = case.reference()  # the float64 large-batch run, once
    exactness = [run_exactness(*run, exact) for run in runs]
    if args.exactness_only:
        print(exactness_table(exactness))
        return
    if args.smoke:
        links = {slow_link.SMOKE_LINK: summarize_throughput(
            measure_throughput([], SMOKE_SETTINGS, args.repeats))}
        common.emit(figure(exactness, links, smoke=True), args.json)
        return
    links = {}
    try:
        for link, rate in slow_link.LINKS:
            with slow_link.rate_limited_namespace(rate) as prefix:
                links[link] = summarize_throughput(
                    measure_throughput(prefix, FULL_SETTINGS, args.repeats))
    except slow_link.NamespaceUnavailable as reason:
        print(f"peer_systems: throughput skipped: {reason}")
        common.emit(figure(exactness, {}, smoke=False, skipped=str(reason)), args.json)
        return
    common.emit(figure(exactness, links, smoke=False), args.json)


if __name__ == "__main__":
    common.run_main("peer_systems", main)
