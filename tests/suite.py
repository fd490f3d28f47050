"""The test command (`bash launch/test.sh`): the suite in three parts, each run whatever another
did, then one summary of them all.

1. `single-process`: every test that starts no worker processes, in 2 test processes (xdist).
2. `other kernels`: the tests that pass within a floating-point tolerance (`-m rounding`) once
   more, as another CPU computes them: every `Trainer` under XLA, TensorFlow's own graphs
   clustered by XLA, and oneDNN held below this CPU's best instructions (`other_kernels`).
3. `multi-worker`: the tests that launch 2+ real processes, one test at a time (each keeps both
   cores busy, and their timing bounds assume it).

Each part closes with pytest's own lines (its slowest tests, its summary). Then a table of the
parts, every failed test by id, and one line over all parts, `N passed, N failed, N skipped`.
The exit status is 1 if any test failed or any part ended without a report, else 0.

    python tests/suite.py [PYTEST_OPTION ...]   (launch/test.sh runs it after set-up)
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# XLA's CPU kernels for what TensorFlow runs outside distaccum's own steps (Keras's reference
# steps, the update step around its allreduce); DISTACCUM_TEST_JIT_COMPILE puts every Trainer's
# steps under XLA (tests/conftest.py).
XLA_EVERYWHERE = {
    "DISTACCUM_TEST_JIT_COMPILE": "true",
    "TF_XLA_FLAGS": "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit",
}


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux names them (`/proc/cpuinfo`); none where unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def onednn_cap(flags: frozenset[str]) -> str:
    """The lowest `ONEDNN_MAX_CPU_ISA` under which oneDNN still has every kernel TensorFlow asks
    of it on a CPU with these flags.

    TensorFlow chooses oneDNN's bfloat16 kernels from the CPU itself (AVX-512F or AVX-NE-CONVERT)
    and its float16 ones likewise (AVX-512 BW with AVX-512 FP16 or AMX-FP16, or AVX-NE-CONVERT),
    whatever the cap says. oneDNN has bfloat16 from AVX512_CORE up (emulated below
    AVX512_CORE_BF16) and float16 from AVX512_CORE_FP16 up; both from AVX2_VNNI_2 on CPUs with
    AVX-NE-CONVERT. Below that, creating the primitive fails and the process aborts.
    """
    if "avx512bw" in flags and flags & {"avx512_fp16", "amx_fp16"}:
        return "AVX512_CORE_FP16"
    if "avx512f" in flags:
        return "AVX512_CORE"
    if "avx_ne_convert" in flags:
        return "AVX2_VNNI_2"
    return "AVX2"


def other_kernels(flags: frozenset[str]) -> dict[str, str]:
    """The environment of the second run: XLA's kernels on every CPU, and oneDNN's of the
    lowest instruction set this CPU's kernels allow (docs/rounding.md has each CPU kind)."""
    return {**XLA_EVERYWHERE, "ONEDNN_MAX_CPU_ISA": onednn_cap(flags)}


@dataclasses.dataclass(frozen=True)
class Part:
    """One pytest run of the suite: which tests, how, and in what environment."""

    name: str
    markers: str
    options: tuple[str, ...] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def parts(flags: frozenset[str]) -> list[Part]:
    """The suite's parts, in the order they run."""
    return [
        Part("single-process", "not multiworker", ("-n", "2", "--durations=15")),
        Part("other kernels", "rounding and not multiworker", ("-n", "2", "--durations=15"),
             other_kernels(flags)),
        Part("multi-worker", "multiworker", ("--durations=15",)),
    ]


@dataclasses.dataclass
class Outcome:
    """What one part's pytest reported: its tests by result, and how it ended."""

    part: Part
    exit_code: int
    seconds: float
    passed: int = 0
    skipped: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)  # "FAILED id" / "ERROR id"
    reported: bool = False

    @property
    def ok(self) -> bool:
        # Exit 5: the part selected no test (a -k or path that leaves it none), not a failure.
        return self.reported and not self.failed and self.exit_code in (0, 5)


def pytest_id(case: ElementTree.Element) -> str:
    """A JUnit test case's pytest id (`tests/test_x.py::TestClass::test_y[case]`)."""
    path, name = case.get("file"), case.get("name", "")
    if not path:  # a collection error: its classname is empty and its name the module
        return ".".join(filter(None, (case.get("classname"), name)))
    module = path.removesuffix(".py").replace("/", ".")
    classes = case.get("classname", "").removeprefix(module).strip(".")
    return "::".join(filter(None, (path, *classes.split("."), name)))


def read_report(outcome: Outcome, path: Path) -> None:
    """Fill in `outcome` from pytest's JUnit XML report, if pytest got as far as writing it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        results = {child.tag for child in case}
        if "failure" in results:
            outcome.failed.append(f"FAILED {pytest_id(case)}")
        elif "error" in results:
            outcome.failed.append(f"ERROR {pytest_id(case)}")
        elif "skipped" in results:
            outcome.skipped += 1
        else:
            outcome.passed += 1
    outcome.reported = True


def run_part(part: Part, pytest_arguments: list[str], report_dir: Path) -> Outcome:
    """Run one part to its end (its own output goes straight to the console)."""
    report = report_dir / f"{part.name.replace(' ', '-')}.xml"
    # The part's header: the command that runs it again alone.
    settings = "".join(f"{key}={shlex.quote(value)} " for key, value in part.env.items())
    print(f"\n=== {part.name}: {settings}pytest -m {shlex.quote(part.markers)} "
          f"{shlex.join(part.options)}", flush=True)
    started = time.monotonic()
    exit_code = subprocess.call(
        [sys.executable, "-m", "pytest", "-m", part.markers, *part.options,
         f"--junitxml={report}", "-o", "junit_family=xunit1", *pytest_arguments],
        cwd=REPO_ROOT, env={**os.environ, **part.env})
    outcome = Outcome(part, exit_code, time.monotonic() - started)
    read_report(outcome, report)
    return outcome


def counts(passed: int, failed: int, skipped: int) -> str:
    return f"{passed} passed, {failed} failed, {skipped} skipped"


def summary(outcomes: list[Outcome]) -> str:
    """The closing lines: each part's counts and time, every failure, the totals.

    A part that failed with no failed test to show (pytest stopped before writing its report, or
    was interrupted) counts as one failure, so the totals never read green when it was not.
    """
    lines = ["", "=== the test command's parts"]
    for outcome in outcomes:
        minutes, seconds = divmod(round(outcome.seconds), 60)
        state = (counts(outcome.passed, len(outcome.failed), outcome.skipped) if outcome.reported
                 else "no report")
        lines.append(f"{outcome.part.name:<16} {state} ({minutes} min {seconds:02d} s)")
    broken = [outcome for outcome in outcomes if not outcome.ok and not outcome.failed]
    for outcome in outcomes:
        lines += [f"{failure} ({outcome.part.name})" for failure in outcome.failed]
    lines += [f"PART {outcome.part.name}: pytest exited {outcome.exit_code}"
              + ("" if outcome.reported else " before writing its report") for outcome in broken]
    lines.append(counts(sum(outcome.passed for outcome in outcomes),
                        sum(len(outcome.failed) for outcome in outcomes) + len(broken),
                        sum(outcome.skipped for outcome in outcomes)))
    return "\n".join(lines)


def main(pytest_arguments: list[str]) -> int:
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="distaccum-suite-") as report_dir:
        try:
            for part in parts(cpu_flags()):
                outcomes.append(run_part(part, pytest_arguments, Path(report_dir)))
        except KeyboardInterrupt:  # Ctrl-C: pytest stopped too; say what ran, run nothing more
            print(summary(outcomes) + "\ninterrupted: the parts after these did not run",
                  flush=True)
            return 130
    print(summary(outcomes), flush=True)
    return 0 if all(outcome.ok for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
