#!/usr/bin/env bash
# Ahead-of-time CMake build of csrc/ into build-csrc/ (or $BUILD_DIR), in a source checkout or an unpacked
# sdist (see CMakeLists.txt); odegan_kernels.ops.csrc loads build-csrc/libodegan_kernels_csrc.so.
#   csrc/build.sh           CPU kernels (torch's CMake config still needs the CUDA toolkit if torch is a CUDA build)
#   csrc/build.sh --cuda    CPU and CUDA kernels (sm_80, sm_90; CUDA_ARCHS=90 builds sm_90 alone, about half the time)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
with_cuda=OFF
[ "${1:-}" = "--cuda" ] && with_cuda=ON
args=(-DCMAKE_PREFIX_PATH="$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')"
      -DPython3_EXECUTABLE="$(command -v "$PY")" -DODEGAN_WITH_CUDA=$with_cuda)
if [ -n "${CUDA_ARCHS:-}" ]; then  # e.g. 90, or "80;90": CMake's list and torch's (9.0, 8.0;9.0) from it
  args+=(-DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS")
  export TORCH_CUDA_ARCH_LIST
  TORCH_CUDA_ARCH_LIST=$(echo "$CUDA_ARCHS" | sed -E 's/([0-9])([0-9])/\1.\2/g')
fi
if command -v nvcc >/dev/null 2>&1; then
  # nvcc may be a wrapper script: ask it where its toolkit is.
  here=$(nvcc -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
  if [ -n "$here" ]; then
    root=$(cd "$here/.." && pwd)
    args+=(-DCUDAToolkit_ROOT="$root" -DCUDA_TOOLKIT_ROOT_DIR="$root" -DCMAKE_CUDA_COMPILER="$here/nvcc")
    export CUDA_HOME="$root" CUDACXX="$here/nvcc"
  fi
fi
BUILD_DIR=${BUILD_DIR:-build-csrc}
cmake -S . -B "$BUILD_DIR" "${args[@]}"
cmake --build "$BUILD_DIR" -j "$(nproc)"
echo "built: $BUILD_DIR/libodegan_kernels_csrc.so"
