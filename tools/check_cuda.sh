#!/usr/bin/env bash
# Compile-check the torch-free CUDA kernels of inf_mllm (csrc/cuda/compact_kernels.cu) with
# nvcc for sm_80, sm_89 and sm_90 (no GPU and no torch needed). Usage: tools/check_cuda.sh [archs...]
# NVCC selects the compiler (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc, else /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC=nvcc
  elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc
  else echo "check_cuda: nvcc not found" >&2; exit 2
  fi
fi
ARCHS=("$@")
[[ ${#ARCHS[@]} -eq 0 ]] && ARCHS=(80 89 90)

"$NVCC" --version | tail -n 1
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0
for src in csrc/cuda/compact_kernels.cu; do
  for arch in "${ARCHS[@]}"; do
    out="$tmp/$(basename "$src" .cu)_sm${arch}.o"
    if "$NVCC" -std=c++17 -O3 -lineinfo -Werror all-warnings -Xcompiler -Wall \
        -gencode "arch=compute_${arch},code=sm_${arch}" -c "$src" -o "$out" -Xptxas -warn-spills; then
      echo "ok   $src sm_${arch}"
    else
      echo "FAIL $src sm_${arch}" >&2
      status=1
    fi
  done
done
exit $status
