"""fusedloss.softmax_focal_loss on every fused backend that runs here: against the reference (its
spec) and torch's cross_entropy (gamma = 0), the layouts of the softmax-row skeleton, extreme
logits, half precision by the 2x-torch rule, bad targets, and the reduced output (block sums).

The generic checks (non-contiguous, empty, NaN, gradcheck, opcheck, compile, bad arguments) come
from the OPS row in tests/_support.py.
"""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from _support import TOL, _sf_torch_half, assert_half_precision_ok, make
from _support import class_targets as targets
from fusedloss import reference
from fusedloss.ops import _common

GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]


def run(fn, x, *args, upstream=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss, x.grad


def close(a, b, dtype, what=""):
    tol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def check(backend, x, t, dtype=torch.float32, upstream=None, **kw):
    got, g_got = run(fusedloss.softmax_focal_loss, x.to(dtype), t, upstream=upstream,
                     backend=backend, **kw)
    want, g_want = run(reference.softmax_focal_loss, x.to(dtype), t, upstream=upstream, **kw)
    assert got.dtype == want.dtype and got.shape == want.shape
    close(got, want, dtype, "loss")
    close(g_got, g_want, dtype, "grad")
    return got, g_got


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def class_dim_strided(x):
    """(N, C) logits with class stride N (a transposed buffer)."""
    return x.t().contiguous().t()


LAYOUTS = {
    "rows": lambda d: ((6, 11), None),
    "rows-long": lambda d: ((3, 2500), None),  # more than one pass-1 chunk (2048)
    "spatial": lambda d: ((2, 5, 7, 9), None),
    "spatial-C1": lambda d: ((2, 1, 33), None),
    "channels_last": lambda d: ((2, 6, 5, 7), channels_last),
    "channels_last-C70": lambda d: ((2, 70, 3, 5), channels_last),  # rows path (C > 64)
    "class-strided": lambda d: ((9, 13), class_dim_strided),
}


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference(backend, device, gamma, layout, reduction):
    shape, fmt = LAYOUTS[layout](device)
    x = make(shape, device=device)
    if fmt is not None:
        x = fmt(x)
    t = targets((shape[0],) + shape[2:], shape[1], device, ignore_frac=0.2)
    w = torch.rand(shape[1], device=device) + 0.1
    check(backend, x, t, gamma=gamma, weight=w, reduction=reduction)
    check(backend, x, t, gamma=gamma, reduction="sum")


@pytest.mark.parametrize("shape", [(7, 5), (2, 4, 3, 5), (3, 300)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gamma0_is_cross_entropy(backend, device, shape, reduction):
    x = make(shape, device=device)
    t = targets((shape[0],) + shape[2:], shape[1], device, ignore_frac=0.25)
    w = torch.rand(shape[1], device=device) + 0.1
    for kw in ({}, {"weight": w}):
        got, g_got = run(fusedloss.softmax_focal_loss, x, t, gamma=0.0, reduction=reduction,
                         backend=backend, **kw)
        want, g_want = run(F.cross_entropy, x, t, reduction=reduction, **kw)
        close(got, want, torch.float32, "loss")
        close(g_got, g_want, torch.float32, "grad")


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("scale", [100.0, 1e4])
def test_extreme_logits(backend, device, gamma, scale):
    """Logits of +-100 and +-1e4: finite where the float64 spec is, and the spec's values."""
    x = torch.tensor([[1.0, -1.0, 0.5, -0.5], [-1.0, 1.0, 1.0, -1.0], [1.0, 1.0, -1.0, 0.0]],
                     device=device) * scale
    x = torch.cat([x, make((5, 4), device=device) * scale / 3])
    t = torch.tensor([0, 0, 2, 1, 3, 0, 2, 1], device=device)
    got, g_got = run(fusedloss.softmax_focal_loss, x, t, gamma=gamma, reduction="none",
                     backend=backend)
    want, g_want = run(reference.softmax_focal_loss, x.double(), t, gamma=gamma,
                       reduction="none")
    assert torch.isfinite(got).all() and torch.isfinite(g_got).all()
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g_got.double(), g_want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
def test_certain_row_has_zero_gradient(backend, device, gamma):
    """p_y == 1 in float32 (q = 0): loss 0 and a finite 0 gradient, also for gamma < 1 (the
    ratio -log p / q is taken at its limit 1, never inf * 0)."""
    x = torch.tensor([[200.0, -200.0, 0.0]], device=device)
    t = torch.tensor([0], device=device)
    loss, g = run(fusedloss.softmax_focal_loss, x, t, gamma=gamma, reduction="sum",
                  backend=backend)
    assert loss.item() == 0.0
    assert torch.isfinite(g).all() and not g.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 5.0])
@pytest.mark.parametrize("shape", [(64, 10), (4, 7, 5, 6)])
def test_half_precision(backend, device, dtype, gamma, shape):
    """Within twice torch's own error at that precision (tests/_support.py)."""
    x = make(shape, dtype, device)
    t = targets((shape[0],) + shape[2:], shape[1], device, ignore_frac=0.1)
    for reduction in ("mean", "none"):
        got, g_got = run(fusedloss.softmax_focal_loss, x, t, gamma=gamma, reduction=reduction,
                         backend=backend)
        assert got.dtype == dtype and g_got.dtype == dtype
        th, g_th = run(_sf_torch_half, x, t, gamma=gamma, reduction=reduction)
        ref, g_ref = run(reference.softmax_focal_loss, x.double(), t, gamma=gamma,
                         reduction=reduction)
        assert_half_precision_ok(got, th, ref, f"{reduction} loss")
        assert_half_precision_ok(g_got, g_th, g_ref, f"{reduction} grad")


@pytest.mark.parametrize("bad", [5, -1, 2**40, -(2**40)])
def test_bad_target_raises_naming_it(backend, device, bad):
    x = make((4, 5), device=device)
    t = torch.tensor([0, 1, bad, 2], device=device)
    w = torch.rand(5, device=device)
    for reduction in ("mean", "none"):
        with pytest.raises(IndexError, match=f"target {bad} is out of bounds for 5 classes"):
            fusedloss.softmax_focal_loss(x.clone().requires_grad_(), t, weight=w,
                                         reduction=reduction, backend=backend)


def test_bad_target_spatial(backend, device):
    x = make((2, 3, 70), device=device)
    t = targets((2, 70), 3, device)
    t[1, 65] = 3
    with pytest.raises(IndexError, match="target 3 is out of bounds"):
        fusedloss.softmax_focal_loss(x, t, reduction="sum", backend=backend)


def test_ignore_index_and_weights(backend, device):
    x = make((10, 4), device=device)
    t = torch.tensor([0, 1, 2, 3, 7, 7, 1, 2, 7, 0], device=device)
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], device=device)
    got = fusedloss.softmax_focal_loss(x, t, 2.0, w, 7, "none", backend=backend)
    assert (got[t == 7] == 0).all()
    mean = fusedloss.softmax_focal_loss(x, t, 2.0, w, 7, "mean", backend=backend)
    valid = t != 7
    close(mean, got.sum() / w[t[valid]].sum(), torch.float32, "mean over sum of w[y]")
    # all ignored: torch's NaN mean, zero gradient
    loss, g = run(fusedloss.softmax_focal_loss, x, torch.full_like(t, 7), ignore_index=7,
                  backend=backend)
    assert torch.isnan(loss) and not g.any()


def test_per_row_upstream_keeps_ignored_rows_zero(backend, device):
    x = make((6, 5), device=device)
    t = targets((6,), 5, device)
    t[2] = -100
    up = torch.rand(6, device=device)
    up[2] = float("nan")
    _, g = run(fusedloss.softmax_focal_loss, x, t, reduction="none", upstream=up,
               backend=backend)
    assert (g[2] == 0).all() and torch.isfinite(g[[0, 1, 3, 4, 5]]).all()
    up[2] = 1.0
    check(backend, x, t, reduction="none", upstream=up)


@pytest.mark.parametrize("shape", [(2100, 3), (2, 4, 1100), (20, 4099), (3, 70000), (3, 5000, 3),
                                   (2, 3, 5)])
def test_block_sums(backend, device, shape):
    """'sum' and 'mean' come from the fixed blocks of rows of row_blocks.h on every backend: the op
    returns loss_blocks(N, C, D) values whose sum is the loss."""
    if backend == "triton" and shape[1] > 5000:
        pytest.skip("large C under the interpreter is slow")
    n, c = shape[:2]
    d = 1 if len(shape) == 2 else shape[2]
    x = make((n, c, d), device=device)
    t = targets((n, d), c, device, ignore_frac=0.1)
    op = torch.ops.fusedloss.softmax_focal_fwd
    blocks, _ = op(x, t, None, None, 2.0, -100, True, False, backend)
    rows, _ = op(x, t, None, None, 2.0, -100, False, False, backend)
    assert blocks.shape == (_common.loss_blocks(n, c, d),)
    k = _common.loss_block_rows(c, d)
    want = rows.reshape(-1, 1) if d == 1 else rows
    if d == 1:
        want = torch.nn.functional.pad(rows.reshape(-1), (0, -n % k)).reshape(-1, k).sum(1)
    else:
        want = torch.nn.functional.pad(rows, (0, -d % k)).reshape(n, -1, k).sum(2).reshape(-1)
    torch.testing.assert_close(blocks, want, rtol=1e-5, atol=1e-5)


def test_block_rows_python_copies_agree():
    from fusedloss.kernels._softmax_row import loss_block_rows as triton_rows
    for c in (1, 2, 4, 19, 64, 65, 1000, 4099, 65536, 65537, 256000):
        for d in (1, 2, 1000):
            assert triton_rows(c, d) == _common.loss_block_rows(c, d)


def test_sum_is_deterministic_over_threads():
    """The block sums do not depend on the thread count (CPU kernel)."""
    if not fusedloss.backends("softmax_focal")["cpu"]["available"]:
        pytest.skip("no cpu kernels")
    x = make((3, 5, 4000))
    t = targets((3, 4000), 5)
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out.append(fusedloss.softmax_focal_loss(x, t, reduction="sum", backend="cpu"))
    finally:
        torch.set_num_threads(before)
    assert out[0].item() == out[1].item() == out[2].item()


def test_module(backend, device):
    w = torch.rand(6, device=device) + 0.1
    m = fusedloss.nn.SoftmaxFocalLoss(gamma=1.5, weight=w, ignore_index=3, backend=backend)
    assert "gamma=1.5" in repr(m) and "weight" in dict(m.named_buffers())
    x = make((4, 6, 3, 2), device=device)
    t = targets((4, 3, 2), 6, device)
    close(m(x, t), reference.softmax_focal_loss(x, t, 1.5, w, 3), torch.float32, "module")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "weight": True}, {"softcap": 4.0},
                                {"prob": True}, {"inplace_backward": True}])
def test_cross_entropy_channels_last_tile_path(dtype, kw):
    """The CPU skeleton's gathered tiles (a few classes, channels-last positions) that softmax focal
    brought to the spatial path also run cross-entropy: its results there equal torch's."""
    if not fusedloss.backends("cross_entropy")["cpu"]["available"]:
        pytest.skip("no cpu kernels")
    kw = dict(kw)
    x = make((2, 7, 9, 5), dtype).contiguous(memory_format=torch.channels_last)
    if kw.pop("prob", False):
        t = torch.softmax(make((2, 7, 9, 5)), 1).to(dtype).contiguous(
            memory_format=torch.channels_last)
    else:
        t = targets((2, 9, 5), 7, ignore_frac=0.2)
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(7) + 0.1).to(dtype)
    softcap = kw.pop("softcap", None)
    inplace = kw.pop("inplace_backward", False)

    def torch_ce(z, t):
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        return F.cross_entropy(z.float(), t.float() if t.is_floating_point() else t,
                               **{k: (v.float() if isinstance(v, torch.Tensor) else v)
                                  for k, v in kw.items()})

    def ours(z, t):
        if inplace:
            z = z * 1.0
        return fusedloss.cross_entropy(z, t, softcap=softcap, inplace_backward=inplace,
                                       backend="cpu", **kw)

    got, g_got = run(ours, x, t)
    want, g_want = run(torch_ce, x, t)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(g_got.float(), g_want.float(), rtol=tol, atol=tol)
