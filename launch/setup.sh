#!/usr/bin/env bash
# Idempotent set-up: creates .venv/ at the repo root and installs distaccum editable with its pinned
# dependencies (mpi4py included: mpirun jobs need nothing else). With --horovod it also installs a
# Horovod wheel patched for TF 2.21, built once (minutes, progress every 30 s) and cached outside
# the repo. A second run with nothing changed returns in seconds.
#
#   launch/setup.sh [--horovod]
set -euo pipefail

with_horovod=0
case "${1:-}" in
  --horovod) with_horovod=1 ;;
  "") ;;
  *) echo "launch/setup.sh: error: the only option is --horovod. Received: ${1@Q}" >&2; exit 2 ;;
esac

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo_root/.venv"
cache_dir="${DISTACCUM_CACHE_DIR:-$HOME/.cache/distaccum}"
python_bin="${PYTHON:-python3}"
horovod_version=0.28.1
# Bump when the patches applied to Horovod's sdist change, so the cached wheel is rebuilt.
horovod_patch_level=2

log() { echo "[setup] $*" >&2; }
# The checks below import TensorFlow: no C++ banners (errors still print).
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"

# Stamps record what the last successful set-up installed from; same inputs -> nothing to do.
inputs_hash=$(cat "$repo_root/pyproject.toml" "$repo_root/launch/setup.sh" | sha256sum | cut -d' ' -f1)
ready() {  # ready STAMP MODULE: installed from these inputs, and importable
  [ -f "$venv/$1" ] && [ "$(cat "$venv/$1")" = "$inputs_hash" ] \
    && "$py" -c "import importlib.util as u, sys; sys.exit(not u.find_spec('$2'))"
}
if ready .distaccum-setup distaccum && { [ "$with_horovod" = 0 ] || ready .distaccum-horovod horovod; }; then
  log "up to date ($venv)"
  exit 0
fi

uv=("$venv/bin/uv" pip install -q --python "$py")
if ! ready .distaccum-setup distaccum; then
  log "installing distaccum and its pinned dependencies"
  # uv installs in parallel: measured here into a fresh venv, 9 s with nothing cached against
  # pip's 40 s with every wheel cached. pip stays for the Horovod build below.
  "$py" -m pip install -qq "uv==0.13.9"
  "${uv[@]}" "setuptools>=77" wheel -e "$repo_root[test,benchmarks]"
  echo "$inputs_hash" > "$venv/.distaccum-setup"
fi
if [ "$with_horovod" = 0 ]; then
  log "ready: $venv (without Horovod: mpirun jobs use mpi4py; launch/setup.sh --horovod adds it)"
  exit 0
fi

# The wheel is tied to the TF ABI and the Python version: both go in the cache key.
tf_version=$("$py" -c "import importlib.metadata as m; print(m.version('tensorflow-cpu'))")
py_tag=$("$py" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
wheel_dir="$cache_dir/horovod-$horovod_version-p$horovod_patch_level-tf$tf_version-$py_tag"

build_progress() {  # build_progress LOG STARTED: elapsed time and CMake's compile progress
  local elapsed=$((SECONDS - $2)) percent objects
  percent=$(grep -o '\[ *[0-9]*%\]' "$1" | tail -n 1 | tr -dc '0-9' || true)
  objects=$(grep -c 'Building CXX object' "$1" || true)
  log "building Horovod: $((elapsed / 60)) min $((elapsed % 60)) s, ${percent:-0}% of compile steps done (${objects} objects compiled)"
}

build_horovod_wheel() {
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  log "building Horovod $horovod_version against TF $tf_version (minutes, once; progress every 30 s)"
  "$py" -m pip download -qq --no-deps --no-binary :all: -d "$work" "horovod==$horovod_version"
  tar -xzf "$work"/horovod-$horovod_version.tar.gz -C "$work"
  local src="$work/horovod-$horovod_version"
  # TF 2.21 no longer ships the XLA headers xla_mpi_ops.cc needs; XLA ops only matter for GPU XLA.
  sed -i '/xla_mpi_ops\.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
  # horovodrun's MPI mode passes single-dash long options (-bind-to, -map-by) that Open MPI 5's
  # prterun no longer accepts; the double-dash spelling works with Open MPI 4 and 5.
  sed -i "s/'-bind-to /'--bind-to /g; s/'-map-by /'--map-by /g; s/'-rank-by /'--rank-by /g" \
    "$src/horovod/runner/mpi_run.py"
  grep -q "'--bind-to none'" "$src/horovod/runner/mpi_run.py" \
    || { log "Horovod's mpi_run.py changed: the Open MPI 5 patch no longer applies"; exit 1; }
  (
    cd "$src"
    export PATH="$venv/bin:$PATH"
    CMAKE_POLICY_VERSION_MINIMUM=3.5 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 \
      HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
      MAKEFLAGS="-j$(nproc)" \
      exec "$py" -m pip wheel -v --no-build-isolation --no-deps -w "$work/dist" . >"$work/build.log" 2>&1
  ) &
  local builder=$! started=$SECONDS
  while kill -0 "$builder" 2>/dev/null; do
    for _ in $(seq 30); do kill -0 "$builder" 2>/dev/null && sleep 1; done
    kill -0 "$builder" 2>/dev/null && build_progress "$work/build.log" "$started"
  done
  if ! wait "$builder"; then
    tail -n 40 "$work/build.log" >&2
    log "Horovod build failed"
    exit 1
  fi
  mkdir -p "$wheel_dir"
  # Copy then rename so an interrupted set-up never leaves a half-written wheel in the cache.
  local built
  built=$(ls "$work"/dist/horovod-*.whl)
  cp "$built" "$wheel_dir/.partial" && mv "$wheel_dir/.partial" "$wheel_dir/$(basename "$built")"
}

if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
  build_horovod_wheel
fi
log "installing cached $(ls "$wheel_dir"/horovod-*.whl)"
"${uv[@]}" --reinstall --no-deps "$wheel_dir"/horovod-*.whl
"${uv[@]}" cloudpickle psutil packaging cffi
# Quiet unless it fails (importing TensorFlow prints load-time banners).
if ! check=$("$py" -c "import horovod.tensorflow as hvd; assert hvd.gloo_built() and hvd.mpi_built()" 2>&1); then
  echo "$check" >&2
  log "Horovod installed but not built with Gloo and MPI"
  exit 1
fi

echo "$inputs_hash" > "$venv/.distaccum-horovod"
log "ready: $venv (with Horovod)"
