#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite; extra arguments go to pytest.
# The suite runs in three parts (tests/suite.py): single-process tests; the tolerance tests again
# under other kernels, as another CPU computes them (docs/rounding.md); the multi-worker tests.
# Every part runs whatever another did; the last lines list every failure and the totals, and
# the exit status is non-zero if anything failed.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Tests cover both backends: Horovod too.
bash "$repo_root/launch/setup.sh" --horovod
exec "$repo_root/.venv/bin/python" "$repo_root/tests/suite.py" "$@"
