#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite; extra arguments go to pytest.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Tests cover both backends: Horovod too.
bash "$repo_root/launch/setup.sh" --horovod
cd "$repo_root"
py="$repo_root/.venv/bin/python"
# Single-process tests first, in 2 test processes (pytest-xdist); then the multi-worker tests one
# at a time (each already keeps both cores busy, and their timing bounds assume it). Each part
# closes with its 15 slowest tests, so a slow addition shows. Exit 5 = that part selected nothing.
"$py" -m pytest -m "not multiworker" -n 2 --durations=15 "$@" || [ $? = 5 ]
# The tests that pass within a floating-point tolerance, once more under other kernels, as another
# CPU would compute them (docs/rounding.md): XLA's fused kernels round differently from
# TensorFlow's on every CPU, and ONEDNN_MAX_CPU_ISA=AVX2 gives an AVX-512 machine an AVX2 one's.
# Every Trainer compiles its steps with XLA (jit_compile=True; tests/conftest.py), and TensorFlow
# clusters what is left (the Keras references, the update step's graph around its allreduce).
DISTACCUM_TEST_JIT_COMPILE=true TF_XLA_FLAGS="--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit" \
  ONEDNN_MAX_CPU_ISA=AVX2 \
  "$py" -m pytest -m "rounding and not multiworker" -n 2 "$@" || [ $? = 5 ]
"$py" -m pytest -m multiworker --durations=15 "$@" || [ $? = 5 ]
