#!/usr/bin/env bash
# Set up (idempotent, seconds once done) and run `distaccum train` under a launcher.
#
#   launch/run.sh local             [train args]   one process, no launcher, no Horovod needed
#   launch/run.sh mpi N             [train args]   mpirun -np N (Open MPI 5), mpi4py collectives
#   launch/run.sh hostfile FILE N   [train args]   the same over the hosts in FILE ("host slots=S"
#                                                  lines); every host needs this repo and .venv at
#                                                  the same path and passwordless ssh
#   launch/run.sh gloo N            [train args]   horovodrun --gloo -np N (builds Horovod once)
#   launch/run.sh horovodrun-mpi N  [train args]   horovodrun --mpi -np N (patched for Open MPI 5)
#
# train args: --config FILE [--set key=value ...]; e.g.
#   bash launch/run.sh mpi 2 --config distaccum/configs/digits.yaml
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "launch/run.sh: error: $*" >&2; exit 2; }
positive_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]] || die "$2 must be a positive integer. Received: $2=${1@Q}"; }

mode=${1:-}
case "$mode" in
  local) shift ;;
  gloo|mpi|horovodrun-mpi) num_workers=${2:-}; positive_int "$num_workers" N; shift 2 ;;
  hostfile)
    hostfile=${2:-}; num_workers=${3:-}
    [ -f "$hostfile" ] || die "hostfile not found. Received: FILE=${hostfile@Q}"
    positive_int "$num_workers" N; shift 3 ;;
  *) die "MODE must be local, gloo, mpi, horovodrun-mpi or hostfile. Received: MODE=${mode@Q}" ;;
esac

case "$mode" in
  gloo|horovodrun-mpi) bash "$repo_root/launch/setup.sh" --horovod ;;
  local) bash "$repo_root/launch/setup.sh" ;;
  mpi|hostfile)
    bash "$repo_root/launch/setup.sh"
    # mpirun modes use mpi4py's collectives, even where Horovod is installed, unless told otherwise.
    export DISTACCUM_BACKEND="${DISTACCUM_BACKEND:-mpi}" ;;
esac
export PATH="$repo_root/.venv/bin:$PATH"
# No TensorFlow start-up banners on any rank (errors still print); forwarded to every host.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
forwarded=(-x PATH -x TF_CPP_MIN_LOG_LEVEL -x DISTACCUM_BACKEND)
if [ "$(id -u)" = 0 ]; then
  # Open MPI refuses to start as root without both (on every host, hence forwarded too).
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  forwarded+=(-x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM)
fi
train=("$repo_root/.venv/bin/distaccum" train)
# horovodrun imports TensorFlow itself, which prints two load-time banners no log level silences
# (the workers drop theirs in distaccum's CLI); every other line passes, errors included.
banners=(-e 'All log messages before absl::InitializeLog' -e 'oneDNN custom operations are on')

case "$mode" in
  local) exec "${train[@]}" "$@" ;;
  gloo) exec horovodrun --gloo -np "$num_workers" "${train[@]}" "$@" \
    2> >(grep --line-buffered -v "${banners[@]}" >&2) ;;
  mpi) exec mpirun -np "$num_workers" "${train[@]}" "$@" ;;
  horovodrun-mpi) exec horovodrun --mpi -np "$num_workers" "${train[@]}" "$@" \
    2> >(grep --line-buffered -v "${banners[@]}" >&2) ;;
  hostfile) exec mpirun --hostfile "$hostfile" -np "$num_workers" "${forwarded[@]}" "${train[@]}" "$@" ;;
esac
