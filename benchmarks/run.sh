#!/usr/bin/env bash
# Run every benchmark; write each figure to benchmarks/results/, then benchmarks/results.md,
# benchmarks/results.png and the README's targets table from them. About 55-65 minutes on 2
# cores. The slow-link figure needs root for its network namespaces; without root it is reported
# as skipped.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo_root/launch/setup.sh"
py="$repo_root/.venv/bin/python"

# Each figure's JSON goes to benchmarks/results/ as it completes (a failed script leaves the others'
# fresh and its own as it was); report.py then writes results.md, results.png and the README's
# targets from all of them. One figure alone: benchmarks/FIGURE.py --json benchmarks/results/FIGURE.json
# followed by benchmarks/report.py --readme README.md.
started=$(date +%s)
for figure in communication slow_link overhead memory startup peer_systems data preemption \
    sparse_exchange elastic; do
  echo "[benchmarks] $figure ($(date +%H:%M:%S))" >&2
  "$py" "$repo_root/benchmarks/$figure.py" --json "$repo_root/benchmarks/results/$figure.json"
done
"$py" "$repo_root/benchmarks/report.py" --elapsed $(($(date +%s) - started)) \
  --readme "$repo_root/README.md"
