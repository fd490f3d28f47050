"""Turn the figures' JSON (from each script's `--json`) into results.md and a PNG plot.

    python benchmarks/report.py FIGURE.json... --markdown results.md --plot results.png

The markdown names the date and the machine, lists every target of the issue with pass/fail, and
then each figure's table; the PNG has one panel per plot the figures describe.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import os
import platform
from pathlib import Path

import common

try:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt
except ImportError:
    plt = None


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """What the numbers depend on: cores, CPU, memory and the versions of the moving parts."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:  # the cpu variant's distribution, else the gpu variant's
        tensorflow = "tensorflow-cpu"
        importlib.metadata.version(tensorflow)
    except importlib.metadata.PackageNotFoundError:
        tensorflow = "tensorflow"
    versions = ", ".join(f"{name} {importlib.metadata.version(package)}" for name, package in
                         ((f"TensorFlow ({tensorflow})", tensorflow), ("Keras", "keras"),
                          ("Horovod", "horovod")))
    return (f"{len(os.sched_getaffinity(0))} cores (`nproc`), {cpu_model()}, "
            f"{memory_gib:.0f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {versions}")


def targets_table(figures: list[dict]) -> str:
    rows = [[c["claim"], c["target"], c["measured"], common.verdict(c["passed"])]
            for f in figures for c in f["checks"]]
    return common.markdown_table(["claim", "target", "measured: median (min–max)", "result"],
                                 rows)


def markdown(figures: list[dict], plot_name: str, elapsed: float | None) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    took = f" (took {elapsed / 60:.0f} min)" if elapsed is not None else ""
    lines = ["# distaccum benchmark results", "",
             f"- date: {now}", f"- machine: {machine()}",
             f"- command: `bash benchmarks/run.sh`{took}",
             "- each figure is the median of several runs with the spread (smallest–largest run) "
             "in brackets; every ratio is taken between runs made moments apart in the same run "
             "of the script, on a shared machine"]
    if any(f["smoke"] for f in figures):
        lines.append("- **smoke run**: tiny sizes that prove the scripts work; the numbers mean "
                     "nothing")
    lines += ["", "## Targets", "", targets_table(figures), "", f"![plots]({plot_name})", ""]
    for f in figures:
        notes = [f"- {c['claim']}: {c['note']}" for c in f["checks"] if c["note"]]
        lines += [f"## {f['title']}", "", f["how"], "", f["table"], "", *notes, ""]
    return "\n".join(lines)


def draw_lines(axes, panel: dict) -> None:
    for series in panel["series"]:
        errors = None
        if "low" in series:
            errors = [[m - lo for m, lo in zip(series["y"], series["low"])],
                      [hi - m for m, hi in zip(series["y"], series["high"])]]
        axes.errorbar(series["x"], series["y"], yerr=errors, fmt=series["style"],
                      label=series["label"], capsize=3)
    if panel["log"]:
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
    axes.set_xticks(panel["series"][0]["x"], [str(x) for x in panel["series"][0]["x"]])
    axes.set_xlabel(panel["xlabel"])
    axes.legend(fontsize=7)


def draw_bars(axes, panel: dict) -> None:
    bars = panel["bars"]
    errors = [[b["median"] - b["low"] for b in bars], [b["high"] - b["median"] for b in bars]]
    axes.bar(range(len(bars)), [b["median"] for b in bars], yerr=errors, capsize=4,
             color="tab:blue")
    axes.set_xticks(range(len(bars)), [b["label"] for b in bars], fontsize=7, rotation=20,
                    ha="right")


def plot(figures: list[dict], path: Path) -> None:
    """One panel per plot description; error bars span the smallest to the largest run."""
    panels = [panel for f in figures for panel in f["plots"]]
    rows = max(1, math.ceil(len(panels) / 3))
    fig, grid = plt.subplots(rows, 3, figsize=(16, 5 * rows), squeeze=False)
    for axes, panel in zip(grid.flat, panels):
        (draw_lines if panel["kind"] == "lines" else draw_bars)(axes, panel)
        axes.set_title(panel["title"], fontsize=10)
        axes.set_ylabel(panel["ylabel"])
        axes.grid(alpha=0.3)
    for axes in list(grid.flat)[len(panels):]:
        axes.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", nargs="+", type=Path, help="JSON files, in report order")
    parser.add_argument("--markdown", type=Path, required=True)
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--elapsed", type=float, help="seconds the whole run took")
    args = parser.parse_args()
    if plt is None:
        raise common.BenchmarkError("matplotlib is not installed (bash launch/setup.sh "
                                    "installs it into .venv)")
    figures = [common.read_json(path) for path in args.figures]
    plot(figures, args.plot)
    plot_name = os.path.relpath(args.plot, args.markdown.parent)
    args.markdown.write_text(markdown(figures, plot_name, args.elapsed))
    print(f"wrote {args.markdown} and {args.plot}")


if __name__ == "__main__":
    common.run_main("report", main)
