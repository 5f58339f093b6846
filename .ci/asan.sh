#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer: a copy of the tree built with FUSEDLOSS_SANITIZE=address
# (-O1 -g1: line tables for the reports, half the build time of -g), then every test that runs the
# C++ CPU kernels, with libasan preloaded into Python. Any out-of-bounds read or write in a kernel
# aborts the run with ASan's report.
#
# Only the DEFAULT copy of the kernels is built: torch's DEFAULT at::vec::Vectorized is 32 bytes
# wide, as AVX2's is, so the vector bodies and the tails the tests reach are the ones the AVX2 copy
# runs, and the build takes half the time. (FUSEDLOSS_ASAN_ISAS=AVX2 or AVX512 adds that copy.)
#
# libstdc++ is preloaded after libasan: python does not link it, so without it ASan's __cxa_throw
# interceptor finds no real __cxa_throw and aborts ("CHECK failed: real___cxa_throw != 0") at the
# first TORCH_CHECK that throws.
#
# Usage: .ci/asan.sh [build|test|all], from the repository root inside the CI virtualenv (torch
# installed). FUSEDLOSS_ASAN_DIR keeps the sanitized tree there (and reuses its build) instead of a
# temporary directory; `build` and `test` apart need it (.ci/run builds beside the main tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:-all}
PY=${PYTHON:-python}
CXX=${CXX:-g++}
if [ -n "${FUSEDLOSS_ASAN_DIR:-}" ]; then
  WORK=$FUSEDLOSS_ASAN_DIR; mkdir -p "$WORK"
elif [ "$PHASE" = all ]; then
  WORK=$(mktemp -d)
  trap 'status=$?; if [ $status -eq 0 ]; then rm -rf "$WORK"; else echo "kept $WORK for a look"; fi' EXIT
else
  echo "usage: FUSEDLOSS_ASAN_DIR=DIR $0 build|test"; exit 2
fi

if [ "$PHASE" = all ] || [ "$PHASE" = build ]; then
tar -c --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.so' \
    --exclude=./fusedloss/kernels . | tar -x -C "$WORK"
ln -sfn ../kernels "$WORK/fusedloss/kernels"
ISAS=${FUSEDLOSS_ASAN_ISAS:-DEFAULT}
echo "building fusedloss._C with AddressSanitizer ($ISAS kernels) in $WORK"
start=$SECONDS
(cd "$WORK" && FUSEDLOSS_SANITIZE=address FUSEDLOSS_ISAS="$ISAS" MAX_JOBS=${MAX_JOBS:-2} \
    "$PY" setup.py -q build_ext --inplace > build.log 2>&1) || { tail -40 "$WORK/build.log"; exit 1; }
echo "built in $((SECONDS - start)) s"
fi
[ "$PHASE" = build ] && exit 0

LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBSTDCXX=$("$CXX" -print-file-name=libstdc++.so)
SO=$(ls "$WORK"/fusedloss/_C*.so)
# The build really is instrumented.
SYMS=$(nm -D --undefined-only "$SO")  # (not piped into grep -q: pipefail would see nm's SIGPIPE)
grep -q __asan_report_load <<< "$SYMS" || { echo "$SO has no ASan checks"; exit 1; }

cd "$WORK"
# detect_leaks=0: CPython and torch keep allocations alive at exit by design.
export LD_PRELOAD="$LIBASAN $LIBSTDCXX" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export FUSEDLOSS_REQUIRE_EXT=1 PYTHONPATH="$WORK"

# The preloaded runtime reports: an out-of-bounds read in a sanitized library must abort Python
# with a heap-buffer-overflow report, or this step would pass whatever the kernels do.
printf '#include <stdlib.h>\nint oob(int i) { int *p = malloc(4 * sizeof(int)); int v = p[i]; free(p); return v; }\n' \
    > canary.c
"$CXX" -x c -shared -fPIC -O0 -fsanitize=address canary.c -o canary.so
# (abort_on_error=0 here: ASan exits with status 1 instead of raising SIGABRT, which bash reports.)
if ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 \
    "$PY" -c "import ctypes; ctypes.CDLL('./canary.so').oob(4)" 2> canary.log; then
  echo "ASan canary: an out-of-bounds read went unreported"; exit 1
fi
grep -q "heap-buffer-overflow" canary.log || { cat canary.log; echo "ASan canary: no report"; exit 1; }
echo "ASan canary: the out-of-bounds read was reported"

"$PY" -c "import fusedloss, sys; assert fusedloss.__file__.startswith('$WORK'), fusedloss.__file__"
# Every test file that runs the C++ CPU kernels; the Triton-interpreter, compile and opcheck cases
# do not reach them and are the slow ones, so they are left to the main run.
"$PY" -m pytest -q -p no:cacheprovider -x -m "not gpu and not bigmem" \
    -k "not triton and not compile and not opcheck" \
    tests/test_cpu_kernels.py tests/test_dice_kernels.py tests/test_properties.py tests/test_ops.py \
    tests/test_cross_entropy.py tests/test_ce_numerics.py tests/test_logsumexp.py tests/test_bce.py \
    tests/test_sigmoid_focal.py tests/test_softmax_focal.py tests/test_tv.py tests/test_dice.py \
    tests/test_nn.py
