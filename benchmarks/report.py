"""Turn the figures' JSON into results.md, results.png and the README's targets: one set of figures.

    python benchmarks/report.py [FIGURE.json...] [--markdown results.md] [--plot results.png]
                                [--readme README.md]

Without FIGURE.json it reads every figure in `benchmarks/results/` (each script's latest run,
written there by `run.sh`), in the figures' order. The markdown lists every target with pass/fail
and when it was measured, then each figure's table with its date and machine; the PNG has one
panel per plot the figures describe; `--readme` rewrites the targets table between the README's
markers, so that the README quotes these numbers and no others.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import common

try:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

README_BEGIN = "<!-- targets: written by benchmarks/report.py from benchmarks/results/; do not edit -->"
README_END = "<!-- end of targets -->"


def committed_figures() -> list[dict]:
    """Every figure in `benchmarks/results/`, in the order of their numbered titles."""
    figures = [common.read_json(path) for path in sorted(common.RESULTS_DIR.glob("*.json"))]
    return sorted(figures, key=lambda f: int(re.match(r"\d+", f["title"])[0]))


def targets_table(figures: list[dict]) -> str:
    rows = [[c["claim"], c["target"], c["measured"], common.verdict(c["passed"]),
             f["date"].split()[0]]
            for f in figures for c in f["checks"]]
    return common.markdown_table(
        ["claim", "target", "measured: median (min–max)", "result", "measured on"], rows)


def markdown(figures: list[dict], plot_name: str, elapsed: float | None) -> str:
    took = f" (the last full run took {elapsed / 60:.0f} min)" if elapsed is not None else ""
    lines = ["# distaccum benchmark results", "",
             f"- command: `bash benchmarks/run.sh`{took}; each figure below says when and on "
             "what it was measured",
             "- each figure is the median of several runs with the spread (smallest–largest run) "
             "in brackets; every ratio is taken between runs made moments apart in the same run "
             "of the script, on a shared machine"]
    if any(f["smoke"] for f in figures):
        lines.append("- **smoke run**: tiny sizes that prove the scripts work; the numbers mean "
                     "nothing")
    lines += ["", "## Targets", "", targets_table(figures), "", f"![plots]({plot_name})", ""]
    for f in figures:
        notes = [f"- {c['claim']}: {c['note']}" for c in f["checks"] if c["note"]]
        lines += [f"## {f['title']}", "", f"Measured {f['date']} on {f['machine']}.", "",
                  f["how"], "", f["table"], "", *notes, ""]
    return "\n".join(lines)


def readme_block(figures: list[dict]) -> str:
    """The targets table and the machine(s) they were measured on, for the README."""
    machines = sorted({f["machine"] for f in figures})
    return f"{targets_table(figures)}\n\nMeasured on: {'; '.join(machines)}."


def with_targets(readme: str, figures: list[dict]) -> str:
    """`readme` with the block between its markers replaced by `readme_block(figures)`."""
    if README_BEGIN not in readme or README_END not in readme:
        raise common.BenchmarkError(f"the README has no {README_BEGIN} ... {README_END} block")
    before, rest = readme.split(README_BEGIN, 1)
    after = rest.split(README_END, 1)[1]
    return f"{before}{README_BEGIN}\n{readme_block(figures)}\n{README_END}{after}"


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
    parser.add_argument("figures", nargs="*", type=Path,
                        help="JSON files (default: every figure in benchmarks/results/)")
    parser.add_argument("--markdown", type=Path, default=common.BENCHMARKS_DIR / "results.md")
    parser.add_argument("--plot", type=Path, default=common.BENCHMARKS_DIR / "results.png")
    parser.add_argument("--readme", type=Path, help="rewrite this README's targets table")
    parser.add_argument("--elapsed", type=float, help="seconds the whole run took")
    args = parser.parse_args()
    if plt is None:
        raise common.BenchmarkError("matplotlib is not installed (bash launch/setup.sh "
                                    "installs it into .venv)")
    figures = ([common.read_json(path) for path in args.figures] if args.figures
               else committed_figures())
    plot(figures, args.plot)
    plot_name = os.path.relpath(args.plot, args.markdown.parent)
    args.markdown.write_text(markdown(figures, plot_name, args.elapsed))
    written = [args.markdown, args.plot]
    if args.readme:
        args.readme.write_text(with_targets(args.readme.read_text(), figures))
        written.append(args.readme)
    print(f"wrote {', '.join(map(str, written))}")


if __name__ == "__main__":
    common.run_main("report", main)
