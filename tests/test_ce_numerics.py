"""Numerical edge cases of cross_entropy on every fused backend, against torch and float64.

- An inf class weight on a class no target uses (1/count class balancing): without label
  smoothing no smoothing term may form 0 * inf; with it, torch's loss is inf and its gradient
  inf / NaN in a fixed pattern, which fusedloss must reproduce.
- The weighted sums sum_c v_c (lse - xs_c) of probability targets and of the label-smoothing term
  must not cancel: fusedloss's relative error against float64 is at most twice torch's float32
  error, plus a floor (REL_FLOOR, ABS_FLOOR) for the roundings torch has as well.
- scale_grad_: a gradient element that is exactly 0 stays 0 whatever the upstream gradient (NaN,
  inf), so ignored rows keep torch's exact 0.
"""

import pytest
import torch
import torch.nn.functional as F

import fusedloss

# A few float32 ulps of relative error (where torch itself is exact to the last bit), and an
# absolute one: s = sum_c exp(xs_c - m) >= 1 is rounded to a few ulps of 1, and log(s) carries
# that into every loss (torch's too), a large relative error for a confident row's small loss.
REL_FLOOR = 5e-7
ABS_FLOOR = 4 * 2.0**-24


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


def _loss_and_grad(fn, x, t, upstream=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    # logits from an op, not the leaf itself: in-place writes into a leaf are refused
    loss = fn(x * 1 if kw.get("inplace_backward") else x, t, **kw)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), x.grad


def _rel_err(got, ref):
    """Largest relative error of got against the float64 reference."""
    return ((got.double().cpu() - ref).abs() / ref.abs()).max().item()


def _float64_loss(x, t, **kw):
    kw = {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
    return F.cross_entropy(x.double(), t.double() if t.is_floating_point() else t,
                           reduction="none", **kw)


def _fused_loss(backend, device, x, t, **kw):
    x, t = _on(device, x, t)
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    return fusedloss.cross_entropy(x, t, reduction="none", backend=backend, **kw).double().cpu()


# ---------------------------------------------------------------------------------------------
# 1. Infinite class weights

CLASS_COUNTS = [3.0, 5.0, 0.0, 2.0, 4.0]  # class 2 never occurs: its weight 1/0 is inf


def _inf_weight_case(layout):
    w = 1 / torch.tensor(CLASS_COUNTS)
    if layout == "rows":
        x = torch.randn(3, 5)
        t = torch.tensor([0, 1, 4])
        x[1, 2] = x[1].max() + 2.0  # the inf-weight class is the max of a row
    else:  # (N, C, D): the CPU kernel's spatial path
        x = torch.randn(2, 5, 4)
        t = torch.tensor([0, 1, 3, 4, 4, 3, 1, 0]).reshape(2, 4)
        x[1, 2, 3] = x[1, :, 3].max() + 2.0
    return x, t, w


def _upstream(reduction, t):
    return torch.rand(t.shape) + 0.5 if reduction == "none" else None


@pytest.mark.parametrize("layout", ["rows", "spatial"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_inf_weight_of_unused_class(backend, device, layout, reduction, inplace):
    """No smoothing: the inf weight is never used, loss and gradient are finite like torch's."""
    x, t, w = _inf_weight_case(layout)
    up = _upstream(reduction, t)
    want, g_want = _loss_and_grad(F.cross_entropy, x, t, up, weight=w, reduction=reduction)
    assert torch.isfinite(want).all() and torch.isfinite(g_want).all()
    x, t, w = _on(device, x, t, w)
    got, g_got = _loss_and_grad(fusedloss.cross_entropy, x, t, None if up is None else
                                up.to(device), weight=w, reduction=reduction, backend=backend,
                                inplace_backward=inplace)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g_got.cpu(), g_want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["rows", "spatial"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inf_weight_with_label_smoothing(backend, device, layout, reduction):
    """With smoothing every row's loss is inf (inf * (lse - x_c) > 0, also where that class is
    the row max), and the gradient has torch's pattern: inf, NaN at the inf-weight class."""
    x, t, w = _inf_weight_case(layout)
    up = _upstream(reduction, t)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    want, g_want = _loss_and_grad(F.cross_entropy, x, t, up, **kw)
    assert torch.isposinf(want).all()
    x, t, kw["weight"] = _on(device, x, t, w)
    got, g_got = _loss_and_grad(fusedloss.cross_entropy, x, t, None if up is None else
                                up.to(device), backend=backend, **kw)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=1e-6)
    # equal_nan: NaN where torch has NaN, the same infinities, the finite values close.
    torch.testing.assert_close(g_got.cpu(), g_want, rtol=2e-5, atol=1e-6, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# 2. Accuracy of the weighted sums

def check_accuracy(backend, device, x, t, **kw):
    """Every row's float32 loss within twice torch's largest relative error of float64, plus the
    floors."""
    ref = _float64_loss(x, t, **kw)
    err_torch = _rel_err(F.cross_entropy(x, t, reduction="none", **kw), ref)
    got = _fused_loss(backend, device, x, t, **kw)
    bound = (2 * err_torch + REL_FLOOR) * ref.abs() + ABS_FLOOR
    worst = ((got - ref).abs() / bound).max().item()
    assert worst <= 1, (f"error {worst:.3g} x the bound: relative {_rel_err(got, ref):.3g}, "
                        f"torch's {err_torch:.3g}")


@pytest.mark.parametrize("layout", ["rows", "spatial"])
def test_confident_probability_target(backend, device, layout):
    """The loss is ~1e-4 of lse: sum_wt * lse - sum_wtx lost 2% of it."""
    x = torch.tensor([[36.0, -12.0, -16.0]])
    t = torch.softmax(torch.tensor([[8.0, -5.0, -6.0]]), dim=1)
    if layout == "spatial":
        x, t = x[:, :, None].expand(1, 3, 5).contiguous(), t[:, :, None].expand(1, 3, 5)
    assert _rel_err(_fused_loss(backend, device, x, t), _float64_loss(x, t)) <= 1e-6


def _prob_case(name):
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    kw = {}
    if name in ("confident", "confident-weighted", "confident-smoothed"):
        z = randn(64, 50)
        x, t = 10 * z + 0.2 * randn(64, 50), torch.softmax(5 * z, dim=1)
        if name == "confident-weighted":
            kw["weight"] = (torch.rand(50, generator=g, dtype=torch.float64) + 0.5).float()
        if name == "confident-smoothed":
            kw["label_smoothing"] = 0.05
    elif name == "large-logits":
        z = randn(64, 50)
        x, t = 100 + 8 * z + 0.2 * randn(64, 50), torch.softmax(4 * z, dim=1)
    elif name == "vocab":  # two LLM-sized rows, loss ~50
        x, t = 4 * randn(2, 32000), torch.softmax(5 * randn(2, 32000), dim=1)
    elif name == "vocab-confident":
        z = randn(2, 32000)
        x, t = 8 * z, torch.softmax(8 * z, dim=1)
    elif name == "rising":  # the running max rises in every chunk of the row
        z = torch.linspace(-20, 20, 5000, dtype=torch.float64).expand(3, -1) + randn(3, 5000)
        x, t = 2 * z, torch.softmax(2 * z, dim=1)
    elif name == "spatial":
        z = randn(4, 40, 8)
        x, t = 10 * z + 0.2 * randn(4, 40, 8), torch.softmax(5 * z, dim=1)
    return x.float(), t.float(), kw


PROB_CASES = ["confident", "confident-weighted", "confident-smoothed", "large-logits", "vocab",
              "vocab-confident", "rising", "spatial"]


@pytest.mark.parametrize("case", PROB_CASES)
def test_probability_target_accuracy(backend, device, case):
    x, t, kw = _prob_case(case)
    check_accuracy(backend, device, x, t, **kw)


@pytest.mark.parametrize("case", ["rows", "rows-weighted", "chunks", "chunks-weighted", "spatial",
                                  "spatial-weighted"])
def test_label_smoothing_large_offset_accuracy(backend, device, case):
    """Logits 1000 + randn: W lse - sum_c w_c x_c cancelled ~6 digits of the smoothing term."""
    g = torch.Generator().manual_seed(2)
    c = 3000 if case.startswith("chunks") else 40
    shape = (2, c, 8) if case.startswith("spatial") else (16, c)
    x = (1000 + torch.randn(shape, generator=g, dtype=torch.float64)).float()
    t = torch.randint(0, c, shape[:1] + shape[2:], generator=g)
    kw = {"label_smoothing": 0.1}
    if case.endswith("weighted"):
        kw["weight"] = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).float()
    check_accuracy(backend, device, x, t, **kw)


# ---------------------------------------------------------------------------------------------
# 3. scale_grad_ keeps zeros

def _scale_grad(backend):
    if backend == "triton":
        from fusedloss.kernels.scale_grad import scale_grad_
        return scale_grad_
    return torch.ops.fusedloss_C.scale_grad_


def _grad_with_zeros(layout, dtype):
    """(N, C, D) with row n = 1 all zeros (an ignored row) and scattered zeros elsewhere."""
    n, c, d = (3, 37, 1) if layout == "rows" else (3, 37, 6)
    if layout == "strided":  # class dim not innermost, not contiguous
        g = torch.randn(n, d, c, dtype=torch.float64).transpose(1, 2)
    else:
        g = torch.randn(n, c, d, dtype=torch.float64)
    g[1] = 0.0
    g[0, ::5] = 0.0
    g[2, 3] = -0.0
    return g.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["rows", "spatial", "strided"])
@pytest.mark.parametrize("upstream", ["nan-scalar", "inf-scalar", "nan-per-row", "inf-per-row"])
def test_scale_grad_keeps_zero(backend, device, dtype, layout, upstream):
    g = _grad_with_zeros(layout, dtype)
    n, _, d = g.shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bad = float("nan") if upstream.startswith("nan") else float("inf")
    if upstream.endswith("scalar"):
        gl = torch.full((), bad, dtype=acc).expand(n, d)
    else:
        gl = torch.rand(n, d, dtype=acc) + 0.5
        gl[1] = bad  # the ignored row
        gl[0, 0] = bad  # a row with zeros and non-zeros
    want = torch.where(g == 0, 0.0, g.to(acc) * gl[:, None, :]).to(dtype)
    got = g.to(device)
    _scale_grad(backend)(got, gl.to(device))
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[1].cpu(), torch.zeros_like(got[1].cpu()))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_ignored_rows_keep_zero_gradient_with_nan_upstream(backend, device, reduction):
    """End to end (the in-place backward scales with scale_grad_): torch's gradient is exactly 0
    on ignored rows, whatever the upstream gradient."""
    x = torch.randn(4, 9)
    t = torch.tensor([1, -100, 3, -100])
    up = torch.tensor(float("nan")) if reduction == "sum" else torch.tensor([0.5, float("nan"),
                                                                              2.0, float("inf")])
    _, g_want = _loss_and_grad(F.cross_entropy, x, t, up, reduction=reduction)
    assert torch.equal(g_want[[1, 3]], torch.zeros(2, 9))
    x, t, up = _on(device, x, t, up)
    _, g_got = _loss_and_grad(fusedloss.cross_entropy, x, t, up, reduction=reduction,
                              backend=backend, inplace_backward=True)
    torch.testing.assert_close(g_got.cpu(), g_want, rtol=2e-5, atol=1e-6, equal_nan=True)
