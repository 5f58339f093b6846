"""The CUDA sources (csrc/cuda): static checks that need no GPU and no nvcc, a host test of the
index and launch arithmetic (csrc/cuda/index_math.h, compiled with g++ where it exists), tests of
.ci/check_cuda.sh's code-generation checks against a stand-in nvcc. The CUDA kernels run against
torch on a GPU in ``tests/test_gpu.py``.

The nvcc compile check itself is separate (``bash .ci/check_cuda.sh``, minutes).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CUDA_DIR = os.path.join(CSRC, "cuda")
INCLUDE_DIR = os.path.join(CSRC, "include", "fusedloss")
CHECK_SCRIPT = os.path.join(ROOT, ".ci", "check_cuda.sh")
# Shared CUDA infrastructure: every .cu takes these from here instead of declaring its own.
COMMON = os.path.join(CUDA_DIR, "common.cuh")
SKELETON = os.path.join(CUDA_DIR, "softmax_rows.cuh")
INDEX_MATH = os.path.join(CUDA_DIR, "index_math.h")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _strip_comments(src: str) -> str:
    """C++ source without // and /* */ comments (string literals kept)."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append(src[i:j + 1])
            i = j + 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _cu_files() -> list[str]:
    return sorted(os.path.join(CUDA_DIR, f) for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))


def _cuda_headers() -> list[str]:
    return sorted(os.path.join(CUDA_DIR, f) for f in os.listdir(CUDA_DIR)
                  if f.endswith((".cuh", ".h")))


def _schemas() -> dict[str, str]:
    """Op name -> schema string for every m.def in csrc/registration.cpp."""
    src = _strip_comments(_read(os.path.join(CSRC, "registration.cpp")))
    out = {}
    for m in re.finditer(r"\bm\.def\s*\(((?:\s*\"(?:[^\"\\]|\\.)*\")+)", src):
        schema = "".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", m.group(1)))
        out[schema.split("(", 1)[0].strip()] = schema
    return out


def _impl_blocks(src: str, namespace: str, key: str) -> list[str]:
    """Bodies of every TORCH_LIBRARY_IMPL(namespace, key, m) { ... } in src (comments stripped)."""
    bodies = []
    pat = re.compile(r"TORCH_LIBRARY_IMPL\s*\(\s*%s\s*,\s*%s\s*,\s*\w+\s*\)\s*\{"
                     % (namespace, key))
    for m in pat.finditer(src):
        depth, i = 1, m.end()
        while i < len(src) and depth:
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            i += 1
        bodies.append(src[m.end():i - 1])
    return bodies


def _cuda_impls() -> dict[str, list[str]]:
    """Op name -> the .cu files registering a CUDA kernel for it."""
    out: dict[str, list[str]] = {}
    for path in _cu_files():
        src = _strip_comments(_read(path))
        for body in _impl_blocks(src, "fusedloss_C", "CUDA"):
            for name in re.findall(r"\bm\.impl\s*\(\s*\"([^\"]+)\"", body):
                out.setdefault(name, []).append(os.path.basename(path))
    return out


def _generic_impls() -> set[str]:
    """Ops with a device-generic kernel (csrc/autograd: composed of the device kernels, so CUDA
    tensors are covered without a .cu of their own)."""
    out = set()
    for path in glob.glob(os.path.join(CSRC, "autograd", "*.cpp")):
        src = _strip_comments(_read(path))
        for body in _impl_blocks(src, "fusedloss_C", "CompositeExplicitAutograd"):
            out.update(re.findall(r"\bm\.impl\s*\(\s*\"([^\"]+)\"", body))
    return out


# ------------------------------------------------------------------------------------------------
# Static checks


def test_cuda_sources_exist():
    for name in ("cross_entropy.cu", "scale_grad.cu", "common.cuh", "softmax_rows.cuh",
                 "index_math.h"):
        assert os.path.isfile(os.path.join(CUDA_DIR, name)), name


@pytest.mark.parametrize("path", _cu_files(), ids=os.path.basename)
def test_cu_includes_its_shared_header(path):
    """csrc/cuda/<loss>.cu includes csrc/include/fusedloss/<loss>.h when that header exists."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if not os.path.isfile(os.path.join(INCLUDE_DIR, stem + ".h")):
        pytest.skip(f"no shared header fusedloss/{stem}.h")
    src = _strip_comments(_read(path))
    assert re.search(r'#\s*include\s*[<"]fusedloss/%s\.h[>"]' % re.escape(stem), src), (
        f"{os.path.basename(path)} must include fusedloss/{stem}.h")


# The shared per-row math the CUDA cross-entropy kernel must take from the header (the CPU tests
# then cover the same formulas).
CE_HEADER_FUNCTIONS = [
    "OnlineLSE", "softcap_fwd", "softcap_grad", "index_row", "index_grad", "index_grad_target",
    "prob_row", "prob_grad", "smoothed_prob",
]


def test_cross_entropy_cu_uses_header_math():
    header = _strip_comments(_read(os.path.join(INCLUDE_DIR, "cross_entropy.h")))
    src = _strip_comments(_read(os.path.join(CUDA_DIR, "cross_entropy.cu")))
    for name in CE_HEADER_FUNCTIONS:
        # name or its accurate variant name_diff (lse - xs_y passed in as (m - xs_y) + log(s)).
        pat = r"\b%s(_diff)?\b" % name
        assert re.search(pat, header), f"cross_entropy.h no longer defines {name}"
        assert re.search(r"\bce::" + pat, src), f"cross_entropy.cu does not use ce::{name}"
    # The partial states of threads, warps and blocks are combined with the header's merge (in the
    # skeleton, which cross-entropy uses), and the row's lse is the header's.
    skeleton = _strip_comments(_read(SKELETON))
    assert re.search(r"\blse\.merge\s*\(", skeleton) and re.search(r"\bce::OnlineLSE\b", skeleton)
    assert re.search(r"\blse\s*\(\s*\)", src)
    # Cross-entropy is a policy of the skeleton, not a kernel of its own.
    assert re.search(r'#\s*include\s*"softmax_rows\.cuh"', src)
    assert re.search(r"\blaunch_softmax_rows\s*\(", src)
    assert "__global__" not in src, "cross_entropy.cu: kernels belong in the skeleton"
    # No private copy of the formulas: the header's accurate target-column gradient (expm1).
    assert "expm1" not in src, "use ce::index_grad_target for the target column"


def test_every_schema_has_a_cuda_kernel():
    schemas = _schemas()
    impls = _cuda_impls()
    assert {"cross_entropy_fwd", "cross_entropy_fwd_inplace", "scale_grad_"} <= set(schemas)
    generic = _generic_impls()
    assert {"cross_entropy_loss", "cross_entropy_loss_inplace"} <= generic
    missing = sorted(set(schemas) - set(impls) - generic)
    assert not missing, f"schemas in registration.cpp without a CUDA kernel in csrc/cuda: {missing}"
    both = sorted(set(impls) & generic)
    assert not both, f"ops with a CUDA kernel and a device-generic one: {both}"
    unknown = sorted(set(impls) - set(schemas))
    assert not unknown, f"CUDA kernels registered for ops with no schema: {unknown}"
    dup = {k: v for k, v in impls.items() if len(v) > 1}
    assert not dup, f"ops registered twice for CUDA: {dup}"


@pytest.mark.parametrize("path", _cu_files() + _cuda_headers(), ids=os.path.basename)
def test_cu_source_rules(path):
    src = _strip_comments(_read(path))
    name = os.path.basename(path)
    # The local CUDA toolkit has no cusparse.h, which ATen/cuda/CUDAContext.h pulls in.
    assert "ATen/cuda/CUDAContext.h" not in src, name
    # No host syncs.
    assert not re.search(r"\.item\s*(<[^>]*>)?\s*\(", src), f"{name}: .item() is a host sync"
    assert "cudaDeviceSynchronize" not in src and "cudaStreamSynchronize" not in src, name
    # Accurate math only.
    assert not re.search(r"\b__(expf|logf|fdividef|tanhf|powf)\b", src), f"{name}: fast intrinsic"
    assert "use_fast_math" not in src, name
    # Launches on the current stream, under a device guard, each checked.
    launches = [m.start() for m in re.finditer(r"<<<", src)]
    if launches:
        assert "getCurrentCUDAStream" in src, name
        if name.endswith(".cu"):
            assert "CUDAGuard" in src, name
        else:
            # A header's launcher runs under its caller's guard and says so.
            assert "CUDAGuard" in _read(path), f"{name}: document the caller's CUDAGuard"
        for pos in launches:
            launch = src[pos:src.find(">>>", pos)]
            assert "stream" in launch, f"{name}: a kernel launch without the current stream"
        checks = [m.start() for m in re.finditer(r"C10_CUDA_KERNEL_LAUNCH_CHECK\s*\(\s*\)", src)]
        assert checks and max(checks) > max(launches), f"{name}: unchecked kernel launch"
    assert "TORCH_LIBRARY(" not in src.replace("TORCH_LIBRARY_IMPL(", ""), (
        f"{name}: schemas belong in registration.cpp")


def test_cross_entropy_cu_checks_targets_on_device():
    src = _strip_comments(_read(os.path.join(CUDA_DIR, "cross_entropy.cu")))
    assert "CUDA_KERNEL_ASSERT" in src
    assert "ignore_index" in src
    assert "AT_DISPATCH_FLOATING_TYPES_AND2" in src and "kBFloat16" in src and "kHalf" in src


def test_check_script_syntax():
    assert os.path.isfile(CHECK_SCRIPT)
    r = subprocess.run(["bash", "-n", CHECK_SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_check_script_skips_without_nvcc():
    env = {**os.environ, "FUSEDLOSS_NVCC": os.path.join(ROOT, "no", "such", "nvcc")}
    r = subprocess.run(["bash", CHECK_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "nvcc not found: CUDA compile check skipped" in r.stdout


@pytest.mark.parametrize("path", _cu_files(), ids=os.path.basename)
def test_every_cu_registers_its_ops(path):
    """Each .cu registers the CUDA kernels of its ops in one TORCH_LIBRARY_IMPL block of its own."""
    src = _strip_comments(_read(path))
    name = os.path.basename(path)
    blocks = _impl_blocks(src, "fusedloss_C", "CUDA")
    assert len(blocks) == 1, f"{name}: {len(blocks)} TORCH_LIBRARY_IMPL(fusedloss_C, CUDA) blocks"
    ops = re.findall(r"\bm\.impl\s*\(\s*\"([^\"]+)\"", blocks[0])
    assert ops, f"{name} registers no op"
    # A registered function is defined in this file (not borrowed from another translation unit).
    for fn in re.findall(r"\bm\.impl\s*\(\s*\"[^\"]+\"\s*,\s*&?([\w:]+)", blocks[0]):
        short = fn.split("::")[-1]
        assert re.search(r"\b%s\s*\([^;{]*\)\s*\{" % re.escape(short), src), (
            f"{name}: {fn} is registered but not defined here")


def test_scale_grad_is_loss_agnostic():
    """scale_grad_ lives in scale_grad.cu, which knows nothing about any loss."""
    assert _cuda_impls().get("scale_grad_") == ["scale_grad.cu"]
    src = _strip_comments(_read(os.path.join(CUDA_DIR, "scale_grad.cu")))
    assert "cross_entropy" not in src and "fusedloss/" not in src
    # The scalar-1 skip is decided on the device (read *s in the kernel), never on the host.
    assert re.search(r"if\s*\(\s*s\s*==\s*acc_t\s*\(\s*1\s*\)\s*\)\s*return", src)
    # Zero stays zero.
    assert re.search(r"v\s*==\s*acc_t\s*\(\s*0\s*\)\s*\?\s*acc_t\s*\(\s*0\s*\)", src)
    # Capped grids: every launch of the file goes through capped_grid / grid_1d.
    assert re.search(r"\bcapped_grid\s*\(", src)
    for m in re.finditer(r"<<<([^,]+),", src):
        assert "grid_1d" in m.group(1), f"launch without grid_1d: {m.group(0)}"


# Helpers common.cuh / index_math.h provide: a .cu that declares one of these copies them.
COMMON_HELPERS = ["AlignedVec", "ceil_div", "next_pow2", "prev_pow2", "sm_count", "acc_dtype",
                  "split_row", "row_split", "head_elems", "same_alignment", "warp_allreduce",
                  "block_allreduce", "column_allreduce", "capped_grid", "check_ncd_input",
                  "load_vec", "store_vec", "lse_update_chunk", "pipelined_vecs"]


@pytest.mark.parametrize("path", _cu_files() + [SKELETON], ids=os.path.basename)
def test_common_helpers_are_not_redeclared(path):
    src = _strip_comments(_read(path))
    name = os.path.basename(path)
    assert re.search(r'#\s*include\s*"common\.cuh"', src), f"{name} must include common.cuh"
    own = {"softmax_rows.cuh": {"lse_update_chunk"}}.get(name, set())
    for helper in COMMON_HELPERS:
        if helper in own:
            continue
        # A definition: "struct X", or "X(...) {" preceded by a return type.
        assert not re.search(r"\b(struct|class)\s+%s\b" % helper, src), f"{name} declares {helper}"
        assert not re.search(r"\b[\w:<>]+\s+%s\s*\([^;{]*\)\s*(const\s*)?\{" % helper, src), (
            f"{name} defines its own {helper}; use common.cuh")
    # Raw shuffles, SM queries and grid limits belong in common.cuh / index_math.h.
    if path != SKELETON:
        assert "__shfl" not in src, f"{name}: use warp_allreduce / warp_sum from common.cuh"
    assert "cudaDevAttrMultiProcessorCount" not in src, f"{name}: use sm_count"
    assert "numeric_limits<int32_t>::max" not in src, f"{name}: use kMaxGridX / capped_grid"


def test_common_cuh_provides_the_helpers():
    src = _strip_comments(_read(COMMON)) + _strip_comments(_read(INDEX_MATH))
    for helper in COMMON_HELPERS:
        if helper in ("lse_update_chunk", "head_elems"):
            continue
        assert re.search(r"\b%s\b" % helper, src), f"common.cuh / index_math.h lack {helper}"
    # index_math.h is plain C++ (the host test compiles it with g++).
    im = _strip_comments(_read(INDEX_MATH))
    assert not re.search(r"__(device|host|global)__|#\s*include\s*<(cuda|c10|ATen)", im)


def _policy_calls() -> set[str]:
    return set(re.findall(r"\bpol(?:_in)?\.(\w+)\s*\(", _strip_comments(_read(SKELETON))))


def test_softmax_skeleton_policy_interface():
    """The policy methods the skeleton calls are the documented ones, and the CE policy has them."""
    calls = _policy_calls()
    documented = {"prepare", "logit", "row", "extra_sums", "accumulate", "epilogue", "store_row",
                  "zero_grad", "grad"}
    optional = {"row_loss"}  # policies with kRowLoss (the reduced output)
    assert calls == documented | optional, \
        f"skeleton calls {sorted(calls)}; documented {sorted(documented | optional)}"
    doc = _read(SKELETON)
    for name in documented | optional | {"rebase", "combine", "Extra", "Row", "Coef", "kAux",
                                         "kRowLoss"}:
        assert re.search(r"//.*\b%s\b" % name, doc), f"softmax_rows.cuh does not document {name}"
    ce_src = _strip_comments(_read(os.path.join(CUDA_DIR, "cross_entropy.cu")))
    policy = ce_src[ce_src.index("struct CEPolicy"):]
    for name in documented:
        assert re.search(r"\b%s\s*\(" % name, policy), f"CEPolicy lacks {name}"
    for name in ("rebase", "combine"):
        assert re.search(r"\b%s\s*\(" % name, ce_src), f"CESums lacks {name}"


LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\s*\(\s*([^,()]+(?:\([^()]*\))?)\s*"
                           r"(?:,\s*([^()]+(?:\([^()]*\))?)\s*)?\)")


def test_launch_bounds_min_blocks_are_budgeted():
    """A min-blocks bound caps registers; .ci/check_cuda.sh fails when it makes a kernel spill.
    Here: every bound names its thread count, and a min-blocks bound is one of the skeleton's
    budget functions, which say what they cap (not a bare number such as the (256, 4) that
    spilled)."""
    for path in _cu_files() + _cuda_headers():
        src = _strip_comments(_read(path))
        for m in LAUNCH_BOUNDS.finditer(src):
            threads, min_blocks = m.group(1).strip(), m.group(2)
            assert re.fullmatch(r"k\w+", threads), f"{os.path.basename(path)}: {m.group(0)}"
            if min_blocks is not None:
                assert re.fullmatch(r"rows_(warp|block)_min_blocks\s*<\s*P\s*>\s*\(\s*\)",
                                    min_blocks.strip()), (
                    f"{os.path.basename(path)}: min-blocks {min_blocks!r}; use a budget function")
    skel = _read(SKELETON)
    assert re.search(r"//.*80 registers", skel) and re.search(r"//.*64 registers", skel)


# ------------------------------------------------------------------------------------------------
# Host test of csrc/cuda/index_math.h (g++, where it exists) against brute force

INDEX_MATH_TEST = r"""
#include <cstdint>
#include <cstdio>
#include "index_math.h"
using namespace fusedloss::cuda;
static int fails = 0;
#define CHECK(cond, ...)                                                  \
  do {                                                                    \
    if (!(cond)) {                                                        \
      if (fails++ < 20) {                                                 \
        std::printf("FAIL line %d: %s: ", __LINE__, #cond);               \
        std::printf(__VA_ARGS__);                                         \
        std::printf("\n");                                                \
      }                                                                   \
    }                                                                     \
  } while (0)

static bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

int main() {
  for (int64_t a = 0; a < 3000; ++a)
    for (int64_t b = 1; b < 70; ++b)
      CHECK(ceil_div(a, b) == (a + b - 1) / b, "a=%lld b=%lld", (long long)a, (long long)b);
  CHECK(ceil_div(INT64_MAX, 1) == INT64_MAX, "max");
  CHECK(ceil_div(INT64_MAX, 2) == INT64_MAX / 2 + 1, "max/2");
  for (int64_t v = 0; v < 70000; v += (v < 5000 ? 1 : 997)) {
    const int64_t n = next_pow2(v), p = prev_pow2(v);
    CHECK(is_pow2(n) && n >= v && (n == 1 || n / 2 < v), "next_pow2(%lld)=%lld", (long long)v,
          (long long)n);
    CHECK(is_pow2(p) && (v < 1 ? p == 1 : (p <= v && 2 * p > v)), "prev_pow2(%lld)=%lld",
          (long long)v, (long long)p);
  }

  // split_row against the aligned 16-byte windows inside the row, byte by byte.
  const int64_t elems[] = {1, 2, 4, 8};
  const uint64_t bases[] = {0, uint64_t(1) << 40};
  for (int64_t e : elems)
    for (uint64_t base : bases)
      for (uint64_t off = 0; off < 48; ++off)
        for (int64_t n = 0; n <= 70; ++n) {
          const uint64_t addr = base + off;
          const RowSplit s = split_row(addr, n, e);
          const int64_t V = 16 / e;
          if (addr % e != 0) {
            CHECK(s.nvec == 0 && s.head + s.nvec * V == s.tail && s.tail <= n,
                  "misaligned e=%lld off=%llu n=%lld", (long long)e, (unsigned long long)off,
                  (long long)n);
            continue;
          }
          int64_t windows = 0, first = -1;
          for (uint64_t w = (addr + 15) / 16 * 16; w + 16 <= addr + uint64_t(n * e); w += 16) {
            if (first < 0) first = int64_t(w - addr) / e;
            ++windows;
          }
          CHECK(s.nvec == windows, "e=%lld off=%llu n=%lld nvec=%lld want %lld", (long long)e,
                (unsigned long long)off, (long long)n, (long long)s.nvec, (long long)windows);
          CHECK(s.tail == s.head + s.nvec * V && 0 <= s.head && s.tail <= n,
                "bounds e=%lld off=%llu n=%lld", (long long)e, (unsigned long long)off,
                (long long)n);
          if (windows > 0) {
            CHECK(s.head == first && (addr + uint64_t(s.head * e)) % 16 == 0,
                  "head e=%lld off=%llu n=%lld", (long long)e, (unsigned long long)off,
                  (long long)n);
          }
          CHECK(s.head < V || s.head == n || V == 1, "head too long");
          CHECK(n - s.tail < V || windows == 0, "tail too long");
          CHECK(same_alignment(addr, addr + 16 * uint64_t(n)) && !same_alignment(addr, addr + 8),
                "same_alignment");
        }

  // capped_grid: within CUDA's limit for any size, exact when it fits, 0 only for no work.
  const int64_t works[] = {0, 1, 255, 256, 257, 100000, (int64_t(1) << 31) - 1,
                           int64_t(1) << 31, int64_t(1) << 33, (int64_t(1) << 34) + 7,
                           int64_t(1) << 40, INT64_MAX / 2};
  const int64_t pers[] = {1, 8, 256, 1024};
  const int64_t caps[] = {0, 1, 132 * 8, int64_t(1) << 40};
  for (int64_t w : works)
    for (int64_t per : pers)
      for (int64_t cap : caps) {
        const int64_t g = capped_grid(w, per, cap);
        if (w == 0) { CHECK(g == 0, "no work"); continue; }
        int64_t want = ceil_div(w, per);
        if (cap > 0 && want > cap) want = cap;
        if (want > kMaxGridX) want = kMaxGridX;
        CHECK(g == want && g >= 1 && g <= kMaxGridX, "w=%lld per=%lld cap=%lld g=%lld",
              (long long)w, (long long)per, (long long)cap, (long long)g);
      }

  // plan_softmax_rows: the kernel, block shape and grid for rows x C.
  const int64_t rowss[] = {1, 2, 7, 8, 9, 8191, 8192, 8193, 1 << 20, (int64_t(1) << 31) - 1,
                           (int64_t(1) << 31) + 5, int64_t(1) << 34, int64_t(1) << 40};
  const int64_t Cs[] = {1, 2, 5, 15, 16, 31, 32, 33, 100, 255, 256, 257, 1000, 1024, 2047, 2048,
                        2049, 4099, 32000, 50257, 128256, 256000, int64_t(1) << 24};
  const int64_t vecs[] = {2, 4, 8};
  for (int64_t rows : rowss)
    for (int64_t C : Cs)
      for (int64_t vec : vecs)
        for (int cc = 0; cc < 2; ++cc)
          for (int gs = 0; gs < 2; ++gs) {
            const RowsLaunch l = plan_softmax_rows(rows, C, vec, cc != 0, gs != 0);
            CHECK(l.grid >= 1 && l.grid <= kMaxGridX, "grid %lld", (long long)l.grid);
            const bool contiguous = cc && C >= 32 && (!gs || C > 256);
            if (!contiguous) {
              CHECK(l.kind == RowsKernel::Strided, "rows=%lld C=%lld", (long long)rows,
                    (long long)C);
              CHECK(l.tx * l.ty == kRowsStridedThreads && is_pow2(l.ty) && l.ty <= 16, "shape");
              CHECK(l.ty <= (C / 16 > 1 ? C / 16 : 1) && l.ty <= (rows <= 8192 ? 16 : 8), "ty");
              int64_t want = ceil_div(rows, l.tx);
              CHECK(l.grid == (want > kMaxGridX ? kMaxGridX : want), "strided grid");
            } else if (ceil_div(C, vec) <= 8 * 32) {
              CHECK(l.kind == RowsKernel::Warp && l.tx == kRowsWarpThreads && l.ty == 1,
                    "warp shape");
              int64_t want = ceil_div(rows, kRowsWarpThreads / 32);
              CHECK(l.grid == (want > kMaxGridX ? kMaxGridX : want), "warp grid");
            } else {
              CHECK(l.kind == RowsKernel::Block && is_pow2(l.tx) && l.tx >= 128 &&
                    l.tx <= kRowsBlockMaxThreads && l.ty == 1, "block shape C=%lld", (long long)C);
              // about 8 vectors a thread until the block is full
              CHECK(l.tx == kRowsBlockMaxThreads || ceil_div(ceil_div(C, vec), l.tx) <= 8,
                    "block size");
              CHECK(l.grid == (rows > kMaxGridX ? kMaxGridX : rows), "block grid");
            }
          }
  if (fails) {
    std::printf("%d failures\n", fails);
    return 1;
  }
  std::printf("index_math OK\n");
  return 0;
}
"""


def test_index_math_host(tmp_path):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++")
    src = tmp_path / "index_math_test.cpp"
    src.write_text(INDEX_MATH_TEST)
    exe = tmp_path / "index_math_test"
    r = subprocess.run([gxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", CUDA_DIR, "-I",
                        os.path.join(CSRC, "include"), str(src), "-o", str(exe)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "index_math OK" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------
# .ci/check_cuda.sh's code-generation checks, run against a stand-in nvcc that writes the ptxas
# -v lines and the PTX a real compile would (one vectorised kernel and one scalar kernel).

FAKE_NVCC = r'''#!{python}
import os, sys
args = sys.argv[1:]
if "--version" in args:
    print("Cuda compilation tools, release 0.0 (stand-in)")
    sys.exit(0)
mode = os.environ.get("FAKE_NVCC_MODE", "clean")
obj = args[args.index("-o") + 1]
keep = args[args.index("--keep-dir") + 1]
src = [a for a in args if a.endswith(".cu")][0]
stem = os.path.splitext(os.path.basename(src))[0]
open(obj, "w").close()
kernels = {{"_Z24softmax_rows_warp_kernelv": True, "_Z13scalar_kernelv": False}}
for arch in ("80", "90"):
    ptx = []
    for name, vec in kernels.items():
        spill = 8 if (mode == "spill" and vec and arch == "90") else 0
        print(f"ptxas info    : Compiling entry function '{{name}}' for 'sm_{{arch}}'")
        print(f"ptxas info    : Function properties for {{name}}")
        print(f"    {{spill}} bytes stack frame, {{spill}} bytes spill stores, "
              f"{{spill}} bytes spill loads")
        print(f"ptxas info    : Used 40 registers, used 0 barriers, 400 bytes cmem[0]")
        ptx.append(f".visible .entry {{name}}(")
        ptx.append("{{")
        if vec:
            ptx.append("\tld.global.v4.u32 \t{{%r1, %r2, %r3, %r4}}, [%rd1];")
            if mode == "narrow":
                ptx.append("\tst.global.v2.u16 \t[%rd2], {{%rs1, %rs2}};")
            else:
                ptx.append("\tst.global.v4.b32 [ga], {{%r1, %r2, %r3, %r4}};")
        else:
            ptx.append("\tld.global.u16 \t%rs1, [%rd1];")
            ptx.append("\tst.global.f32 \t[%rd2], %f1;")
        ptx.append("}}")
    with open(os.path.join(keep, f"{{stem}}.compute_{{arch}}.ptx"), "w") as f:
        f.write("\n".join(ptx) + "\n")
'''


def _run_check_with_fake_nvcc(tmp_path, mode):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(FAKE_NVCC.format(python=sys.executable))
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "FUSEDLOSS_NVCC": str(nvcc), "FAKE_NVCC_MODE": mode,
           "PYTHON": sys.executable}
    return subprocess.run(["bash", CHECK_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_check_script_table_passes_clean_code(tmp_path):
    r = _run_check_with_fake_nvcc(tmp_path, "clean")
    assert r.returncode == 0, r.stdout + r.stderr
    table = [ln for ln in r.stdout.splitlines() if "softmax_rows_warp_kernel" in ln]
    assert len(table) == 2 and "sm_80" in table[0] and "sm_90" in table[1], r.stdout
    assert re.search(r"\b40\s+0 / 0\s+0\s+128\s+128\b", table[0]), table[0]
    assert "no spills" in r.stdout


def test_check_script_fails_on_a_spill(tmp_path):
    r = _run_check_with_fake_nvcc(tmp_path, "spill")
    assert r.returncode != 0, r.stdout
    assert "SPILL" in r.stdout and "spills 8 / 8 bytes" in r.stderr, r.stdout + r.stderr


def test_check_script_fails_on_split_vector_stores(tmp_path):
    r = _run_check_with_fake_nvcc(tmp_path, "narrow")
    assert r.returncode != 0, r.stdout
    assert "NOT 128-BIT" in r.stdout and "store 32 bits" in r.stderr, r.stdout + r.stderr
    # The scalar kernel is not held to the vector rule.
    assert "scalar_kernel" not in r.stderr
