#!/usr/bin/env bash
# Compile check of the CUDA sources: every csrc/cuda/*.cu -> object file (-c, no link) for sm_80 and
# sm_90, against torch's headers with the flags torch.utils.cpp_extension uses for extensions.
# Needs no GPU. Skips (exit 0) where there is no nvcc; a compile error fails (exit != 0).
#
# Code-generation checks on the same compile (ptxas -v, and the PTX kept with --keep):
#   - a per-kernel table for sm_80 and sm_90: registers, spill stores / loads (bytes), stack frame,
#     and the widest global load and store in the kernel's PTX;
#   - FAIL on any spill (e.g. a __launch_bounds__ min-blocks tighter than the kernel's registers);
#   - FAIL when a vectorised kernel (VEC_KERNELS, a regex on the kernel's name) lacks a 128-bit
#     global load or a 128-bit global store (st.global.v4.b32 etc.) in its PTX.
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
  -Xptxas -v
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

# Kernels whose bodies are read and written in 16-byte vectors: their PTX must hold a 128-bit
# global load and a 128-bit global store.
VEC_KERNELS="${VEC_KERNELS:-softmax_rows_(warp|block)_kernel|scale_flat_kernel|ew_vec_kernel}"

# Compiler output without ptxas's per-function info lines (they go to the table below).
print_log() {
  grep -v -E '^ptxas info|^    [0-9]+ bytes stack frame' "$1" | sed 's/^/        /' || true
}

compile_one() {
  local src="$1" i="$2"
  local obj="$TMP/obj_$i.o" log="$TMP/log_$i.txt" keep="$TMP/keep_$i"
  local start=$SECONDS
  mkdir -p "$keep"
  if "$NVCC" "${FLAGS[@]}" --keep --keep-dir "$keep" "$src" -o "$obj" >"$log" 2>&1; then
    echo "  ok    $src ($((SECONDS - start)) s)"
    print_log "$log"
    return 0
  else
    echo "  FAIL  $src ($((SECONDS - start)) s)"
    print_log "$log"
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

# Per-kernel table from ptxas -v and the kept PTX; fails on spills and on missing 128-bit access.
args=()
for i in "${!SOURCES[@]}"; do args+=("${SOURCES[$i]}" "$TMP/log_$i.txt" "$TMP/keep_$i"); done
if ! VEC_KERNELS="$VEC_KERNELS" "$PY" - "${args[@]}" <<'PYEOF'
import glob, os, re, subprocess, sys

vec_re = re.compile(os.environ["VEC_KERNELS"])
args = sys.argv[1:]
rows = {}    # (mangled, sm) -> ptxas figures
ptx = {}     # (mangled, sm) -> {"ld": set(bits), "st": set(bits)}
for k in range(0, len(args), 3):
    src, log, keep = args[k:k + 3]
    cur = None
    for line in open(log, errors="replace"):
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            cur = (m.group(1), m.group(2))
            rows[cur] = {"src": os.path.basename(src), "regs": -1, "stack": 0, "sst": 0, "sld": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            rows[cur].update(stack=int(m.group(1)), sst=int(m.group(2)), sld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows[cur]["regs"] = int(m.group(1))
    for path in glob.glob(os.path.join(keep, "*.compute_*.ptx")):
        sm = "sm_" + re.search(r"compute_(\d+)", os.path.basename(path)).group(1)
        name = None
        for line in open(path, errors="replace"):
            m = re.match(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$]+)", line)
            if m:
                name = (m.group(1), sm)
                ptx[name] = {"ld": set(), "st": set()}
                continue
            if name is None:
                continue
            m = re.search(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.(v2|v4|v8))?\.[a-z]+(\d+)\b", line)
            if m:
                lanes = {"v2": 2, "v4": 4, "v8": 8}.get(m.group(2), 1)
                ptx[name][m.group(1)].add(lanes * int(m.group(3)))

if not rows:
    print("check_cuda: no ptxas -v output found", file=sys.stderr)
    sys.exit(1)
names = sorted({n for n, _ in rows})
try:
    dem = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    dem = dem if len(dem) == len(names) else names
except (OSError, subprocess.CalledProcessError):
    dem = names


def short(d):
    d = re.sub(r"\(anonymous namespace\)::|fusedloss::|cuda::|c10::", "", d)
    d = re.sub(r"\(.*\)$", "", d)
    for a, b in (("BFloat16", "bf16"), ("Half", "f16"), ("double", "f64"), ("float", "f32"),
                 ("unsigned long", "u64"), ("unsigned int", "u32"), ("void ", "")):
        d = d.replace(a, b)
    return d


pretty = {n: short(d) for n, d in zip(names, dem)}
failures = []
width = max(len(pretty[n]) for n in names)
print()
print(f"  {'kernel':<{width}}  arch   regs  spill st / ld (B)  stack (B)  ld bits  st bits")
for key in sorted(rows, key=lambda k: (rows[k]["src"], pretty[k[0]], k[1])):
    r = rows[key]
    w = ptx.get(key, {"ld": set(), "st": set()})
    ld = max(w["ld"], default=0)
    st = max(w["st"], default=0)
    flag = ""
    if r["sst"] or r["sld"]:
        flag += "  SPILL"
        failures.append(f"{pretty[key[0]]} ({key[1]}): spills {r['sst']} / {r['sld']} bytes")
    if vec_re.search(pretty[key[0]]):
        if key not in ptx:
            failures.append(f"{pretty[key[0]]} ({key[1]}): no PTX found to check its access width")
        elif ld < 128 or st < 128:
            flag += "  NOT 128-BIT"
            failures.append(f"{pretty[key[0]]} ({key[1]}): widest global load {ld} bits, store "
                            f"{st} bits; a vectorised kernel needs 128-bit loads and stores")
    print(f"  {pretty[key[0]]:<{width}}  {key[1]}  {r['regs']:4d}  {r['sst']:7d} / {r['sld']:<7d}"
          f"  {r['stack']:9d}  {ld:7d}  {st:7d}{flag}")
print()
if failures:
    print("check_cuda: code-generation check FAILED:", file=sys.stderr)
    for f in failures:
        print("  " + f, file=sys.stderr)
    sys.exit(1)
print(f"check_cuda: {len(rows)} kernel builds, no spills; 128-bit loads and stores in the "
      f"vectorised kernels ({os.environ['VEC_KERNELS']})")
PYEOF
then
  echo "check_cuda: FAILED" >&2
  exit 1
fi
