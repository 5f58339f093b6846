"""sigmoid_focal_loss on every fused backend, beyond the generic checks of tests/test_ops.py:
torchvision's formula (written out below: torchvision is not installable beside our torch),
gamma in {0, 0.5, 1, 2, 5}, logits of +-100 and +-1e4 in every dtype (finite values and gradients,
where autograd through torchvision's formula gives NaN for gamma < 1), half precision by the
2x-torch rule, weights broadcast by stride, the reference routing of target / weight gradients,
the module, and the deterministic 'sum' of the CPU skeleton."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _ew_common import grads_of, skip_unless, thread_counts

import fusedloss
from _support import assert_half_precision_ok, make, soft_targets
from fusedloss import reference

GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]


def torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss, composite as torchvision writes it."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


def _sf(backend):
    def fn(x, t, *args, **kw):
        return fusedloss.sigmoid_focal_loss(x, t, *args, backend=backend, **kw)
    return fn


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_torchvision(backend, device, gamma, alpha, reduction):
    skip_unless("sigmoid_focal", backend)
    x = make((6, 37), device=device)
    t = soft_targets((6, 37), device)
    got, g_got = grads_of(_sf(backend), x, t, alpha, gamma, reduction)
    want, g_want = grads_of(torchvision_sigmoid_focal_loss, x.double(), t.double(), alpha, gamma,
                            reduction)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g_got.double(), g_want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("magnitude", [100.0, 1e4])
def test_extreme_logits_finite(backend, device, dtype, gamma, magnitude):
    """Logits of +-100 and +-1e4 with hard and soft targets: finite loss and gradient, equal to
    the float64 log-space reference (autograd through torchvision's formula is NaN at gamma < 1)."""
    skip_unless("sigmoid_focal", backend)
    x = torch.tensor([magnitude, -magnitude] * 4, device=device).to(dtype)
    t = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.3, 0.3, 0.99, 0.01], device=device)
    for reduction in ("none", "sum"):
        got, g = grads_of(_sf(backend), x, t, 0.25, gamma, reduction)
        assert torch.isfinite(got).all() and torch.isfinite(g).all(), (got, g)
        want, g_want = grads_of(reference.sigmoid_focal_loss, x.double(), t.double(), 0.25,
                                gamma, reduction)
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(g.double(), g_want, rtol=tol, atol=tol)
    if gamma == 0.5 and magnitude == 100.0:
        # the peer's failure this guards against: autograd through the composite formula
        _, g_tv = grads_of(torchvision_sigmoid_focal_loss, x.float(), t, 0.25, gamma, "sum")
        assert not torch.isfinite(g_tv).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_half_precision(backend, device, dtype, gamma):
    """Error against float64 at most twice that of torchvision's formula run in half precision."""
    skip_unless("sigmoid_focal", backend)
    x = make((16, 129), dtype, device)
    t = soft_targets((16, 129), device).to(dtype)
    got, g = grads_of(_sf(backend), x, t, 0.25, gamma, "none")
    ref, g_ref = grads_of(reference.sigmoid_focal_loss, x.double(), t.double(), 0.25, gamma)
    th, g_th = grads_of(torchvision_sigmoid_focal_loss, x, t, 0.25, gamma)
    assert got.dtype == dtype
    assert_half_precision_ok(got, th, ref, "loss")
    # torchvision's half gradient is NaN where p_t rounds to 1 with gamma < 1: compare elsewhere
    finite = torch.isfinite(g_th)
    assert torch.isfinite(g).all() and finite.float().mean() > 0.5
    assert_half_precision_ok(g[finite], g_th[finite], g_ref[finite], "grad")
    s = fusedloss.sigmoid_focal_loss(x, t, 0.25, gamma, "mean", backend=backend)
    assert_half_precision_ok(s, torchvision_sigmoid_focal_loss(x, t, 0.25, gamma, "mean"),
                             ref.mean(), "mean")


@pytest.mark.parametrize("layout", ["chw-weight", "expanded-scalar", "transposed-input",
                                    "strided-target"])
def test_weight_and_strides(backend, device, layout):
    skip_unless("sigmoid_focal", backend)
    x = make((2, 3, 5, 7), device=device)
    t = soft_targets((2, 3, 5, 7), device)
    w = torch.rand(3, 1, 1, device=device)
    if layout == "expanded-scalar":
        w = torch.rand(1, device=device).expand(2, 3, 5, 7)
    elif layout == "transposed-input":
        x = make((2, 3, 7, 5), device=device).transpose(2, 3)
    elif layout == "strided-target":
        t = soft_targets((2, 3, 5, 14), device)[..., ::2]
    for reduction in ("none", "mean"):
        got, g = grads_of(_sf(backend), x, t, 0.25, 2.0, reduction, weight=w)
        want, g_want = grads_of(reference.sigmoid_focal_loss, x, t, 0.25, 2.0, reduction,
                                weight=w)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(g, g_want, rtol=2e-5, atol=2e-5)


def test_target_and_weight_gradients_use_the_reference(backend, device):
    skip_unless("sigmoid_focal", backend)
    x = make((4, 6), device=device).requires_grad_()
    t = soft_targets((4, 6), device).requires_grad_()
    w = torch.rand(6, device=device).requires_grad_()
    loss = fusedloss.sigmoid_focal_loss(x, t, 0.25, 1.5, "mean", weight=w, backend=backend)
    gx, gt, gw = torch.autograd.grad(loss, (x, t, w))
    want = reference.sigmoid_focal_loss(x, t, 0.25, 1.5, "mean", weight=w)
    wx, wt, ww = torch.autograd.grad(want, (x, t, w))
    for a, b in ((loss, want), (gx, wx), (gt, wt), (gw, ww)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_upstream_gradient(backend, device):
    """'none' with a per-element upstream gradient; 'mean' with a scalar one other than 1."""
    skip_unless("sigmoid_focal", backend)
    x, t = make((5, 8), device=device), soft_targets((5, 8), device)
    up = torch.randn(5, 8, device=device)
    _, g = grads_of(_sf(backend), x, t, upstream=up)
    _, g_want = grads_of(reference.sigmoid_focal_loss, x, t, upstream=up)
    torch.testing.assert_close(g, g_want, rtol=2e-5, atol=2e-6)
    _, g = grads_of(_sf(backend), x, t, reduction="mean", upstream=torch.tensor(3.0))
    _, g_want = grads_of(reference.sigmoid_focal_loss, x, t, reduction="mean",
                         upstream=torch.tensor(3.0))
    torch.testing.assert_close(g, g_want, rtol=2e-5, atol=2e-7)


def test_module(backend, device):
    skip_unless("sigmoid_focal", backend)
    x, t = make((3, 10), device=device), soft_targets((3, 10), device)
    w = torch.rand(10, device=device)
    m = fusedloss.nn.SigmoidFocalLoss(alpha=0.5, gamma=1.0, reduction="sum", weight=w,
                                      backend=backend)
    assert "weight" in dict(m.named_buffers())
    torch.testing.assert_close(m(x, t), reference.sigmoid_focal_loss(x, t, 0.5, 1.0, "sum",
                                                                      weight=w))
    assert fusedloss.nn.SigmoidFocalLoss()(x, t).shape == x.shape  # torchvision's default 'none'


def test_sum_is_deterministic_across_threads():
    """The CPU skeleton's block sums: bitwise the same result for any thread count."""
    skip_unless("sigmoid_focal", "cpu")
    x = make((3, 70001))
    t = soft_targets((3, 70001))
    old = torch.get_num_threads()
    try:
        outs = []
        for n in thread_counts():
            torch.set_num_threads(n)
            outs.append(fusedloss.sigmoid_focal_loss(x, t, reduction="sum", backend="cpu"))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(o, outs[0]) for o in outs)
    want = reference.sigmoid_focal_loss(x.double(), t.double(), reduction="sum")
    torch.testing.assert_close(outs[0].double(), want, rtol=1e-6, atol=0)
