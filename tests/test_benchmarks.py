"""Smoke runs of the benchmark scripts: each runs end to end on tiny sizes and reports sane output.

Benchmarks are not tests: these prove the scripts work, not the figures (`bash benchmarks/run.sh`
measures those). The slow-link smoke run uses the host loopback, so no root or namespace is needed.
"""

from __future__ import annotations

import json
import math
import shlex
import sys

import pytest

from conftest import REPO_ROOT, VENV_BIN, WORKERS_DIR, run_script

BENCHMARKS_DIR = REPO_ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS_DIR))
import report  # noqa: E402  (a script beside its figures, not a package)
import sparse_exchange  # noqa: E402
# The scripts' horovodrun launches: the suite's (conftest), without horovodrun's build check.
HOROVODRUN = {"DISTACCUM_BENCH_HOROVODRUN": shlex.join(
    [str(VENV_BIN / "python"), str(WORKERS_DIR / "horovodrun_gloo.py")])}


def run_benchmark(tmp_path, script: str, *arguments: str) -> dict:
    """Run `benchmarks/SCRIPT.py --smoke` and return the figure it writes as JSON."""
    output = tmp_path / f"{script}.json"
    run_script("python", BENCHMARKS_DIR / f"{script}.py", "--smoke", "--json", output, *arguments,
               extra_env=HOROVODRUN)
    return json.loads(output.read_text())


@pytest.mark.multiworker
def test_communication_smoke_counts_one_grouped_allreduce_per_update_in_the_timeline(tmp_path):
    figure = run_benchmark(tmp_path, "communication")
    assert [check["passed"] for check in figure["checks"]] == [True, True]
    allreduces = figure["plots"][0]["series"][0]
    # 2 workers × 4 micro-batches of 32 = 256 samples: 4 updates at k=1, 2 at k=2.
    assert allreduces["x"] == [1, 2]
    assert allreduces["y"] == [4 * 1000 / 256, 2 * 1000 / 256]


@pytest.mark.multiworker
def test_slow_link_smoke_times_distaccum_and_both_baselines_side_by_side(tmp_path):
    figure = run_benchmark(tmp_path, "slow_link", "--repeats", "1")
    (panel,) = figure["plots"]
    assert [series["label"] for series in panel["series"]] == [
        "distaccum", "(a) allreduce every micro-batch", "(b) no communication"]
    for series in panel["series"]:
        assert series["x"] == [2] and series["y"][0] > 0
    # distaccum on the mpi4py backend, float32 and bfloat16 gradient sums, measured under mpirun
    # beside (b): its own table.
    [mpi4py_row] = [line for line in figure["table"].splitlines()
                    if line.startswith("| host loopback") and line.count("|") == 11]
    cells = [cell.strip() for cell in mpi4py_row.split("|")[1:-1]]
    assert cells[1] == "2"
    assert all(float(cells[i].split()[0].replace(",", "")) > 0 for i in (2, 3, 4))


def test_overhead_smoke_times_keras_and_distaccum_steps_with_and_without_xla(tmp_path):
    figure = run_benchmark(tmp_path, "overhead", "--repeats", "1")
    throughput, start_up = figure["plots"]
    assert [bar["label"] for bar in throughput["bars"]] == [
        "Keras train_on_batch", "Keras fit", "Keras train_on_batch, XLA",
        "distaccum micro-step", "distaccum k=1 window", "distaccum k=8 window",
        "distaccum k=8 window, one call per micro-batch", "distaccum k=8 window, mixed_bfloat16",
        "distaccum micro-step, XLA", "distaccum k=1 window, XLA", "distaccum k=8 window, XLA"]
    assert all(bar["median"] > 0 for bar in throughput["bars"])
    assert "mixed_bfloat16 ÷ float32, k=8 windows: " in figure["table"]
    assert "7 micro-steps in one call ÷ one call each, k=8 windows: " in figure["table"]
    assert "XLA ÷ no XLA, samples/s of the same runner: Keras train_on_batch " in figure["table"]
    # Each XLA row is taken against Keras's XLA step, each row without XLA against Keras's.
    rows = _table_rows(figure["table"])
    assert rows["distaccum k=1 window, XLA (the update step's two XLA clusters)"][1:3] == [
        "—", figure["checks"][2]["measured"]]
    assert rows["distaccum micro-step"][2] == "—"
    # Seconds to the first update, with XLA and without (smoke: Keras's and the k=1 window's,
    # in one process; the full run adds the k=8 window's, each in a fresh process).
    assert [bar["label"] for bar in start_up["bars"]] == [
        "Keras train_on_batch", "Keras train_on_batch, XLA", "distaccum k=1 window",
        "distaccum k=1 window, XLA"]
    assert all(0 < bar["median"] < 120 for bar in start_up["bars"])
    # Targets: the micro-step, the k=1 window, the k=1 window under XLA; then the XLA micro-step
    # and k=8 window and the start-up seconds, reported without one. Smoke runs are not judged.
    assert [check["target"] for check in figure["checks"]] == ["≥ 0.95"] * 3 + ["—"] * 3
    assert [check["passed"] for check in figure["checks"]] == [None] * 6


@pytest.mark.multiworker
def test_memory_smoke_measures_both_kinds_of_update_and_the_growth_per_parameter(tmp_path):
    figure = run_benchmark(tmp_path, "memory", "--repeats", "1")
    peaks = [bar["median"] for bar in figure["plots"][0]["bars"] if bar["label"].endswith("peak")]
    # TensorFlow alone holds hundreds of MB: a smaller peak would mean a wrong unit.
    assert len(peaks) == 2 and all(peak > 100 for peak in peaks)
    # Memory per parameter (smoke: one tiny width), on the Dense stack: Keras's own fit, then
    # distaccum in 1 process (k = 4) and on 2 workers (k = 2) under mpirun (mpi4py) and
    # horovodrun, each rank measured, with sharded state too; on the Embedding, Keras's and 1
    # process.
    rows = figure["per_parameter"]
    runs = [("keras", 1, None), ("single", 1, 4), ("mpi4py", 2, 2), ("horovod", 2, 2)]
    sharded = [("mpi4py-sharded", 2, 2), ("horovod-sharded", 2, 2)]
    assert [(row["model"], row["run"], row["workers"], row["k"]) for row in rows] == [
        *(("dense", *run) for run in runs + sharded), *(("embedding", *run) for run in runs[:2])]
    for row in rows:
        by_rank = [*row["steady_w_ranks"], *row["peak_w_ranks"]]
        assert len(by_rank) == 2 * row["workers"] and all(math.isfinite(w) for w in by_rank)
        assert row["peak_w"]["median"] == max(row["peak_w_ranks"]) > 0  # Adam's slots, at least
    table = _table_rows(figure["table"])
    assert table["distaccum, 2 workers, Horovod"][2:4] == ["2", "2"]
    assert table["distaccum, 2 workers, Horovod, sharded"][2:4] == ["2", "2"]
    # Each run's gradient sums (one for these models' one loss) are in its budget.
    assert all(row["gradient_sums"] == (row["run"] != "keras") for row in rows)
    whole, sharded = "≤ Keras + 1.25 (1 gradient sum)", "≤ Keras + 0.35 (1 gradient sum)"
    assert [check["target"] for check in figure["checks"]] == ["≤ 0.5"] + [whole] * 3 + [sharded] * 2
    assert [check["passed"] for check in figure["checks"]] == [None] * 6  # smoke: not judged


def test_startup_smoke_times_launch_to_first_update(tmp_path):
    figure = run_benchmark(tmp_path, "startup", "--repeats", "1")
    (bar,) = figure["plots"][0]["bars"]
    assert bar["label"] == "1 worker" and 0 < bar["median"] < 120


@pytest.mark.multiworker
def test_data_smoke_counts_each_workers_share_and_times_both_pipelines(tmp_path):
    figure = run_benchmark(tmp_path, "data", "--repeats", "1")
    kinds = ["records", "images", "tables", "source"]
    # 2 workers, 2 epochs, on 256 and 2,048 samples of each kind: the counts are exact at any
    # size.
    assert [(row["kind"], row["samples"], row["epoch"]) for row in figure["counts"]] == [
        (kind, samples, epoch) for kind in kinds for samples in (256, 2048) for epoch in (1, 2)]
    for row in figure["counts"]:
        assert row["workers"] == 2 and row["parsed"] == [1.0, 1.0], row
        assert row["exactly_once"] == row["samples"]
        # Record files read whole chunks, tables whole row groups: at least the share. The
        # bytes of images and the source are exactly their share; a table's columns are
        # fewer bytes than its files (footers, statistics).
        assert all(read >= 1.0 for read in row["read"]) and all(b > 0.8 for b in row["bytes"])
    throughput, memory = figure["plots"]
    assert [bar["label"] for bar in throughput["bars"]] == [
        f"{label}: {pipeline}" for label in ("TFRecord files", "image folders", "Parquet files",
                                             "random-access source")
        for pipeline in ("distaccum", "expert")]
    assert all(bar["median"] > 0 for bar in throughput["bars"])
    # TensorFlow alone holds hundreds of MB: a smaller peak would mean a wrong unit.
    assert len(memory["bars"]) == 8 and all(bar["median"] > 100 for bar in memory["bars"])
    assert [check["passed"] for check in figure["checks"]] == [None] * 16
    # Sorted by class, an update's classes stray further from the data's than a permutation's.
    mix = figure["class_mix"]
    assert 0 < mix["permutation"]["mean"] < mix["distaccum"]["mean"] < 0.5


@pytest.mark.multiworker
def test_preemption_smoke_times_sigterm_to_a_complete_checkpoint_and_every_process_gone(tmp_path):
    # One launch: `distaccum launch mpirun`, SIGTERM to the launcher alone (turned into the
    # SIGUSR1 mpirun passes on to the ranks).
    figure = run_benchmark(tmp_path, "preemption", "--repeats", "1")
    assert figure["title"] == "8. Preemption: SIGTERM to checkpoint and exit"
    [run] = figure["runs"]
    [(case, measured)] = run.items()
    assert case == "distaccum launch mpirun, SIGTERM to launcher"
    assert measured["complete"] and measured["step"] > 10  # the stop step's, checksum checked
    assert measured["exit_code"] == 143
    assert 0 < measured["checkpoint"] <= measured["all"]
    assert 0 < measured["ranks"] <= measured["all"]
    assert "| distaccum launch mpirun (mpi) | launcher |" in figure["table"]
    [check] = figure["checks"]
    assert check["target"] == "≤ 15 s" and check["passed"] is None  # smoke runs are not judged
    [bar] = figure["plots"][0]["bars"]
    assert bar["label"] == case and bar["median"] == measured["all"]


@pytest.mark.multiworker
def test_sparse_exchange_smoke_counts_both_exchanges_and_the_windows_distinct_rows(tmp_path):
    figure = run_benchmark(tmp_path, "sparse_exchange")
    assert figure["title"].startswith("9. Sparse exchange")
    [message] = figure["messages"]  # smoke: V = 20,000, d = 8, on 2 workers under mpirun
    assert message["width"] == 8 and message["allreduces_per_update"] == 1
    # Every parameter's float32 sum, then loss sum, divisor, sample count, and the votes
    # (stop, cancel, change, one per rank), as the mpi4py backend counted them.
    assert message["bytes_per_update"] == 4 * message["parameters"] + 4 * 3 + 4 * (3 + 2)
    assert message["trainer_allreduce_per_update"][1] == message["bytes_per_update"]
    # With the row exchange: one allgather of the rows the rank's windows touched beside one
    # allreduce without the table, as the figure's own checks count them.
    [rows_sent] = figure["rows_sent"]
    assert rows_sent["allgathers_per_update"] == rows_sent["allreduces_per_update"] == 1
    assert rows_sent["allgather_bytes_per_update"] == rows_sent["expected_allgather_bytes"] > 0
    assert rows_sent["bytes_per_update"] < message["bytes_per_update"] / 2
    assert [check["passed"] for check in figure["checks"]] == [True, None, True, True, None]
    assert rows_sent["seconds_per_update"]["runs"] == 1  # timed once, on the host: no verdict
    rows = {(r["tokens"], r["exponent"]): r for r in figure["distinct_rows"]}
    assert sorted(rows) == [(256, 1.0), (256, 1.1), (1024, 1.0), (1024, 1.1)]
    for (tokens, _), r in rows.items():
        assert 0 < r["low"] <= r["median"] <= r["high"] <= min(tokens, 20_000)
    for exponent in (1.0, 1.1):  # a longer window touches more rows, a steeper Zipf fewer
        assert rows[256, exponent]["median"] < rows[1024, exponent]["median"]
    assert rows[1024, 1.1]["median"] < rows[1024, 1.0]["median"]
    assert "Break-even: " in figure["table"] and "\n| 256 | 2 | 17,778 | " in figure["table"]
    [panel] = figure["plots"]
    assert [series["label"] for series in panel["series"]] == [
        "dense ring allreduce", "sparse allgather, T = 256", "sparse allgather, T = 1,024"]


def test_sparse_exchange_break_even_is_where_both_exchanges_send_the_same_bytes():
    for width, ranks in ((64, 8), (256, 128), (8, 2)):
        message = {"width": width, "bytes_per_update": 4 * (50_000 * width + width + 1) + 28}
        rows = sparse_exchange.break_even(50_000, width, ranks)
        assert rows == pytest.approx(2 * 50_000 / ranks * width / (width + 1))
        cost = sparse_exchange.per_rank(message, 50_000, ranks, rows)
        assert cost["sparse"] == pytest.approx(cost["dense"], rel=1e-12)
        fewer = sparse_exchange.per_rank(message, 50_000, ranks, rows - 1)
        assert fewer["sparse"] < fewer["dense"]


def _table_rows(table: str) -> dict[str, list[str]]:
    """A markdown table's body rows by their first cell."""
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| system") and
            not line.startswith("| link")]
    return {row[0]: row[1:] for row in rows}


@pytest.mark.multiworker
def test_peer_systems_smoke_runs_the_case_on_distaccum_and_peers_and_times_each_peer(tmp_path):
    figure = run_benchmark(tmp_path, "peer_systems", "--repeats", "1")
    exactness, throughput = figure["table"].split("\n\n")
    rows = _table_rows(exactness)
    ran, error, iterations, _ = rows["distaccum (mpi4py)"]
    assert (ran, iterations) == ("ok", "8") and float(error) < 1e-5  # float32 round-off
    # Horovod's accumulation trains, but neither exactly nor counting updates in `iterations`.
    ran, error, iterations, _ = rows["Horovod bpps, average_aggregated_gradients=True"]
    assert ran == "ok" and float(error) > 1e-2 and int(iterations) > 8
    ran, error, iterations, happened = rows["tf.distribute MWMS, Keras 3 `fit`"]
    assert (ran, error, iterations) == ("error", "—", "—") and "PerReplica" in happened
    [[link, k, *cells]] = [row for row in (line.split("|")[1:-1]
                                           for line in throughput.splitlines()[2:])]
    assert k.strip() == "2"
    assert all(float(cell.split()[0].replace(",", "")) > 0 for cell in cells)


def test_report_writes_markdown_with_date_machine_targets_and_a_png_and_the_readme_table(
        tmp_path):
    figure = {
        "figure": "memory", "smoke": False, "title": "4. Memory", "how": "How it was measured.",
        "table": "| update | peak |\n|---|---|\n| direct | 2 |",
        "checks": [{"claim": "memory ratio", "target": "≤ 0.5", "measured": "0.46",
                    "passed": True, "note": ""}],
        "plots": [{"kind": "bars", "title": "4. Memory", "ylabel": "MB",
                   "bars": [{"label": "direct", "median": 2.0, "low": 1.0, "high": 3.0}]}],
        "date": "2026-11-29 11:00 UTC", "machine": "2 cores (`nproc`), Some CPU",
    }
    (tmp_path / "memory.json").write_text(json.dumps(figure))
    markdown, png, readme = tmp_path / "results.md", tmp_path / "results.png", tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{report.README_BEGIN}\n| old | table |\n{report.README_END}\n"
                      "after\n")
    run_script("python", BENCHMARKS_DIR / "report.py", tmp_path / "memory.json",
               "--markdown", markdown, "--plot", png, "--readme", readme)
    text = markdown.read_text()
    assert "Measured 2026-11-29 11:00 UTC on 2 cores (`nproc`), Some CPU." in text
    row = "| memory ratio | ≤ 0.5 | 0.46 | pass | 2026-11-29 |"
    assert row in text
    assert "![plots](results.png)" in text and "| direct | 2 |" in text
    assert png.read_bytes().startswith(b"\x89PNG")
    assert readme.read_text() == (f"# Title\n\n{report.README_BEGIN}\n"
                                  f"{report.targets_table([figure])}\n\nMeasured on: 2 cores "
                                  f"(`nproc`), Some CPU.\n{report.README_END}\nafter\n")
    assert row in readme.read_text() and "| old | table |" not in readme.read_text()


def test_readme_and_results_quote_the_committed_figures():
    # One set of figures: the README's targets and results.md are what report.py makes of
    # benchmarks/results/ (bash benchmarks/run.sh rewrites all three).
    figures = report.committed_figures()
    assert {f["figure"] for f in figures} >= {"communication", "slow_link", "overhead", "memory",
                                              "startup", "peer_systems", "data", "preemption"}
    assert not any(f["smoke"] for f in figures)
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"{report.README_BEGIN}\n{report.readme_block(figures)}\n{report.README_END}" in readme
    assert report.targets_table(figures) in (BENCHMARKS_DIR / "results.md").read_text()


@pytest.mark.multiworker
def test_elastic_smoke_times_each_change_in_place_and_by_stop_and_resume(tmp_path):
    figure = run_benchmark(tmp_path, "elastic", "--repeats", "1")
    assert figure["title"] == "9. Elastic in place: seconds lost per change of worker count"
    [run] = figure["runs"]
    assert set(run) == {"2 → 1, a host leaves", "1 → 2, a host joins", "2 → 1, rank 1 SIGKILLed",
                        "2 → 1, stop and resume", "1 → 2, stop and resume"}
    # A stop and resume pays a new process's start-up; a host that leaves costs only a regroup.
    assert 0 < run["2 → 1, stop and resume"] and 0 < run["1 → 2, stop and resume"]
    assert run["2 → 1, a host leaves"] < run["2 → 1, stop and resume"]
    assert [check["passed"] for check in figure["checks"]] == [None, None, None]  # not judged
    assert "| 2 → 1 | a host leaves |" in figure["table"]
