#!/usr/bin/env bash
# Idempotent set-up: creates .venv/ at the repo root and installs distaccum editable with its pinned
# dependencies (mpi4py included: mpirun jobs need nothing else). With --horovod it also installs a
# Horovod wheel patched for TF 2.21, built once (minutes, progress every 30 s) and cached outside
# the repo. It also installs checkov, for tests/test_checkov.py, into a venv of its own under
# .venv/tools/ (its pins would move TensorFlow's dependencies). A second run with nothing changed
# returns in seconds. Set-up compiles every installed module to bytecode (see compile_bytecode).
#
# Two variants of the same .venv/: `cpu` (tensorflow-cpu, the default) and `gpu`
# (tensorflow[and-cuda] with NVIDIA's CUDA 12 wheels, and Horovod built with NCCL). --gpu, or
# DISTACCUM_VARIANT=gpu (which launch/run.sh and launch/test.sh pass on), chooses `gpu`; switching
# replaces the other variant's TensorFlow and Horovod. --dry-run prints what would be installed
# and built, and changes nothing.
#
#   launch/setup.sh [--horovod] [--gpu] [--dry-run]
set -euo pipefail

with_horovod=0 dry_run=0
variant=${DISTACCUM_VARIANT:-cpu}
for option in "$@"; do
  case "$option" in
    --horovod) with_horovod=1 ;;
    --gpu) variant=gpu ;;
    --dry-run) dry_run=1 ;;
    *) echo "launch/setup.sh: error: options are --horovod, --gpu and --dry-run. Received: ${option@Q}" >&2
       exit 2 ;;
  esac
done
case "$variant" in
  cpu|gpu) ;;
  *) echo "launch/setup.sh: error: DISTACCUM_VARIANT must be cpu or gpu. Received: DISTACCUM_VARIANT=${variant@Q}" >&2
     exit 2 ;;
esac

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo_root/.venv"
cache_dir="${DISTACCUM_CACHE_DIR:-$HOME/.cache/distaccum}"
python_bin="${PYTHON:-python3}"
horovod_version=0.28.1
# Bump when the patches applied to Horovod's sources change, so the cached wheel is rebuilt.
horovod_patch_level=3
# The variant's TensorFlow distribution, and the extra of pyproject.toml that pins it.
tensorflow_distribution=$([ "$variant" = gpu ] && echo tensorflow || echo tensorflow-cpu)
other_distribution=$([ "$variant" = gpu ] && echo tensorflow-cpu || echo tensorflow)
requirement="-e $repo_root[$variant,test,benchmarks]"
# Keras 2, for the peers benchmark only (Horovod's Keras API runs on nothing newer). tf-keras
# requires the `tensorflow` distribution, which would put a second TensorFlow over tensorflow-cpu;
# the variant's TensorFlow is the one it needs, so it is installed without its dependencies.
keras2_requirement="tf-keras==2.21.0"
# KerasHub, for the tests' real backbones: its metadata requires tensorflow-text, which requires
# the `tensorflow` distribution (a second TensorFlow over tensorflow-cpu), and it imports without
# it. Installed without its dependencies; the ones it imports are pinned in the `test` extra.
kerashub_requirement="keras-hub==0.32.0"
# checkov pins packaging and termcolor below what TensorFlow takes (a dry run into .venv/ would
# downgrade both): it gets a venv of its own, which the tests find at this path.
checkov_requirement="checkov==3.3.30"
checkov_venv="$venv/tools/checkov"
checkov_stamp="$checkov_requirement, bytecode compiled"

log() { echo "[setup] $*" >&2; }
# Bytecode for everything a venv holds, compiled here once: where Python may not write next to the
# sources (the pods' read-only root filesystem, PYTHONDONTWRITEBYTECODE=1) every process would
# otherwise compile TensorFlow's Python again (`import tensorflow, keras`: 9.0 s against 3.5 s).
# Up-to-date files are skipped (seconds).
compile_bytecode() {  # compile_bytecode PYTHON DIRECTORY...
  "$1" -m compileall -qq -j 0 "${@:2}" \
    || log "warning: some files in ${*:2} could not be compiled (Python compiles them on import)"
}
site_packages() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }

if [ "$dry_run" = 1 ]; then
  echo "venv: $venv"
  echo "install: $requirement"
  echo "install without dependencies: $keras2_requirement"
  echo "install without dependencies: $kerashub_requirement"
  echo "install into $checkov_venv: $checkov_requirement"
  echo "compile: the bytecode of every installed package and of $repo_root/distaccum"
  "$python_bin" -c "import sys, tomllib
extras = tomllib.load(open(sys.argv[1], 'rb'))['project']['optional-dependencies']
print('tensorflow:', ', '.join(extras[sys.argv[2]]))" "$repo_root/pyproject.toml" "$variant"
  [ "$with_horovod" = 1 ] && bash "$repo_root/launch/horovod/build.sh" "$venv" - "$variant" --dry-run
  exit 0
fi

# The checks below import TensorFlow: no C++ banners (errors still print).
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"

# Stamps record what the last successful set-up installed from; same inputs -> nothing to do.
inputs_hash=$(cat "$repo_root/pyproject.toml" "$repo_root/launch/setup.sh" \
  "$repo_root/launch/horovod/"* | sha256sum | cut -d' ' -f1)
stamp="$inputs_hash $variant"
ready() {  # ready STAMP MODULE: installed from these inputs for this variant, and importable
  [ -f "$venv/$1" ] && [ "$(cat "$venv/$1")" = "$stamp" ] \
    && "$py" -c "import importlib.util as u, sys; sys.exit(not u.find_spec('$2'))"
}
checkov_ready() {
  [ -x "$checkov_venv/bin/checkov" ] \
    && [ "$(cat "$checkov_venv/.distaccum-checkov" 2>/dev/null)" = "$checkov_stamp" ]
}
if ready .distaccum-setup distaccum && checkov_ready \
    && { [ "$with_horovod" = 0 ] || ready .distaccum-horovod horovod; }; then
  log "up to date ($venv, $variant)"
  exit 0
fi

uv=("$venv/bin/uv" pip install -q --python "$py")
if ! ready .distaccum-setup distaccum; then
  log "installing distaccum and its pinned dependencies ($variant)"
  # uv installs in parallel: measured here into a fresh venv, 9 s with nothing cached against
  # pip's 40 s with every wheel cached. pip stays for the Horovod build.
  "$py" -m pip install -qq "uv==0.13.9"
  if "$py" -c "import importlib.metadata as m; m.version('$other_distribution')" 2>/dev/null; then
    # Both TensorFlow distributions write the same `tensorflow` package: one at a time. Horovod
    # was built against the other one, so it goes too.
    log "replacing the other variant's $other_distribution and Horovod"
    "$venv/bin/uv" pip uninstall -q --python "$py" "$other_distribution" horovod
    rm -f "$venv/.distaccum-horovod"
  fi
  # shellcheck disable=SC2086 # the requirement is "-e PATH[extras]", two words
  "${uv[@]}" "setuptools>=77" wheel $requirement
  "${uv[@]}" --no-deps "$keras2_requirement" "$kerashub_requirement"
  compile_bytecode "$py" "$(site_packages "$py")" "$repo_root/distaccum"
  echo "$stamp" > "$venv/.distaccum-setup"
fi
if ! checkov_ready; then
  # Measured into a fresh venv: 8 s with nothing cached, 2 s from uv's cache.
  log "installing $checkov_requirement into $checkov_venv"
  "$venv/bin/uv" venv -q --clear --python "$py" "$checkov_venv"
  "$venv/bin/uv" pip install -q --python "$checkov_venv/bin/python" "$checkov_requirement"
  compile_bytecode "$checkov_venv/bin/python" "$(site_packages "$checkov_venv/bin/python")"
  echo "$checkov_stamp" > "$checkov_venv/.distaccum-checkov"
fi
if [ "$with_horovod" = 0 ]; then
  log "ready: $venv ($variant; without Horovod: mpirun jobs use mpi4py; launch/setup.sh --horovod adds it)"
  exit 0
fi

# The wheel is tied to the TF ABI, the Python version and (GPU) the CUDA runtime and NCCL it was
# built against: all go in the cache key.
version_of() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
key="horovod-$horovod_version-p$horovod_patch_level-tf$(version_of "$tensorflow_distribution")"
key+="-$("$py" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")"
if [ "$variant" = gpu ]; then
  key+="-cuda$(version_of nvidia-cuda-runtime-cu12)-nccl$(version_of nvidia-nccl-cu12)"
fi
wheel_dir="$cache_dir/$key"

if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
  bash "$repo_root/launch/horovod/build.sh" "$venv" "$wheel_dir" "$variant"
fi
log "installing cached $(ls "$wheel_dir"/horovod-*.whl)"
"${uv[@]}" --reinstall --no-deps "$wheel_dir"/horovod-*.whl
"${uv[@]}" cloudpickle psutil packaging cffi
compile_bytecode "$py" "$(site_packages "$py")/horovod"
# Quiet unless it fails (importing TensorFlow prints load-time banners).
check="import horovod.tensorflow as hvd; assert hvd.gloo_built() and hvd.mpi_built(), 'Gloo and MPI'"
if [ "$variant" = gpu ]; then
  check+="; import tensorflow as tf; assert hvd.nccl_built() and tf.test.is_built_with_cuda(), 'NCCL and CUDA'"
fi
if ! output=$("$py" -c "$check" 2>&1); then
  echo "$output" >&2
  log "Horovod installed but not built as the $variant variant needs"
  exit 1
fi

echo "$stamp" > "$venv/.distaccum-horovod"
log "ready: $venv ($variant, with Horovod)"
