"""The test command itself (tests/suite.py): the second run's kernels for each kind of CPU, and
parts that each run and report whatever another did."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import suite

X86_64_V3 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
AVX512 = X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# /proc/cpuinfo's flags of each kind of CPU (the ones that matter here), and the cap each gets.
CPU_KINDS = {
    "amd_epyc_zen3_avx2": (X86_64_V3, "AVX2"),
    "intel_cascade_lake": (AVX512 | {"avx512_vnni"}, "AVX512_CORE"),
    "amd_epyc_zen4_avx512_bf16": (AVX512 | {"avx512_vnni", "avx512_bf16", "avx512_vbmi2"},
                                  "AVX512_CORE"),
    "intel_sapphire_rapids_amx": (AVX512 | {"avx512_vnni", "avx512_bf16", "avx512_fp16",
                                            "amx_bf16", "amx_tile", "amx_int8"},
                                  "AVX512_CORE_FP16"),
    "intel_granite_rapids_amx_fp16": (AVX512 | {"avx512_bf16", "avx512_fp16", "amx_bf16",
                                                "amx_tile", "amx_fp16", "avx_ne_convert"},
                                      "AVX512_CORE_FP16"),
    "intel_sierra_forest_no_avx512": (X86_64_V3 | {"avx_vnni", "avx_ne_convert"}, "AVX2_VNNI_2"),
}


@pytest.mark.parametrize("flags, cap", CPU_KINDS.values(), ids=CPU_KINDS.keys())
def test_other_kernels_cap_onednn_where_every_tensorflow_kernel_remains_when_cpu_is(flags, cap):
    settings = suite.other_kernels(frozenset(flags))
    assert settings == {**suite.XLA_EVERYWHERE, "ONEDNN_MAX_CPU_ISA": cap}


KERAS_STEP_IN_EACH_COMPUTE_DTYPE = """
import numpy as np, keras
for policy in ("float32", "mixed_float16", "mixed_bfloat16"):
    keras.mixed_precision.set_global_policy(policy)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, dtype="float32")])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x = np.random.default_rng(0).random((32, 8), "float32")
    loss = model.train_on_batch(x, x[:, :1])
    assert np.isfinite(loss), (policy, loss)
    print(policy, "trained")
"""


def test_other_kernels_run_a_keras_step_in_every_compute_dtype_when_on_this_cpu():
    # The rule above, checked on the machine at hand: under the cap it gives this CPU, oneDNN
    # creates every kernel TensorFlow asks for (below it, the process aborts).
    settings = suite.other_kernels(suite.cpu_flags())
    completed = subprocess.run([sys.executable, "-c", KERAS_STEP_IN_EACH_COMPUTE_DTYPE],
                               env={**suite.os.environ, **settings, "TF_CPP_MIN_LOG_LEVEL": "2"},
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, (settings, completed.stderr[-3000:])
    assert completed.stdout.split() == ["float32", "trained", "mixed_float16", "trained",
                                        "mixed_bfloat16", "trained"]


ONE_PART_BROKEN_EACH = '''
import os
import pytest

def test_passes():
    pass

def test_fails():
    assert False

@pytest.mark.rounding
def test_passes_within_a_tolerance():
    pass

@pytest.mark.rounding
def test_aborts_under_other_kernels():
    if os.environ.get("DISTACCUM_TEST_JIT_COMPILE") == "true":
        os.abort()

@pytest.mark.multiworker
def test_passes_with_workers():
    pass

@pytest.mark.multiworker
def test_aborts_pytest_itself():
    os.abort()
'''


def test_every_part_runs_and_every_failure_is_listed_when_each_part_breaks(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    multiworker\n    rounding\n")
    (tmp_path / "test_parts.py").write_text(textwrap.dedent(ONE_PART_BROKEN_EACH))
    completed = subprocess.run([sys.executable, suite.__file__, str(tmp_path), "-q",
                                "-p", "no:cacheprovider"],
                               capture_output=True, text=True, timeout=300)
    output = completed.stdout
    assert completed.returncode == 1, output
    # Every part ran, and each but the aborted one ended with pytest's own summary line.
    lines = output.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("=== ")]
    assert [lines[i].split(":")[0] for i in headers] == [
        "=== single-process", "=== other kernels", "=== multi-worker",
        "=== the test command's parts"]
    assert lines[headers[1] - 2].startswith("1 failed, 3 passed in ")
    assert lines[headers[2] - 2].startswith("1 failed, 1 passed in ")
    # Then each part's counts, every failure by id and part, and the totals.
    closing = lines[headers[3] + 1:]
    assert [line.split("  ")[0] for line in closing[:3]] == [
        "single-process", "other kernels", "multi-worker"]
    assert closing[3:] == [
        "FAILED test_parts.py::test_fails (single-process)",
        # A crashed xdist worker: the test it was running is named.
        "ERROR test_parts.py::test_aborts_under_other_kernels (other kernels)",
        "PART multi-worker: pytest exited -6 before writing its report",
        # The part that died with pytest counts as one failure.
        "4 passed, 3 failed, 0 skipped",
    ]
