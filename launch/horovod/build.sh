#!/usr/bin/env bash
# Build a Horovod 0.28.1 wheel patched for TF 2.21, for the CPU or the GPU (NCCL) variant.
# launch/setup.sh calls it with the venv to build against and the directory to leave the wheel
# in; `--dry-run` prints the build's environment and patches instead of building.
#
#   launch/horovod/build.sh VENV WHEEL_DIR cpu|gpu [--dry-run]
#
# The GPU variant needs no system CUDA: its toolkit is assembled from the NVIDIA wheels TF's
# `and-cuda` extra installs in the venv (runtime headers, NCCL) plus the CUDA C++ core library
# headers (nvidia-cuda-cccl-cu12, build only). PyPI's CUDA 12 wheels carry no nvcc, so Horovod's
# three CUDA kernels are replaced by host code on the CUDA runtime (cuda_kernels_host.cc, which
# says what that costs); a stand-in `nvcc` answers only `--version`, for CMake's FindCUDAToolkit.
set -euo pipefail

venv=$1 wheel_dir=$2 variant=$3 dry_run=${4:-}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py="$venv/bin/python"
horovod_version=0.28.1
log() { echo "[setup] $*" >&2; }

build_environment() {  # the variables Horovod's setup.py and CMake read, one per line
  echo CMAKE_POLICY_VERSION_MINIMUM=3.5
  echo HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
  echo HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
  echo "MAKEFLAGS=-j$(nproc)"
  if [ "$variant" = gpu ]; then
    echo HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED
    echo "HOROVOD_NCCL_HOME=$1/nccl CUDAToolkit_ROOT=$1/cuda"
    # Found at run time beside TF's own CUDA libraries in site-packages/nvidia.
    echo "LDFLAGS=-Wl,-rpath,\$ORIGIN/../../nvidia/nccl/lib:\$ORIGIN/../../nvidia/cuda_runtime/lib"
  fi
}

patches() {  # the edits made to Horovod's sources, as `sed`/`perl` programs by file
  # TF 2.21 no longer ships the XLA headers xla_mpi_ops.cc needs; XLA ops only matter for GPU XLA.
  echo "horovod/tensorflow/CMakeLists.txt: drop xla_mpi_ops.cc"
  # horovodrun's MPI mode passes single-dash long options (-bind-to, -map-by) that Open MPI 5's
  # prterun no longer accepts; the double-dash spelling works with Open MPI 4 and 5.
  echo "horovod/runner/mpi_run.py: --bind-to, --map-by, --rank-by"
  echo "horovod/common/gloo/gloo_context.cc: process-set contexts use the global context's interface"
  if [ "$variant" = gpu ]; then
    echo "CMakeLists.txt: no CUDA language (no nvcc)"
    echo "horovod/common/ops/cuda: cuda_kernels_host.cc instead of cuda_kernels.cu"
    echo "horovod/tensorflow/mpi_ops.cc: AsGpuStreamValue from Stream::platform_specific_handle"
  fi
}

if [ "$dry_run" = --dry-run ]; then
  echo "variant: $variant"
  build_environment "<build>" | sed 's/^/environment: /'
  patches | sed 's/^/patch: /'
  exit 0
fi

apply_patches() {
  local src=$1
  sed -i '/xla_mpi_ops\.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
  sed -i "s/'-bind-to /'--bind-to /g; s/'-map-by /'--map-by /g; s/'-rank-by /'--rank-by /g" \
    "$src/horovod/runner/mpi_run.py"
  grep -q "'--bind-to none'" "$src/horovod/runner/mpi_run.py" \
    || { log "Horovod's mpi_run.py changed: the Open MPI 5 patch no longer applies"; exit 1; }
  # A process set's Gloo context (the global process set's included) builds its device from its
  # own, never-set interface name, so Gloo falls back to the hostname's address: loopback
  # wherever the hostname resolves to 127.0.0.1, and ranks on other hosts cannot connect. It
  # takes the global context's interface (HOROVOD_GLOO_IFACE, e.g. horovodrun's
  # --network-interface) instead.
  perl -0pi -e 's/(void GlooContext::InitializeForProcessSet\(.*?\n)(  attr device_attr;\n  device_attr.iface = gloo_iface_;)/$1  gloo_iface_ = global_context.gloo_iface_;\n$2/s' \
    "$src/horovod/common/gloo/gloo_context.cc"
  grep -q "gloo_iface_ = global_context.gloo_iface_;" "$src/horovod/common/gloo/gloo_context.cc" \
    || { log "Horovod's gloo_context.cc changed: the process-set interface patch no longer applies"; exit 1; }
  [ "$variant" = gpu ] || return 0
  perl -0pi -e 's/if\(DEFINED ENV\{HOROVOD_CUDA_HOME\}\).*?enable_language\(CUDA\)\nendif\(\)\n/# distaccum: no nvcc, so no CUDA language\n/s' \
    "$src/CMakeLists.txt"
  cp "$here/cuda_kernels_host.cc" "$src/horovod/common/ops/cuda/"
  cat > "$src/horovod/common/ops/cuda/CMakeLists.txt" <<'CMAKE'
# distaccum: Horovod's kernels as host code on the CUDA runtime, for both C++ ABIs.
foreach(target horovod_cuda_kernels compatible_horovod_cuda_kernels)
  add_library(${target} STATIC cuda_kernels_host.cc)
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  target_link_libraries(${target} PUBLIC CUDA::cudart)
endforeach()
target_compile_definitions(horovod_cuda_kernels PRIVATE _GLIBCXX_USE_CXX11_ABI=1)
target_compile_definitions(compatible_horovod_cuda_kernels PRIVATE _GLIBCXX_USE_CXX11_ABI=0)
CMAKE
  # TF 2.21 no longer exports stream_executor::gpu::AsGpuStreamValue: define it inline.
  perl -0pi -e 's/GpuStreamHandle AsGpuStreamValue\(Stream\* stream\);/inline GpuStreamHandle AsGpuStreamValue(Stream* stream);/; s/(#include "tensorflow\/compiler\/xla\/stream_executor\/stream.h"\n)/$1namespace stream_executor { namespace gpu {\ninline GpuStreamHandle AsGpuStreamValue(Stream* stream) {\n  return static_cast<GpuStreamHandle>(stream->platform_specific_handle().stream);\n}\n} }\n/' \
    "$src/horovod/tensorflow/mpi_ops.cc"
  grep -q "no nvcc, so no CUDA language" "$src/CMakeLists.txt" \
    && grep -q "platform_specific_handle" "$src/horovod/tensorflow/mpi_ops.cc" \
    || { log "Horovod's sources changed: the GPU patches no longer apply"; exit 1; }
}

assemble_cuda_toolkit() {  # assemble_cuda_toolkit DIR: a CUDA 12 toolkit layout from the wheels
  local dir=$1 nvidia runtime_version
  nvidia="$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/nvidia"
  runtime_version=$("$py" -c "import importlib.metadata as m; print(m.version('nvidia-cuda-runtime-cu12'))")
  "$venv/bin/uv" pip install -q --target "$dir/cccl" "nvidia-cuda-cccl-cu12==${runtime_version%.*}.*"
  mkdir -p "$dir/cuda/bin" "$dir/cuda/include" "$dir/cuda/lib64" "$dir/nccl/lib"
  ln -s "$nvidia"/cuda_runtime/include/* "$nvidia"/cuda_nvcc/include/* \
    "$dir"/cccl/nvidia/cuda_cccl/include/* "$dir/cuda/include/"
  ln -s "$nvidia/cuda_runtime/lib/libcudart.so.12" "$dir/cuda/lib64/libcudart.so"
  ln -s "$nvidia/cuda_runtime/lib/libcudart_static.a" "$nvidia/cuda_runtime/lib/libculibos.a" \
    "$dir/cuda/lib64/"
  ln -s "$nvidia/nccl/include" "$dir/nccl/include"
  ln -s "$nvidia/nccl/lib/libnccl.so.2" "$dir/nccl/lib/libnccl.so"
  cat > "$dir/cuda/bin/nvcc" <<NVCC
#!/bin/sh
# Not nvcc: CUDA $runtime_version from PyPI has none. Answers --version for CMake's FindCUDAToolkit.
[ "\$1" = --version ] && { echo "Cuda compilation tools, release ${runtime_version%.*}, V$runtime_version"; exit 0; }
echo "nvcc: not available in this toolkit (assembled from PyPI wheels by distaccum)" >&2; exit 1
NVCC
  chmod +x "$dir/cuda/bin/nvcc"
}

build_progress() {  # build_progress LOG STARTED: elapsed time and CMake's compile progress
  local elapsed=$((SECONDS - $2)) percent objects
  percent=$(grep -o '\[ *[0-9]*%\]' "$1" | tail -n 1 | tr -dc '0-9' || true)
  objects=$(grep -c 'Building CXX object' "$1" || true)
  log "building Horovod: $((elapsed / 60)) min $((elapsed % 60)) s, ${percent:-0}% of compile steps done (${objects} objects compiled)"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "building Horovod $horovod_version ($variant) (minutes, once; progress every 30 s)"
"$py" -m pip download -qq --no-deps --no-binary :all: -d "$work" "horovod==$horovod_version"
tar -xzf "$work/horovod-$horovod_version.tar.gz" -C "$work"
src="$work/horovod-$horovod_version"
apply_patches "$src"
[ "$variant" = gpu ] && assemble_cuda_toolkit "$work"
mapfile -t environment < <(build_environment "$work" | tr ' ' '\n')
(
  cd "$src"
  # The venv's mpicc first. A system CUDA on the path is not used: CUDAToolkit_ROOT wins.
  export PATH="$venv/bin:$PATH"
  exec env "${environment[@]}" \
    "$py" -m pip wheel -v --no-build-isolation --no-deps -w "$work/dist" . >"$work/build.log" 2>&1
) &
builder=$! started=$SECONDS
while kill -0 "$builder" 2>/dev/null; do
  for _ in $(seq 30); do kill -0 "$builder" 2>/dev/null && sleep 1; done
  kill -0 "$builder" 2>/dev/null && build_progress "$work/build.log" "$started"
done
if ! wait "$builder"; then
  tail -n 40 "$work/build.log" >&2
  log "Horovod build failed"
  exit 1
fi
if [ "$variant" = gpu ] && ! grep -q "Found CUDAToolkit: $work/cuda" "$work/build.log"; then
  log "Horovod's build did not use the CUDA toolkit assembled from the venv's wheels"
  exit 1
fi
log "built Horovod in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
mkdir -p "$wheel_dir"
# Copy then rename so an interrupted set-up never leaves a half-written wheel in the cache.
built=$(ls "$work"/dist/horovod-*.whl)
cp "$built" "$wheel_dir/.partial" && mv "$wheel_dir/.partial" "$wheel_dir/$(basename "$built")"
