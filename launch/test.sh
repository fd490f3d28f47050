#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite; extra arguments go to pytest.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Tests cover both backends: Horovod too.
bash "$repo_root/launch/setup.sh" --horovod
cd "$repo_root"
# Two test processes: multi-worker tests one after another in one (see tests/conftest.py),
# single-process tests beside them. The 15 slowest tests close the output, so a slow addition
# shows.
exec "$repo_root/.venv/bin/python" -m pytest -n 2 --dist loadgroup --durations=15 "$@"
