"""The CUDA sources (csrc/cuda): static checks that need no GPU and no nvcc, a host test of the
index and launch arithmetic (csrc/cuda/index_math.h, compiled with g++ where it exists), tests of
.ci/check_cuda.sh's code-generation checks against a stand-in nvcc, and (marked ``gpu``, skipped
without a CUDA device and a CUDA build of fusedloss._C) the CUDA kernels against
torch.nn.functional.cross_entropy.

The nvcc compile check itself is separate (``bash .ci/check_cuda.sh``, minutes).
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("path", _cu_files(), ids=os.path.basename)
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
        assert "CUDAGuard" in src, name
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


# ------------------------------------------------------------------------------------------------
# GPU: the kernels against torch (skipped without a CUDA device and a CUDA build of fusedloss._C)


@pytest.fixture(scope="module")
def ops():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        importlib.import_module("fusedloss._C")
    except ImportError as e:
        pytest.skip(f"fusedloss._C not importable: {e}")
    for op in ("cross_entropy_fwd", "cross_entropy_fwd_inplace", "scale_grad_"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss_C::{op}", "CUDA"):
            pytest.skip("fusedloss._C was built without CUDA kernels")
    return torch.ops.fusedloss_C


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ACC = {torch.float32: torch.float32, torch.float16: torch.float32, torch.bfloat16: torch.float32,
       torch.float64: torch.float64}
# (rtol, atol) of the per-row loss / lse (accumulation dtype) and of the gradient (input dtype).
LOSS_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4),
            torch.float16: (1e-4, 1e-4), torch.bfloat16: (1e-4, 1e-4)}
GRAD_TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (1e-4, 1e-6),
            torch.float16: (2e-3, 1e-6), torch.bfloat16: (1.6e-2, 1e-6)}


def expected(x, t, weight=None, grad_scale=None, ignore_index=-100, ls=0.0, z=0.0, softcap=0.0):
    """Per-row loss, lse and d(sum of loss)/dx in float64, from F.cross_entropy."""
    x64 = x.detach().double().requires_grad_(True)
    xs = softcap * torch.tanh(x64 / softcap) if softcap > 0 else x64
    w = None if weight is None else weight.double()
    lse = torch.logsumexp(xs, dim=1)
    if t.is_floating_point():
        loss = F.cross_entropy(xs, t.double(), weight=w, reduction="none", label_smoothing=ls)
        loss = loss + z * lse**2
    else:
        loss = F.cross_entropy(xs, t, weight=w, ignore_index=ignore_index, reduction="none",
                               label_smoothing=ls)
        keep = t != ignore_index
        wy = torch.ones_like(lse) if w is None else w[t.clamp(0, x.shape[1] - 1)]
        loss = loss + torch.where(keep, z * wy * lse**2, torch.zeros_like(lse))
    if grad_scale is not None:
        loss = loss * grad_scale.double()
    (g,) = torch.autograd.grad(loss.sum(), x64)
    return loss.detach(), lse.detach(), g


def compare(dtype, got, want, grad=True):
    loss, lse, g = got
    e_loss, e_lse, e_g = want
    rt, at = LOSS_TOL[dtype]
    assert loss.dtype == ACC[dtype] and lse.dtype == ACC[dtype]
    torch.testing.assert_close(loss.double(), e_loss, rtol=rt, atol=at, equal_nan=True)
    torch.testing.assert_close(lse.double(), e_lse, rtol=rt, atol=at, equal_nan=True)
    if grad:
        rt, at = GRAD_TOL[dtype]
        assert g.dtype == dtype and g.shape == e_g.shape
        torch.testing.assert_close(g.double(), e_g.to(dtype).double(), rtol=rt, atol=at,
                                   equal_nan=True)


def logits(shape, dtype, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64, device="cuda") * scale).to(dtype)


def class_targets(n, d, c, ignore_frac=0.1, ignore_index=-100):
    t = torch.randint(0, c, (n, d), device="cuda")
    t[torch.rand(n, d, device="cuda") < ignore_frac] = ignore_index
    return t


# (N, C, D): tiny C (strided kernel), warp per row, block per row, odd vocabulary, segmentation.
SHAPES = [(33, 5, 1), (64, 100, 1), (16, 1000, 1), (8, 4099, 1), (4, 50257, 1), (3, 19, 37),
          (2, 150, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gpu_class_index_matches_torch(ops, shape, dtype):
    torch.manual_seed(0)
    n, c, d = shape
    x = logits(shape, dtype)
    t = class_targets(n, d, c)
    got = ops.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True)
    compare(dtype, got, expected(x, t))
    loss, lse, g = ops.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, False)
    assert g.shape == (0,)
    compare(dtype, (loss, lse, None), expected(x, t), grad=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(40, 7, 1), (32, 300, 1), (4, 5000, 1), (2, 21, 50)], ids=str)
@pytest.mark.parametrize("opts", [
    dict(weight=True), dict(ls=0.1), dict(weight=True, ls=0.2), dict(z=1e-3),
    dict(softcap=5.0), dict(weight=True, ls=0.1, z=1e-2, softcap=10.0, scale=0.37),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_gpu_options_match_torch(ops, shape, dtype, opts):
    torch.manual_seed(1)
    n, c, d = shape
    x = logits(shape, dtype)
    t = class_targets(n, d, c, ignore_frac=0.2, ignore_index=3)
    w = torch.rand(c, device="cuda", dtype=ACC[dtype]) + 0.5 if opts.get("weight") else None
    gs = torch.tensor(opts["scale"], device="cuda", dtype=ACC[dtype]) if "scale" in opts else None
    ls, z, sc = opts.get("ls", 0.0), opts.get("z", 0.0), opts.get("softcap", 0.0)
    got = ops.cross_entropy_fwd(x, t, w, gs, 3, ls, z, sc, True)
    compare(dtype, got, expected(x, t, w, gs, 3, ls, z, sc))


def _layouts(n, c, d, dtype):
    """Views of one (N, C, D) logit tensor with different strides."""
    base = logits((n, c, d), dtype)
    yield "contiguous", base
    yield "class-stride-1 (channels last)", logits((n, d, c), dtype).transpose(1, 2)
    if d == 1:
        yield "transposed (row stride 1)", logits((c, n), dtype).t().unsqueeze(2)
        yield "misaligned rows", logits((n, c + 3), dtype)[:, 1:c + 1].unsqueeze(2)
        yield "every other class", logits((n, 2 * c), dtype)[:, ::2].unsqueeze(2)
    yield "batch-strided", logits((2 * n, c, d), dtype)[::2]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(9, 19, 1), (9, 300, 1), (5, 2053, 1), (3, 19, 10),
                                   (2, 300, 7)], ids=str)
def test_gpu_strides_and_inplace(ops, shape, dtype):
    torch.manual_seed(2)
    n, c, d = shape
    for name, x in _layouts(n, c, d, dtype):
        t = class_targets(n, d, c)
        want = expected(x, t, ls=0.05)
        got = ops.cross_entropy_fwd(x, t, None, None, -100, 0.05, 0.0, 0.0, True)
        assert got[2].is_contiguous()
        compare(dtype, got, want)
        # In place through the view's own strides; the memory around the view is untouched.
        y = x.clone() if x.is_contiguous() else x
        storage_before = None
        if not x.is_contiguous():
            base = x._base if x._base is not None else x
            storage_before = base.clone()
        loss, lse = ops.cross_entropy_fwd_inplace(y, t, None, None, -100, 0.05, 0.0, 0.0)
        compare(dtype, (loss, lse, y), want)
        if storage_before is not None:
            base = x._base
            mask = torch.ones_like(base, dtype=torch.bool)
            mask.as_strided(x.shape, x.stride(), x.storage_offset() - base.storage_offset()).fill_(
                False)
            assert torch.equal(base[mask], storage_before[mask]), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(17, 10, 1), (16, 700, 1), (4, 9000, 1), (3, 12, 20)], ids=str)
def test_gpu_probability_targets(ops, shape, dtype):
    torch.manual_seed(3)
    n, c, d = shape
    x = logits(shape, dtype)
    t = torch.softmax(torch.randn(shape, device="cuda", dtype=torch.float64), dim=1).to(dtype)
    w = torch.rand(c, device="cuda", dtype=ACC[dtype]) + 0.5
    for weight, ls, z, sc in [(None, 0.0, 0.0, 0.0), (w, 0.1, 1e-3, 8.0)]:
        got = ops.cross_entropy_fwd(x, t, weight, None, -100, ls, z, sc, True)
        compare(dtype, got, expected(x, t, weight, None, -100, ls, z, sc))
        # A target with other strides than the input.
        t2 = t.transpose(0, 2).contiguous().transpose(0, 2)
        got = ops.cross_entropy_fwd(x, t2, weight, None, -100, ls, z, sc, True)
        compare(dtype, got, expected(x, t, weight, None, -100, ls, z, sc))


@pytest.mark.gpu
def test_gpu_ignored_rows_and_all_ignored_mean(ops):
    x = logits((6, 50, 1), torch.float32)
    t = torch.full((6, 1), -100, device="cuda")
    gs = torch.tensor(float("inf"), device="cuda")  # 'mean' over zero rows: 1 / 0
    loss, lse, g = ops.cross_entropy_fwd(x, t, None, gs, -100, 0.1, 1e-3, 0.0, True)
    assert torch.isnan(loss).all()
    torch.testing.assert_close(lse, torch.logsumexp(x.double(), 1).float())
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.gpu
@pytest.mark.parametrize("c", [10, 1000, 50257])
def test_gpu_large_logits_keep_digits(ops, c):
    """Logits near 1000: lse - x_y is formed as (max - x_y) + log(sum), not from the rounded lse
    (float32 spacing at 1000 is 6e-5)."""
    x = logits((8, c, 1), torch.float32) + 1000.0
    t = class_targets(8, 1, c, ignore_frac=0.0)
    loss, lse, g = ops.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True)
    e_loss, e_lse, e_g = expected(x, t)
    torch.testing.assert_close(loss.double(), e_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(g.double(), e_g.float().double(), rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("c", [10, 100, 5000])
def test_gpu_nan_propagates(ops, c):
    x = logits((4, c, 1), torch.float32)
    x[1, c // 2, 0] = float("nan")
    t = torch.zeros(4, 1, dtype=torch.long, device="cuda")
    loss, lse, g = ops.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True)
    assert torch.isnan(loss[1]).all() and torch.isnan(lse[1]).all()
    assert torch.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.gpu
def test_gpu_empty_batch(ops):
    for shape in [(0, 10, 1), (3, 10, 0)]:
        x = logits(shape, torch.float16)
        t = torch.zeros(shape[0], shape[2], dtype=torch.long, device="cuda")
        loss, lse, g = ops.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True)
        assert loss.shape == (shape[0], shape[2]) and g.shape == shape
        loss, lse = ops.cross_entropy_fwd_inplace(x, t, None, None, -100, 0.0, 0.0, 0.0)
        assert loss.shape == (shape[0], shape[2])
        ops.scale_grad_(x, torch.ones(shape[0], shape[2], device="cuda"))


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_scale_grad(ops, dtype):
    torch.manual_seed(4)
    acc = ACC[dtype]
    for g0 in [logits((6, 333, 1), dtype), logits((4, 20, 9), dtype),
               logits((9, 6, 5), dtype).transpose(0, 2)[:, :, 1:]]:
        n, c, d = g0.shape
        g0[0, 0, 0] = float("nan")
        # Scalar 1 (expanded, as autograd passes a 'sum' loss's gradient): not touched at all.
        g = g0.clone()
        before = _bits(g.clone())
        ops.scale_grad_(g, torch.ones((), device="cuda", dtype=acc).expand(n, d))
        assert torch.equal(_bits(g), before)
        # A scalar other than 1: one multiply in float32, one rounding.
        g = g0.clone()
        s = torch.tensor(0.3, device="cuda", dtype=acc)
        ops.scale_grad_(g, s.expand(n, d))
        want = (g0.to(acc) * s).to(dtype)
        torch.testing.assert_close(g, want, rtol=0, atol=0, equal_nan=True)
        # One factor per row.
        g = g0.clone()
        gl = torch.rand(n, d, device="cuda", dtype=acc)
        ops.scale_grad_(g, gl)
        want = (g0.to(acc) * gl.unsqueeze(1)).to(dtype)
        torch.testing.assert_close(g, want, rtol=0, atol=0, equal_nan=True)
        # A float32 upstream gradient for float64 grad (and the reverse) is converted.
        g = g0.clone()
        other = torch.float64 if acc == torch.float32 else torch.float32
        ops.scale_grad_(g, gl.to(other))
        torch.testing.assert_close(g, (g0.to(acc) * gl.to(other).to(acc).unsqueeze(1)).to(dtype),
                                   rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_gpu_uses_current_stream_and_device(ops):
    x = logits((64, 3000, 1), torch.bfloat16)
    t = class_targets(64, 1, 3000)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loss, lse, g = ops.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True)
    torch.cuda.current_stream().wait_stream(s)
    compare(torch.bfloat16, (loss, lse, g), expected(x, t))


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [-1, 1000, 10**12])
def test_gpu_bad_target_device_assert(ops, bad):
    """An out-of-range class index fails a device-side assertion (run in a child process: the
    assertion poisons the CUDA context). Neither x[y] nor weight[y] is read for it."""
    code = textwrap.dedent(f"""
        import torch, fusedloss._C
        x = torch.randn(8, 1000, 1, device="cuda")
        t = torch.zeros(8, 1, dtype=torch.long, device="cuda")
        t[5, 0] = {bad}
        out = torch.ops.fusedloss_C.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True)
        torch.cuda.synchronize()
        print("NO ERROR", out[0])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}, timeout=300)
    assert r.returncode != 0 and "NO ERROR" not in r.stdout, r.stdout
    assert "assert" in r.stderr.lower(), r.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_64bit_offsets(ops):
    """N * C > 2**31 elements: row offsets need 64 bits."""
    c = 65536
    n = 2**31 // c + 3
    need = 2 * n * c * 2 + (1 << 30)  # bf16 input + gradient + slack
    if torch.cuda.get_device_properties(0).total_memory < need:
        pytest.skip("not enough GPU memory")
    x = torch.empty((n, c, 1), device="cuda", dtype=torch.bfloat16)
    x.normal_(0, 2)
    t = torch.randint(0, c, (n, 1), device="cuda")
    loss, lse, g = ops.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, True)
    tail = slice(n - 4, n)
    want = expected(x[tail], t[tail])
    compare(torch.bfloat16, (loss[tail], lse[tail], g[tail]), want)
    del g
    loss2, lse2 = ops.cross_entropy_fwd_inplace(x, t, None, None, -100, 0.0, 0.0, 0.0)
    compare(torch.bfloat16, (loss2[tail], lse2[tail], x[tail]), want)
