"""Numerical edge cases of cross_entropy on every fused backend, against torch and float64.

- An inf class weight on a class no target uses (1/count class balancing): without label
  smoothing no smoothing term may form 0 * inf; with it, torch's loss is inf and its gradient
  inf / NaN in a fixed pattern, which fusedloss must reproduce.
"""

import pytest
import torch
import torch.nn.functional as F

import fusedloss


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


def _loss_and_grad(fn, x, t, upstream=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, t, **kw)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), x.grad


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
