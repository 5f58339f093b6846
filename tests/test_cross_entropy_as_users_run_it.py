"""Cross-entropy the way outside suites and new users ran it (issue 4/9): higher-order autograd,
in-place writes torch would refuse, layouts and dtypes torch accepts, compile with dynamic shapes,
and the corners where torch's semantics are the contract (upstream NaN on ignored rows, empty
batches, loss dtype under autocast and type promotion).

Each test failed before its fix; each runs on every fused backend that runs here (and, where the
semantics are the reference's too, on the reference).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import fusedloss

BACKENDS_AND_REFERENCE = ["reference", "cpu", "triton", "cuda"]


@pytest.fixture(params=BACKENDS_AND_REFERENCE)
def any_backend(request):
    from conftest import AVAILABLE, FUSED
    name = request.param
    if not AVAILABLE[name]:
        pytest.skip(f"{name}: {fusedloss.backends()[name]['why']}")
    return name, FUSED.get(name, "cpu")


def _x(shape, device, dtype=torch.float64, requires_grad=True):
    return (torch.randn(shape, dtype=torch.float64) * 2).to(dtype).to(device).requires_grad_(
        requires_grad)


# ---------------------------------------------------------------------------------------------
# Higher-order autograd: a clear error for double backward, correct forward-mode AD.


def test_double_backward_raises_clearly(backend, device):
    x = _x((3, 5), device)
    t = torch.tensor([0, 4, 2], device=device)
    for kw in [{}, {"reduction": "none"}, {"label_smoothing": 0.1, "z_loss": 1e-3}]:
        loss = fusedloss.cross_entropy(x, t, backend=backend, **kw).sum()
        with pytest.raises(RuntimeError, match="first derivatives only.*backend='reference'"):
            torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.functional.hessian(
            lambda z: fusedloss.cross_entropy(z, t, backend=backend), x.detach())
    # in place: the logits come from an op (the gradient overwrites them)
    y = x * 1
    loss = fusedloss.cross_entropy(y, t, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_double_backward_linear_raises_clearly(backend, device):
    x = _x((4, 3), device)
    w = _x((7, 3), device)
    t = torch.tensor([0, 6, 2, 1], device=device)
    loss = fusedloss.linear_cross_entropy(x, w, t, backend=backend)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, (x, w), create_graph=True)


def test_first_backward_still_works_without_create_graph(backend, device):
    x = _x((3, 5), device)
    t = torch.tensor([0, 4, 2], device=device)
    (g,) = torch.autograd.grad(fusedloss.cross_entropy(x, t, backend=backend), x)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(x, t), x)
    torch.testing.assert_close(g, g_ref)


def test_hessian_through_the_reference(device="cpu"):
    x = _x((2, 4), device).detach()
    t = torch.tensor([1, 2])
    h = torch.autograd.functional.hessian(
        lambda z: fusedloss.cross_entropy(z, t, backend="reference"), x)
    h_ref = torch.autograd.functional.hessian(lambda z: F.cross_entropy(z, t), x)
    torch.testing.assert_close(h, h_ref)
    assert h.abs().sum() > 0


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.2, "reduction": "sum"},
                                {"reduction": "none", "weight": "w"}], ids=str)
def test_forward_mode_ad_matches_torch(backend, device, kw):
    kw = dict(kw)
    x = _x((4, 6), device, requires_grad=False)
    v = torch.randn_like(x)  # a random tangent: rows of a CE gradient sum to 0, ones would not do
    t = torch.tensor([0, 5, 3, 1], device=device)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(6, dtype=x.dtype, device=device) + 0.5
    _, tangent = torch.func.jvp(lambda z: fusedloss.cross_entropy(z, t, backend=backend, **kw),
                                (x,), (v,))
    _, tangent_ref = torch.func.jvp(lambda z: F.cross_entropy(z, t, **kw), (x,), (v,))
    assert tangent is not None
    torch.testing.assert_close(tangent, tangent_ref)
    with forward_ad.dual_level():
        out = fusedloss.cross_entropy(forward_ad.make_dual(x, v), t, backend=backend, **kw)
        got = forward_ad.unpack_dual(out).tangent
    assert got is not None
    torch.testing.assert_close(got, tangent_ref)
    # torch.func.grad and vmap go the same way
    g = torch.func.grad(lambda z: fusedloss.cross_entropy(z, t, backend=backend))(x)
    torch.testing.assert_close(g, torch.func.grad(lambda z: F.cross_entropy(z, t))(x))


def test_forward_mode_ad_linear(backend, device):
    x = _x((4, 3), device, requires_grad=False)
    w = _x((7, 3), device, requires_grad=False)
    t = torch.tensor([0, 6, 2, 1], device=device)
    vx, vw = torch.randn_like(x), torch.randn_like(w)
    _, got = torch.func.jvp(lambda a, b: fusedloss.linear_cross_entropy(a, b, t, backend=backend),
                            (x, w), (vx, vw))
    _, want = torch.func.jvp(lambda a, b: F.cross_entropy(a @ b.T, t), (x, w), (vx, vw))
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# inplace_backward: refuse what torch refuses for an in-place write, on every backend.


def test_inplace_refuses_overlapping_memory(any_backend):
    backend, device = any_backend
    b = _x((1, 9), device)
    before = b.detach().clone()
    e = (b * 1)[:1].expand(6, 9)  # stride 0 over rows: six rows share one memory row
    with pytest.raises(RuntimeError, match="share one memory location"):
        fusedloss.cross_entropy(e, torch.arange(6, device=device), inplace_backward=True,
                                backend=backend)
    torch.testing.assert_close(b.detach(), before)


def test_inplace_refuses_leaf_and_view_of_leaf(any_backend):
    backend, device = any_backend
    x = _x((4, 6), device)
    before = x.detach().clone()
    t = torch.arange(4, device=device)
    with pytest.raises(RuntimeError, match="is a leaf tensor that requires grad"):
        fusedloss.cross_entropy(x, t, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="view of a leaf tensor that requires grad"):
        fusedloss.cross_entropy(x[:3], t[:3], inplace_backward=True, backend=backend)
    torch.testing.assert_close(x.detach(), before)
    # not needing a gradient, it is not an in-place op at all
    with torch.no_grad():
        fusedloss.cross_entropy(x, t, inplace_backward=True, backend=backend)
    torch.testing.assert_close(x.detach(), before)


# ---------------------------------------------------------------------------------------------
# Layouts, dtypes and compile modes torch accepts.


def test_linear_column_major_input(any_backend):
    backend, device = any_backend
    x = torch.randn(4, 6, dtype=torch.float64, device=device).t().requires_grad_()  # (6, 4)
    w = _x((10, 4), device)
    t = torch.tensor([0, 9, 3, 3, 1, 7], device=device)
    for reduction in ["mean", "sum", "none"]:
        loss = fusedloss.linear_cross_entropy(x, w, t, reduction=reduction, backend=backend)
        gx, gw = torch.autograd.grad(loss.sum(), (x, w))
        want = F.linear_cross_entropy(x, w, t, reduction=reduction)
        wx, ww = torch.autograd.grad(want.sum(), (x, w))
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(gx, wx)
        torch.testing.assert_close(gw, ww)


@pytest.mark.parametrize("mode", ["aot_eager", "inductor"])
def test_compile_dynamic_shapes(backend, device, mode):
    if mode == "inductor" and device != "cpu":
        pytest.skip("inductor is compiled here for CPU tensors only")

    def f(x, t, ls, z):
        return fusedloss.cross_entropy(x, t, label_smoothing=ls, z_loss=z, backend=backend)

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend=mode)
    for n, ls in [(4, 0.1), (7, 0.1), (9, 0.2)]:
        x = _x((n, 11), device, dtype=torch.float32)
        t = torch.randint(0, 11, (n,), device=device)
        loss = cf(x, t, ls, 1e-3)
        (g,) = torch.autograd.grad(loss, x)
        lse = torch.logsumexp(x.double(), 1)  # z_loss adds 1e-3 * lse**2 per row
        ref = F.cross_entropy(x.double(), t, label_smoothing=ls) + 1e-3 * (lse * lse).mean()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        (g_ref,) = torch.autograd.grad(ref, x)
        torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-5, atol=1e-6)


def test_uint8_targets(any_backend):
    backend, device = any_backend
    x = _x((5, 7), device)
    t = torch.tensor([0, 6, 3, 3, 1], dtype=torch.uint8, device=device)
    for reduction in ["mean", "sum", "none"]:
        got = fusedloss.cross_entropy(x, t, reduction=reduction, backend=backend)
        want = F.cross_entropy(x, t, reduction=reduction)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0],
                                   torch.autograd.grad(want.sum(), x)[0])
    for dt in [torch.int32, torch.int16, torch.bool]:  # torch: "expected Long or Byte"
        with pytest.raises(TypeError, match="target must be int64 or uint8"):
            fusedloss.cross_entropy(x, t.to(dt), backend=backend)


def test_probability_targets_refuse_a_real_ignore_index(any_backend):
    backend, device = any_backend
    x = _x((3, 5), device)
    p = torch.softmax(torch.randn(3, 5, dtype=torch.float64, device=device), 1)
    with pytest.raises(ValueError, match=r"ignore_index \(2\) is not supported"):
        fusedloss.cross_entropy(x, p, ignore_index=2, backend=backend)
    # a negative ignore_index is accepted and unused, as in torch
    torch.testing.assert_close(fusedloss.cross_entropy(x, p, ignore_index=-1, backend=backend),
                               F.cross_entropy(x, p, ignore_index=-1))


def test_loss_dtype_follows_torch(any_backend):
    backend, device = any_backend
    x32 = _x((3, 5), device, torch.float32, requires_grad=False)
    t = torch.tensor([0, 4, 2], device=device)
    p64 = torch.softmax(torch.randn(3, 5, dtype=torch.float64, device=device), 1)
    cases = [(x32, p64), (x32.bfloat16(), p64.float()), (x32.double(), p64.float())]
    for x, p in cases:
        got = fusedloss.cross_entropy(x, p, backend=backend)
        want = F.cross_entropy(x, p)
        assert got.dtype == want.dtype, (x.dtype, p.dtype)
    if device == "cpu":
        for x in [x32, x32.bfloat16()]:
            with torch.autocast("cpu", torch.bfloat16):
                got = fusedloss.cross_entropy(x, t, backend=backend)
                want = F.cross_entropy(x, t)
                got_p = fusedloss.cross_entropy(x, p64.to(x.dtype), backend=backend)
                want_p = F.cross_entropy(x, p64.to(x.dtype))
            assert got.dtype == want.dtype == torch.float32
            assert got_p.dtype == want_p.dtype
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Upstream gradients and empty batches.


def test_nan_upstream_never_reaches_ignored_rows(any_backend):
    backend, device = any_backend
    x = _x((4, 5), device)
    t = torch.tensor([0, -100, 4, -100], device=device)
    nan = float("nan")
    for reduction, up in [("none", torch.tensor([1.0, nan, 2.0, float("inf")])),
                          ("mean", torch.tensor(nan)), ("sum", torch.tensor(float("inf")))]:
        up = up.to(device=device, dtype=x.dtype)
        for inplace in [False, True]:
            xi = x * 1 if inplace else x
            loss = fusedloss.cross_entropy(xi, t, reduction=reduction, backend=backend,
                                           inplace_backward=inplace)
            (g,) = torch.autograd.grad(loss, x, up)
            (g_ref,) = torch.autograd.grad(F.cross_entropy(x, t, reduction=reduction), x, up)
            assert (g[1] == 0).all() and (g[3] == 0).all(), (reduction, inplace, g)
            # Elsewhere torch's pattern of non-finite values (at the target column torch's
            # log-softmax backward gives -inf + inf = NaN under an inf upstream, fusedloss -inf).
            assert torch.equal(g.isfinite(), g_ref.isfinite()), (reduction, inplace, g, g_ref)
            fin = g_ref.isfinite()
            torch.testing.assert_close(g[fin], g_ref[fin])


def test_linear_empty_batch_mean(any_backend):
    backend, device = any_backend
    x = torch.zeros(0, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = _x((7, 4), device)
    b = _x((7,), device)
    t = torch.zeros(0, dtype=torch.int64, device=device)
    loss = fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, backend=backend)
    assert loss.isnan()  # torch's NaN for the mean of nothing
    gx, gw, gb = torch.autograd.grad(loss, (x, w, b))
    want = F.linear_cross_entropy(x, w, t, linear_bias=b)
    wx, ww, wb = torch.autograd.grad(want, (x, w, b))
    assert gx.shape == x.shape
    torch.testing.assert_close(gw, ww)  # zeros, not NaN
    torch.testing.assert_close(gb, wb)
    assert (gw == 0).all() and (gb == 0).all()


def test_cross_entropy_empty_batch_mean_grad_is_zero(any_backend):
    backend, device = any_backend
    w = _x((5,), device)  # the class weight itself needs no gradient path; the logits do
    x = (torch.zeros(0, 5, dtype=torch.float64, device=device) + w).requires_grad_()
    loss = fusedloss.cross_entropy(x, torch.zeros(0, dtype=torch.int64, device=device),
                                   backend=backend)
    assert loss.isnan()
    (gw,) = torch.autograd.grad(loss, w)
    assert (gw == 0).all()
