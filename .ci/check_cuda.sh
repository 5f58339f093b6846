#!/usr/bin/env bash
# Compile check of the CUDA sources: every csrc/cuda/*.cu -> object file (-c, no link) for sm_80 and
# sm_90, against torch's headers with the flags torch.utils.cpp_extension uses for extensions.
# Needs no GPU. Skips (exit 0) where there is no nvcc; a compile error fails (exit != 0).
#
#   bash .ci/check_cuda.sh            (from the repository root, or from anywhere)
#   PYTHON=.venv/bin/python bash .ci/check_cuda.sh   (default: python, else .venv/bin/python)
#   CUDA_STD=c++20 bash .ci/check_cuda.sh     (default c++17; torch 2.13's own builds use c++20)
#   CUDA_CHECK_JOBS=1 bash .ci/check_cuda.sh  (parallel compiles; default: number of CPUs)
#   FUSEDLOSS_NVCC=/path/to/nvcc bash .ci/check_cuda.sh   (else nvcc on PATH, else
#                                                          /usr/local/cuda/bin/nvcc)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The python whose torch to compile against: $PYTHON, else `python`, else (when `python` has no
# torch) the repository's development venv.
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
else
  PY=python
  if ! python -c "import torch" >/dev/null 2>&1 && [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
  fi
fi
STD="${CUDA_STD:-c++17}"

NVCC=""
if [ -n "${FUSEDLOSS_NVCC+set}" ]; then
  # Explicit choice (tests use a missing path to exercise the skip).
  if [ -x "${FUSEDLOSS_NVCC}" ]; then NVCC="$FUSEDLOSS_NVCC"; fi
elif command -v nvcc >/dev/null 2>&1; then
  NVCC="$(command -v nvcc)"
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  NVCC=/usr/local/cuda/bin/nvcc
fi
if [ -z "$NVCC" ]; then
  echo "nvcc not found: CUDA compile check skipped"
  exit 0
fi

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
shopt -u nullglob
if [ "${#SOURCES[@]}" -eq 0 ]; then
  echo "no csrc/cuda/*.cu files: nothing to compile"
  exit 0
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/fusedloss_cuda_check.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# torch's include dirs, nvcc flags and C++ ABI, one item per line.
if ! "$PY" - >"$TMP/torch_flags" 2>"$TMP/torch_err" <<'PYEOF'
import torch
from torch.utils import cpp_extension as ce
for p in ce.include_paths():
    print("-I" + p)
for f in ce.COMMON_NVCC_FLAGS:
    print(f)
print("-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI))
PYEOF
then
  echo "check_cuda: cannot query torch with '$PY' (set PYTHON):" >&2
  cat "$TMP/torch_err" >&2
  exit 1
fi
mapfile -t TORCH_FLAGS <"$TMP/torch_flags"

# The CPU wheel of torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h; a stub, searched
# last, stands in for it (a CUDA build's own header wins).
mkdir -p "$TMP/stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"

FLAGS=(
  -c -std="$STD"
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  "${TORCH_FLAGS[@]}"
  -I"$ROOT/csrc/include"
  -I"$TMP/stub"
  --compiler-options -fPIC
  -DTORCH_API_INCLUDE_EXTENSION_H
  -DTORCH_EXTENSION_NAME=_C
)
if [ "$STD" = "c++17" ]; then
  # torch 2.13's headers use a C++20 feature (default bit-field initialisers) that compilers
  # accept under C++17 with a warning; silence just that one in the headers' output.
  FLAGS+=(-diag-suppress 3306 -Xcompiler -Wno-c++20-extensions)
fi

JOBS="${CUDA_CHECK_JOBS:-$(nproc 2>/dev/null || echo 2)}"
# Spare CPUs go to nvcc's own parallelism over the two architectures (--threads).
ARCH_THREADS=$(( JOBS / ${#SOURCES[@]} ))
if [ "$ARCH_THREADS" -gt 2 ]; then ARCH_THREADS=2; fi
if [ "$ARCH_THREADS" -ge 2 ]; then FLAGS+=(--threads "$ARCH_THREADS"); fi
echo "check_cuda: $("$NVCC" --version | tail -n 1) ($NVCC), torch from $PY, -std=$STD, sm_80 + sm_90, ${#SOURCES[@]} file(s), $JOBS job(s)"

compile_one() {
  local src="$1" i="$2"
  local obj="$TMP/obj_$i.o" log="$TMP/log_$i.txt"
  local start=$SECONDS
  if "$NVCC" "${FLAGS[@]}" "$src" -o "$obj" >"$log" 2>&1; then
    echo "  ok    $src ($((SECONDS - start)) s)"
    if [ -s "$log" ]; then sed 's/^/        /' "$log"; fi
    return 0
  else
    echo "  FAIL  $src ($((SECONDS - start)) s)"
    sed 's/^/        /' "$log"
    return 1
  fi
}

status=0
if [ "${#SOURCES[@]}" -eq 1 ] || [ "$JOBS" -le 1 ]; then
  for i in "${!SOURCES[@]}"; do
    compile_one "${SOURCES[$i]}" "$i" || status=1
  done
else
  pids=()
  for i in "${!SOURCES[@]}"; do
    # Keep at most $JOBS compiles running; each prints its own block when done.
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
    compile_one "${SOURCES[$i]}" "$i" >"$TMP/out_$i.txt" 2>&1 &
    pids[$i]=$!
  done
  for i in "${!SOURCES[@]}"; do
    wait "${pids[$i]}" || status=1
    cat "$TMP/out_$i.txt"
  done
fi

if [ "$status" -ne 0 ]; then
  echo "check_cuda: FAILED" >&2
  exit 1
fi
echo "check_cuda: all ${#SOURCES[@]} CUDA source(s) compile"
