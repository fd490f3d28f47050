#!/usr/bin/env bash
# Idempotent set-up: creates .venv/ at the repo root, installs distaccum editable with its pinned
# dependencies, and installs a Horovod wheel patched for TF 2.21 (built once, cached outside the repo).
# A second run with nothing changed returns in seconds.
set -euo pipefail

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

# The stamp records what the last successful set-up installed from; same inputs -> nothing to do.
stamp="$venv/.distaccum-setup"
inputs_hash=$(cat "$repo_root/pyproject.toml" "$repo_root/launch/setup.sh" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs_hash" ] \
   && "$py" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('horovod') and u.find_spec('distaccum')))"; then
  log "up to date ($venv)"
  exit 0
fi

log "installing distaccum and its pinned dependencies"
# uv installs in parallel: measured here into a fresh venv, 9 s with nothing cached against pip's
# 40 s with every wheel cached. pip stays for the Horovod build below.
"$py" -m pip install -qq "uv==0.13.9"
uv=("$venv/bin/uv" pip install -q --python "$py")
"${uv[@]}" "setuptools>=77" wheel -e "$repo_root[test,benchmarks]"

# The wheel is tied to the TF ABI and the Python version: both go in the cache key.
tf_version=$("$py" -c "import importlib.metadata as m; print(m.version('tensorflow-cpu'))")
py_tag=$("$py" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
wheel_dir="$cache_dir/horovod-$horovod_version-p$horovod_patch_level-tf$tf_version-$py_tag"

build_horovod_wheel() {
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  log "building Horovod $horovod_version against TF $tf_version (takes ~5 min, once)"
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
      "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" . >"$work/build.log" 2>&1 \
      || { tail -n 40 "$work/build.log" >&2; log "Horovod build failed"; exit 1; }
  )
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

echo "$inputs_hash" > "$stamp"
log "ready: $venv"
