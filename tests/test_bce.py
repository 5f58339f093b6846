"""binary_cross_entropy_with_logits on every fused backend, beyond the generic checks of
tests/test_ops.py: torch's F.binary_cross_entropy_with_logits for every weight / pos_weight
broadcast, extreme logits, half precision by the 2x-torch rule, strides, the reference routing of
target / weight gradients, the module against torch's, and the deterministic 'sum'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _ew_common import grads_of, skip_unless, thread_counts

import fusedloss
from _support import assert_half_precision_ok, make, soft_targets
from fusedloss import reference

SHAPE = (2, 3, 5, 6)
WEIGHTS = {  # (weight shape, pos_weight shape) broadcast against (2, 3, 5, 6)
    "none": (None, None),
    "weight-full": (SHAPE, None),
    "weight-chw": ((3, 1, 1), None),
    "weight-1": ((1,), None),
    "pos_weight-c11": (None, (3, 1, 1)),
    "pos_weight-w": (None, (6,)),
    "both": ((2, 1, 5, 1), (6,)),
}


def _bce(backend):
    def fn(x, t, *args, **kw):
        return fusedloss.binary_cross_entropy_with_logits(x, t, *args, backend=backend, **kw)
    return fn


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_torch(backend, device, weights, reduction):
    skip_unless("bce", backend)
    ws, pws = WEIGHTS[weights]
    x = make(SHAPE, device=device)
    t = soft_targets(SHAPE, device)
    w = None if ws is None else torch.rand(ws, device=device) + 0.1
    pw = None if pws is None else torch.rand(pws, device=device) * 3
    got, g = grads_of(_bce(backend), x, t, w, reduction, pw)
    want = F.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    # the gradient against torch's in float64 (torch's float32 one is off by a few ulp itself)
    d = lambda a: None if a is None else a.double()  # noqa: E731
    _, g_want = grads_of(F.binary_cross_entropy_with_logits, x.double(), t.double(), d(w),
                         reduction=reduction, pos_weight=d(pw))
    atol = 2e-7 / x.numel() if reduction == "mean" else 2e-7
    torch.testing.assert_close(g.double(), g_want, rtol=2e-6, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [100.0, 1e4])
def test_extreme_logits(backend, device, dtype, magnitude):
    skip_unless("bce", backend)
    x = torch.tensor([magnitude, -magnitude] * 4, device=device).to(dtype)
    t = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.3, 0.3, 0.99, 0.01], device=device)
    pw = torch.tensor([2.0], device=device)
    for reduction in ("none", "sum"):
        got, g = grads_of(_bce(backend), x, t, None, reduction, pw)
        assert torch.isfinite(got).all() and torch.isfinite(g).all()
        want, g_want = grads_of(F.binary_cross_entropy_with_logits, x.double(), t.double(),
                                reduction=reduction, pos_weight=pw.double())
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(g.double(), g_want, rtol=tol, atol=tol)


def test_confident_logit_is_accurate(backend, device):
    """x = -20, t = 0: torch's (1 - t) x - logsigmoid(x) cancels in float32; ours does not."""
    skip_unless("bce", backend)
    x = torch.tensor([-20.0, 20.0, -30.0], device=device)
    t = torch.tensor([0.0, 1.0, 0.0], device=device)
    got = fusedloss.binary_cross_entropy_with_logits(x, t, reduction="none", backend=backend)
    xd, td = x.double(), t.double()
    want = (1 - td) * F.softplus(xd) + td * F.softplus(-xd)  # exact in float64 (no cancellation)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    torch_f32 = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    assert (torch_f32.double() - want).abs().max() > 1e-3 * want.min()  # torch's does cancel


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, device, dtype):
    skip_unless("bce", backend)
    x = make((8, 3, 33), dtype, device)
    t = soft_targets((8, 3, 33), device).to(dtype)
    pw = (torch.rand(33, device=device) * 3).to(dtype)
    for reduction in ("none", "mean"):
        got, g = grads_of(_bce(backend), x, t, None, reduction, pw)
        ref, g_ref = grads_of(F.binary_cross_entropy_with_logits, x.double(), t.double(),
                              reduction=reduction, pos_weight=pw.double())
        th, g_th = grads_of(F.binary_cross_entropy_with_logits, x, t, reduction=reduction,
                            pos_weight=pw)
        assert got.dtype == dtype
        assert_half_precision_ok(got, th, ref, f"{reduction} loss")
        assert_half_precision_ok(g, g_th, g_ref, f"{reduction} grad")


def test_mixed_dtypes(backend, device):
    """A float32 target / weight with a bfloat16 input: read in float32, as the reference."""
    skip_unless("bce", backend)
    x = make((4, 9), torch.bfloat16, device)
    t = soft_targets((4, 9), device)
    w = torch.rand(9, dtype=torch.float64, device=device)
    got, g = grads_of(_bce(backend), x, t, w, "none")
    want, g_want = grads_of(reference.binary_cross_entropy_with_logits, x, t, w, "none")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, g_want)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded-target", "channels-last"])
def test_strides(backend, device, layout):
    skip_unless("bce", backend)
    x, t = make(SHAPE, device=device), soft_targets(SHAPE, device)
    if layout == "transposed":
        x = make((2, 3, 6, 5), device=device).transpose(2, 3)
    elif layout == "sliced":
        x = make((2, 3, 5, 12), device=device)[..., 1::2]
    elif layout == "expanded-target":
        t = soft_targets((1, 3, 5, 6), device).expand(SHAPE)
    else:
        x = x.contiguous(memory_format=torch.channels_last)
    pw = torch.rand(3, 1, 1, device=device) * 2
    for reduction in ("none", "sum"):
        got, g = grads_of(_bce(backend), x, t, None, reduction, pw)
        want, g_want = grads_of(F.binary_cross_entropy_with_logits, x, t, reduction=reduction,
                                pos_weight=pw)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(g, g_want, rtol=2e-5, atol=1e-7)


def test_target_and_weight_gradients_use_the_reference(backend, device):
    """torch gives a gradient for target (not for weight / pos_weight): the fused path routes
    such calls to the reference, which gives all of them."""
    skip_unless("bce", backend)
    x = make((4, 6), device=device).requires_grad_()
    t = soft_targets((4, 6), device).requires_grad_()
    loss = fusedloss.binary_cross_entropy_with_logits(x, t, backend=backend)
    want = F.binary_cross_entropy_with_logits(x, t)
    torch.testing.assert_close(loss, want)
    for a, b in zip(torch.autograd.grad(loss, (x, t)), torch.autograd.grad(want, (x, t))):
        torch.testing.assert_close(a, b)
    w = torch.rand(4, 1, device=device).requires_grad_()
    pw = (torch.rand(6, device=device) * 2).requires_grad_()
    loss = fusedloss.binary_cross_entropy_with_logits(x, t.detach(), w, "sum", pw,
                                                      backend=backend)
    want = reference.binary_cross_entropy_with_logits(x, t.detach(), w, "sum", pw)
    for a, b in zip(torch.autograd.grad(loss, (x, w, pw)), torch.autograd.grad(want, (x, w, pw))):
        torch.testing.assert_close(a, b)


def test_upstream_gradient(backend, device):
    skip_unless("bce", backend)
    x, t = make((5, 8), device=device), soft_targets((5, 8), device)
    up = torch.randn(5, 8, device=device)
    _, g = grads_of(_bce(backend), x, t, None, "none", upstream=up)
    _, g_want = grads_of(F.binary_cross_entropy_with_logits, x, t, reduction="none", upstream=up)
    torch.testing.assert_close(g, g_want)
    _, g = grads_of(_bce(backend), x, t, upstream=torch.tensor(-2.0))
    _, g_want = grads_of(F.binary_cross_entropy_with_logits, x, t, upstream=torch.tensor(-2.0))
    torch.testing.assert_close(g, g_want)


def test_module_is_drop_in(backend, device):
    skip_unless("bce", backend)
    x, t = make((3, 4, 5), device=device), soft_targets((3, 4, 5), device)
    w, pw = torch.rand(4, 1, device=device), torch.rand(5, device=device) * 2
    ours = fusedloss.nn.BCEWithLogitsLoss(w, reduction="sum", pos_weight=pw, backend=backend)
    theirs = torch.nn.BCEWithLogitsLoss(w, reduction="sum", pos_weight=pw)
    assert set(dict(ours.named_buffers())) == set(dict(theirs.named_buffers()))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    ours64 = fusedloss.nn.BCEWithLogitsLoss(w, pos_weight=pw, backend=backend).double()
    assert ours64.weight.dtype == ours64.pos_weight.dtype == torch.float64
    torch.testing.assert_close(ours64(x.double(), t.double()),
                               F.binary_cross_entropy_with_logits(x.double(), t.double(),
                                                                  w.double(),
                                                                  pos_weight=pw.double()))
    assert fusedloss.nn.BCEWithLogitsLoss(reduce=False)(x, t).shape == x.shape  # legacy args


def test_sum_is_deterministic_across_threads():
    skip_unless("bce", "cpu")
    x, t = make((5, 40009)), soft_targets((5, 40009))
    pw = torch.rand(40009) * 2
    old = torch.get_num_threads()
    try:
        outs = []
        for n in thread_counts():
            torch.set_num_threads(n)
            outs.append(fusedloss.binary_cross_entropy_with_logits(x, t, None, "sum", pw,
                                                                   backend="cpu"))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(o, outs[0]) for o in outs)
    want = F.binary_cross_entropy_with_logits(x.double(), t.double(), reduction="sum",
                                              pos_weight=pw.double())
    torch.testing.assert_close(outs[0].double(), want, rtol=1e-6, atol=0)
