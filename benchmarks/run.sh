#!/usr/bin/env bash
# Run every benchmark and write benchmarks/results.md (date, machine, targets, tables) and
# benchmarks/results.png. About 55-65 minutes on 2 cores. The slow-link figure needs root for its
# network namespaces; without root it is reported as skipped.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo_root/launch/setup.sh"
py="$repo_root/.venv/bin/python"

results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
started=$(date +%s)
figures=()
for figure in communication slow_link overhead memory startup peer_systems data preemption; do
  echo "[benchmarks] $figure ($(date +%H:%M:%S))" >&2
  "$py" "$repo_root/benchmarks/$figure.py" --json "$results/$figure.json"
  figures+=("$results/$figure.json")
done
"$py" "$repo_root/benchmarks/report.py" "${figures[@]}" --elapsed $(($(date +%s) - started)) \
  --markdown "$repo_root/benchmarks/results.md" --plot "$repo_root/benchmarks/results.png"
