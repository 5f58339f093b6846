"""GPU runtime tests: the CUDA kernels of fusedloss._C against torch, on a real device.

Marked ``gpu`` and skipped without a CUDA device and a CUDA build of fusedloss._C (the README's
test command deselects them with ``-m "not gpu"``; on a CUDA machine run ``python -m pytest
tests/test_gpu.py``). The static checks of the CUDA sources, which need no GPU, are in
``tests/test_cuda_sources.py``; the Triton kernels run on a GPU through every ``backend``-
parametrised test, whose ``triton`` and ``cuda`` params use CUDA tensors there.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def expected(x, t, weight=None, loss_scale=None, ignore_index=-100, ls=0.0, z=0.0, softcap=0.0):
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
    if loss_scale is not None:
        loss = loss * loss_scale.double()
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


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_scale_grad_beyond_grid_limits(ops):
    """linear CE scales grad_weight viewed as (1, V*H, 1), 1.25e9 elements for Qwen2.5-72B; here
    2^31 + 40 elements. A capped 1-D grid-stride launch covers them, flat (scalar factor) and
    strided with 64-bit indices (a factor per row)."""
    half = 2**30 + 20
    if torch.cuda.get_device_properties(0).total_memory < 4 * half + (2 << 30):
        pytest.skip("not enough GPU memory")
    g = torch.ones((2, half, 1), device="cuda", dtype=torch.bfloat16)
    g[1, -1, 0] = 0.0
    ops.scale_grad_(g, torch.full((), 0.5, device="cuda").expand(2, 1))
    assert (g[0, 0, 0].item(), g[1, -2, 0].item(), g[1, -1, 0].item()) == (0.5, 0.5, 0.0)
    ops.scale_grad_(g, torch.ones((), device="cuda").expand(2, 1))  # 1: nothing written
    assert g[0, half // 2, 0].item() == 0.5
    ops.scale_grad_(g, torch.tensor([[2.0], [4.0]], device="cuda"))
    assert (g[0, -1, 0].item(), g[1, 0, 0].item(), g[1, -1, 0].item()) == (1.0, 2.0, 0.0)
