"""Ties fusedloss.reference (the executable spec) to torch and to the peers' published formulas.

Every expected number here is computed independently of the reference: by torch's own losses
(F.cross_entropy, F.linear_cross_entropy, F.binary_cross_entropy_with_logits), by a naive
transcription of a peer's formula, by Python loops, or by a closed-form gradient.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fusedloss import reference as R

F64 = torch.float64
TIGHT = dict(rtol=1e-11, atol=1e-12)
HALF_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0, dtype=F64, requires_grad=True):
    x = torch.randn(*shape, generator=gen(seed), dtype=F64) * scale
    return x.to(dtype).requires_grad_(requires_grad)


def value_and_grads(fn, inputs, seed=123):
    """fn(*inputs) and the gradients of <out, g> for a random upstream gradient g."""
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=gen(seed), dtype=out.dtype) if out.dim() else torch.ones(
        (), dtype=out.dtype)
    need = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, need, g, allow_unused=True)
    return out.detach(), grads


def assert_same(fn_ref, fn_exp, inputs, **tol):
    tol = tol or TIGHT
    v_ref, g_ref = value_and_grads(fn_ref, inputs)
    v_exp, g_exp = value_and_grads(fn_exp, inputs)
    assert v_ref.shape == v_exp.shape
    assert v_ref.dtype == v_exp.dtype
    torch.testing.assert_close(v_ref, v_exp, equal_nan=True, **tol)
    for a, b in zip(g_ref, g_exp):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


def index_target(shape, num_classes, seed=1, ignore_frac=0.0, ignore_index=-100):
    t = torch.randint(num_classes, shape, generator=gen(seed))
    if ignore_frac:
        mask = torch.rand(shape, generator=gen(seed + 1)) < ignore_frac
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return t


# ---------------------------------------------------------------------------------------------
# cross_entropy vs F.cross_entropy
# ---------------------------------------------------------------------------------------------

CE_SHAPES = [(7, 5), (2, 4, 3, 5), (3, 6, 4), (6,)]


@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_index_matches_torch(shape, use_weight, label_smoothing, reduction):
    C = shape[0] if len(shape) == 1 else shape[1]
    x = randn(*shape, scale=2.0)
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = index_target(tshape, C, ignore_frac=0.3 if len(shape) > 1 else 0.0)
    w = torch.rand(C, generator=gen(5), dtype=F64) + 0.1 if use_weight else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    assert_same(lambda x: R.cross_entropy(x, t, **kw), lambda x: F.cross_entropy(x, t, **kw), [x])


@pytest.mark.parametrize("ignore_index", [2, -1, 7])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_ignore_index_weight_and_smoothing_together(ignore_index, reduction):
    # pytorch#73205 / #69339: label smoothing + ignore_index + weight, incl. a valid class index
    C = 5
    x = randn(11, C, 3, scale=3.0)
    t = torch.randint(C, (11, 3), generator=gen(3))
    t[::3, 0] = ignore_index
    w = torch.rand(C, generator=gen(4), dtype=F64) + 0.2
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=0.2)
    assert_same(lambda x: R.cross_entropy(x, t, w, **kw),
                lambda x: F.cross_entropy(x, t, w, **kw), [x])


@pytest.mark.parametrize("shape", [(7, 5), (2, 4, 3, 5), (6,)])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_probabilities_match_torch(shape, use_weight, label_smoothing, reduction):
    C = shape[0] if len(shape) == 1 else shape[1]
    x = randn(*shape, scale=2.0)
    dim = 0 if len(shape) == 1 else 1
    t = torch.randn(shape, generator=gen(9), dtype=F64).softmax(dim)
    w = torch.rand(C, generator=gen(5), dtype=F64) + 0.1 if use_weight else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    assert_same(lambda x: R.cross_entropy(x, t, **kw), lambda x: F.cross_entropy(x, t, **kw), [x])


def test_cross_entropy_probabilities_mean_divides_by_rows_not_weights():
    x = randn(4, 3, 2, requires_grad=False)
    t = torch.rand(4, 3, 2, generator=gen(2), dtype=F64)
    w = torch.tensor([0.5, 2.0, 3.0], dtype=F64)
    logp = x.log_softmax(1)
    expected = -(t * logp * w.view(1, 3, 1)).sum() / 8
    torch.testing.assert_close(R.cross_entropy(x, t, w), expected, **TIGHT)


@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_all_ignored(use_weight, label_smoothing):
    x = randn(3, 5)
    t = torch.full((3,), -100)
    w = torch.rand(5, generator=gen(1), dtype=F64) if use_weight else None
    kw = dict(weight=w, label_smoothing=label_smoothing)
    mean = R.cross_entropy(x, t, **kw)
    assert torch.isnan(mean)
    (g,) = torch.autograd.grad(mean, x)
    (g_torch,) = torch.autograd.grad(F.cross_entropy(x, t, **kw), x)
    torch.testing.assert_close(g, g_torch)           # torch: NaN value, zero gradient
    assert torch.equal(g, torch.zeros_like(g))
    assert R.cross_entropy(x, t, reduction="sum", **kw).item() == 0.0
    assert torch.equal(R.cross_entropy(x, t, reduction="none", **kw).detach(),
                       torch.zeros(3, dtype=F64))


def test_cross_entropy_zero_total_weight_matches_torch_nan_gradient():
    x = randn(3, 5)
    t = torch.tensor([0, 1, 2])
    w = torch.zeros(5, dtype=F64)
    assert_same(lambda x: R.cross_entropy(x, t, w), lambda x: F.cross_entropy(x, t, w), [x])
    (g,) = torch.autograd.grad(R.cross_entropy(x, t, w), x)
    assert torch.isnan(g).all()


def test_cross_entropy_empty_batch():
    x = randn(0, 5)
    t = torch.zeros(0, dtype=torch.long)
    assert torch.isnan(R.cross_entropy(x, t))
    assert R.cross_entropy(x, t, reduction="sum").item() == 0.0
    assert R.cross_entropy(x, t, reduction="none").shape == (0,)


def test_cross_entropy_non_contiguous_class_dim():
    base = randn(2, 3, 4, 6, requires_grad=False)
    x = base.permute(0, 3, 1, 2).requires_grad_(True)      # (2, 6, 3, 4), not contiguous
    assert not x.is_contiguous()
    t = index_target((2, 3, 4), 6, ignore_frac=0.2)
    assert_same(lambda x: R.cross_entropy(x, t, reduction="none"),
                lambda x: F.cross_entropy(x, t, reduction="none"), [x])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cross_entropy_low_precision_dtype_and_accuracy(dtype):
    x = randn(64, 33, scale=3.0, dtype=dtype)
    t = index_target((64,), 33, ignore_frac=0.2)
    loss = R.cross_entropy(x, t, label_smoothing=0.1)
    assert loss.dtype == dtype
    exact = F.cross_entropy(x.detach().double(), t, label_smoothing=0.1)
    # computed in float32 from the rounded inputs: only the final rounding to dtype remains
    eps = torch.finfo(dtype).eps
    assert abs(loss.double() - exact).item() <= eps * abs(exact).item() + 1e-6
    (g,) = torch.autograd.grad(loss, x)
    assert g.dtype == dtype and torch.isfinite(g).all()


def test_cross_entropy_out_of_range_target_raises():
    x = randn(3, 5)
    with pytest.raises(IndexError, match="5"):
        R.cross_entropy(x, torch.tensor([0, 5, 1]))
    with pytest.raises(IndexError, match="-3"):
        R.cross_entropy(x, torch.tensor([0, -3, 1]))


def test_cross_entropy_inplace_backward_is_accepted_and_ignored():
    leaf = randn(4, 7)
    x = leaf * 1  # a leaf that requires grad is refused, as by the fused kernels
    t = index_target((4,), 7)
    before = x.detach().clone()
    a = R.cross_entropy(x, t, inplace_backward=True)
    b = F.cross_entropy(x, t)
    torch.testing.assert_close(a, b, **TIGHT)
    a.backward()
    assert torch.equal(x.detach(), before)


# ---------------------------------------------------------------------------------------------
# z_loss, softcap, return_lse against hand formulas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_z_loss_hand_formula(use_weight, reduction):
    C, z = 6, 1e-2
    x = randn(9, C, scale=4.0)
    t = index_target((9,), C, ignore_frac=0.3)
    w = torch.rand(C, generator=gen(7), dtype=F64) + 0.5 if use_weight else None

    def hand(x):
        valid = t != -100
        y = t.clamp(min=0)
        wy = (w[y] if w is not None else torch.ones(9, dtype=F64)) * valid
        lse = torch.log(torch.exp(x).sum(1))
        rows = wy * (lse - x.gather(1, y[:, None])[:, 0]) + z * wy * lse ** 2
        if reduction == "none":
            return rows
        return rows.sum() if reduction == "sum" else rows.sum() / wy.sum()

    assert_same(lambda x: R.cross_entropy(x, t, w, reduction=reduction, z_loss=z), hand, [x])


def test_z_loss_probability_targets_hand_formula():
    x = randn(5, 4, scale=3.0)
    t = torch.rand(5, 4, generator=gen(3), dtype=F64).softmax(1)
    lse = torch.log(torch.exp(x.detach()).sum(1))
    expected = (-(t * (x.detach() - lse[:, None])).sum(1) + 0.1 * lse ** 2).mean()
    torch.testing.assert_close(R.cross_entropy(x, t, z_loss=0.1), expected, **TIGHT)


@pytest.mark.parametrize("softcap", [1.0, 5.0, 30.0])
def test_softcap_hand_formula(softcap):
    x = randn(3, 7, 2, scale=10.0)
    t = index_target((3, 2), 7, ignore_frac=0.2)
    assert_same(
        lambda x: R.cross_entropy(x, t, reduction="none", softcap=softcap, label_smoothing=0.1),
        lambda x: F.cross_entropy(softcap * torch.tanh(x / softcap), t, reduction="none",
                                  label_smoothing=0.1),
        [x])


@pytest.mark.parametrize("dtype", [F64] + list(HALF_DTYPES))
@pytest.mark.parametrize("shape", [(5, 8), (2, 8, 3), (8,)])
def test_return_lse(dtype, shape):
    x = randn(*shape, scale=5.0, dtype=dtype)
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = index_target(tshape, 8, ignore_frac=0.5 if tshape else 0.0)
    loss, lse = R.cross_entropy(x, t, reduction="none", return_lse=True)
    acc = F64 if dtype == F64 else torch.float32
    assert lse.dtype == acc and lse.shape == loss.shape == tshape
    assert not lse.requires_grad
    dim = 0 if len(shape) == 1 else 1
    expected = torch.logsumexp(x.detach().to(acc), dim=dim)   # every row, ignored ones too
    torch.testing.assert_close(lse, expected, rtol=1e-6 if acc == torch.float32 else 1e-13, atol=0)
    _, lse_cap = R.cross_entropy(x, t, softcap=2.0, return_lse=True)
    torch.testing.assert_close(lse_cap,
                               torch.logsumexp(2.0 * torch.tanh(x.detach().to(acc) / 2.0), dim),
                               rtol=1e-6 if acc == torch.float32 else 1e-13, atol=0)


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_linear_cross_entropy_matches_torch(use_bias, use_weight, label_smoothing, reduction):
    N, H, V = 10, 6, 13
    x, W = randn(N, H, seed=1), randn(V, H, seed=2)
    b = randn(V, seed=3)
    t = index_target((N,), V, ignore_frac=0.3)
    w = torch.rand(V, generator=gen(4), dtype=F64) + 0.1 if use_weight else None
    kw = dict(weight=w, reduction=reduction, ignore_index=-100, label_smoothing=label_smoothing)
    bias = b if use_bias else None
    inputs = [x, W] + ([b] if use_bias else [])
    assert_same(lambda x, W, *b: R.linear_cross_entropy(x, W, t, linear_bias=bias, **kw),
                lambda x, W, *b: F.linear_cross_entropy(x, W, t, linear_bias=bias, **kw), inputs)
    # and against the explicit matmul + cross_entropy
    assert_same(lambda x, W, *b: R.linear_cross_entropy(x, W, t, linear_bias=bias, **kw),
                lambda x, W, *b: F.cross_entropy(x @ W.T + (b[0] if b else 0), t, **kw), inputs)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_linear_cross_entropy_batched_3d(reduction):
    B, T, H, V = 2, 5, 4, 9
    x, W, b = randn(B, T, H, seed=1), randn(V, H, seed=2), randn(V, seed=3)
    t = index_target((B, T), V, ignore_frac=0.2)

    def explicit(x, W, b):
        logits = x @ W.T + b
        out = F.cross_entropy(logits.reshape(-1, V), t.reshape(-1), reduction=reduction,
                              label_smoothing=0.1)
        return out.reshape(B, T) if reduction == "none" else out

    out = R.linear_cross_entropy(x, W, t, linear_bias=b, reduction=reduction, label_smoothing=0.1)
    if reduction == "none":
        assert out.shape == t.shape
    assert_same(lambda x, W, b: R.linear_cross_entropy(x, W, t, linear_bias=b, reduction=reduction,
                                                        label_smoothing=0.1),
                explicit, [x, W, b])


def test_linear_cross_entropy_unbatched_probs_and_extras():
    H, V = 4, 7
    x, W = randn(H, seed=1), randn(V, H, seed=2)
    t = torch.tensor(3)
    assert_same(lambda x, W: R.linear_cross_entropy(x, W, t, reduction="none"),
                lambda x, W: F.cross_entropy(W @ x, t, reduction="none"), [x, W])
    xb = randn(3, 2, H, seed=4)
    p = torch.rand(3, 2, V, generator=gen(5), dtype=F64).softmax(-1)
    assert_same(lambda x, W: R.linear_cross_entropy(x, W, p, reduction="none"),
                lambda x, W: F.cross_entropy((x @ W.T).reshape(6, V), p.reshape(6, V),
                                             reduction="none").reshape(3, 2), [xb, W])
    ti = index_target((3, 2), V, ignore_frac=0.3)
    assert_same(
        lambda x, W: R.linear_cross_entropy(x, W, ti, z_loss=1e-2, softcap=3.0, chunk_size=2),
        lambda x, W: R.cross_entropy((x @ W.T).reshape(6, V), ti.reshape(6), z_loss=1e-2,
                                     softcap=3.0),
        [xb, W])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_cross_entropy_half_returns_input_dtype(dtype):
    x, W = randn(8, 16, dtype=dtype), randn(32, 16, seed=2, dtype=dtype)
    t = index_target((8,), 32)
    loss = R.linear_cross_entropy(x, W, t)
    assert loss.dtype == dtype
    exact = F.cross_entropy(x.detach().double() @ W.detach().double().T, t)
    torch.testing.assert_close(loss.double(), exact, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# sigmoid_focal_loss vs torchvision's formula (written out naively here)
# ---------------------------------------------------------------------------------------------


def torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
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


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("alpha", [0.25, -1.0, 0.9])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.5])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_matches_torchvision(soft, alpha, gamma, reduction):
    x = randn(4, 3, 5, scale=3.0)
    if soft:
        t = torch.rand(4, 3, 5, generator=gen(2), dtype=F64)
        t[0, 0] = 0.0
        t[0, 1] = 1.0
    else:
        t = (torch.rand(4, 3, 5, generator=gen(2)) < 0.3).to(F64)
    assert_same(lambda x: R.sigmoid_focal_loss(x, t, alpha, gamma, reduction),
                lambda x: torchvision_sigmoid_focal_loss(x, t, alpha, gamma, reduction), [x],
                rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("wshape", [(3, 1), (5,), (4, 3, 5)])
def test_sigmoid_focal_weight(wshape):
    x = randn(4, 3, 5, scale=2.0)
    t = (torch.rand(4, 3, 5, generator=gen(2)) < 0.5).to(F64)
    w = torch.rand(wshape, generator=gen(3), dtype=F64)
    for reduction in ("none", "mean", "sum"):
        def expected(x, reduction=reduction):
            loss = torchvision_sigmoid_focal_loss(x, t) * w
            return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
        assert_same(lambda x, reduction=reduction: R.sigmoid_focal_loss(x, t, reduction=reduction,
                                                                         weight=w),
                    expected, [x], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_sigmoid_focal_gradient_matches_closed_form(gamma):
    # ANCHORS.md, hard targets: s = 2t - 1, z = s x,
    # dL/dx = -s a_t sigmoid(-z)^gamma [sigmoid(-z) + gamma sigmoid(z) softplus(-z)]
    x = torch.linspace(-40, 40, 81, dtype=F64).requires_grad_(True)
    t = (torch.arange(81) % 2).to(F64)
    alpha = 0.25
    (g,) = torch.autograd.grad(R.sigmoid_focal_loss(x, t, alpha, gamma, "sum"), x)
    s, z = 2 * t - 1, (2 * t - 1) * x.detach()
    a_t = alpha * t + (1 - alpha) * (1 - t)
    expected = -s * a_t * torch.sigmoid(-z) ** gamma * (
        torch.sigmoid(-z) + gamma * torch.sigmoid(z) * F.softplus(-z, threshold=1000))
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-300)


def test_sigmoid_focal_soft_gradient_matches_closed_form():
    # ANCHORS.md, soft targets: q = t sigmoid(-x) + (1-t) sigmoid(x), CE = softplus(x) - t x,
    # dL/dx = a_t q^gamma [(p - t) - gamma (2t - 1) (sigmoid(x) sigmoid(-x) / q) CE]
    x = torch.linspace(-30, 30, 61, dtype=F64).requires_grad_(True)
    t = torch.rand(61, generator=gen(4), dtype=F64)
    alpha, gamma = 0.25, 1.5
    (g,) = torch.autograd.grad(R.sigmoid_focal_loss(x, t, alpha, gamma, "sum"), x)
    xd = x.detach()
    sp, sn = torch.sigmoid(xd), torch.sigmoid(-xd)
    q = t * sn + (1 - t) * sp
    ce = F.softplus(xd, threshold=1000) - t * xd
    a_t = alpha * t + (1 - alpha) * (1 - t)
    expected = a_t * q ** gamma * (((1 - t) * sp - t * sn)
                                   - gamma * (2 * t - 1) * (sp * sn / q) * ce)
    torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 2.0])
def test_sigmoid_focal_finite_at_extreme_logits(dtype, gamma):
    # kornia#918 (NaN grads for gamma in (0,1) at +-100), kornia#2115, mmcv#1488 (fp16 at 9.39)
    x = torch.tensor([-100.0, 100.0, -100.0, 100.0, 9.39, -9.39, 100.0, -100.0, 0.0],
                     dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.3, 0.7, 1.0], dtype=dtype)
    loss = R.sigmoid_focal_loss(x, t, gamma=gamma)
    assert loss.dtype == dtype
    assert torch.isfinite(loss).all()
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(g).all()
    # confidently wrong: q ~ 1, loss ~ a_t * 100; confidently right: loss ~ 0
    assert loss[2].float().item() == pytest.approx(0.25 * 100, rel=1e-2)
    assert loss[3].float().item() == pytest.approx(0.75 * 100, rel=1e-2)
    assert abs(loss[0].float().item()) < 1e-6 and abs(loss[1].float().item()) < 1e-6
    assert g[2].float().item() == pytest.approx(-0.25, rel=1e-2)
    assert g[3].float().item() == pytest.approx(0.75, rel=1e-2)


def test_sigmoid_focal_gamma_zero_is_alpha_weighted_bce():
    x = randn(50, scale=20.0)
    t = torch.rand(50, generator=gen(1), dtype=F64)
    assert_same(lambda x: R.sigmoid_focal_loss(x, t, 0.3, 0.0),
                lambda x: (0.3 * t + 0.7 * (1 - t)) * F.binary_cross_entropy_with_logits(
                    x, t, reduction="none"), [x])


# ---------------------------------------------------------------------------------------------
# softmax_focal_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(9, 5), (2, 5, 3, 4)])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_softmax_focal_gamma_zero_is_cross_entropy(shape, use_weight, reduction):
    x = randn(*shape, scale=3.0)
    t = index_target((shape[0],) + shape[2:], shape[1], ignore_frac=0.3)
    w = torch.rand(shape[1], generator=gen(3), dtype=F64) + 0.1 if use_weight else None
    assert_same(lambda x: R.softmax_focal_loss(x, t, 0.0, w, reduction=reduction),
                lambda x: F.cross_entropy(x, t, w, reduction=reduction), [x])
    assert torch.equal(R.softmax_focal_loss(x, t, 0.0, w, reduction=reduction),
                       R.cross_entropy(x, t, w, reduction=reduction))


def naive_softmax_focal(x, t, gamma, w=None, ignore_index=-100, reduction="mean"):
    p = torch.softmax(x, 1)
    valid = t != ignore_index
    y = torch.where(valid, t, 0)
    p_y = p.gather(1, y.unsqueeze(1)).squeeze(1)
    wy = (w[y] if w is not None else torch.ones_like(p_y)) * valid
    loss = -wy * (1 - p_y) ** gamma * torch.log(p_y)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / wy.sum()


@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_softmax_focal_matches_naive(gamma, reduction):
    x = randn(3, 6, 4, scale=2.0)
    t = index_target((3, 4), 6, ignore_frac=0.25, ignore_index=1)
    w = torch.rand(6, generator=gen(3), dtype=F64) + 0.1
    assert_same(lambda x: R.softmax_focal_loss(x, t, gamma, w, 1, reduction),
                lambda x: naive_softmax_focal(x, t, gamma, w, 1, reduction), [x],
                rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_softmax_focal_gradient_closed_form_confident(gamma):
    # ANCHORS.md: dL/dx_j = B (delta_jk - p_j), B = -q^gamma (1 + gamma p_k (-l_k) / q_k)
    x = randn(6, 4, scale=1.0).detach()
    x[:, 0] += torch.tensor([0.0, 5.0, 15.0, 25.0, 35.0, 36.0], dtype=F64)  # p_y -> 1
    x.requires_grad_(True)
    t = torch.zeros(6, dtype=torch.long)
    (g,) = torch.autograd.grad(R.softmax_focal_loss(x, t, gamma, reduction="sum"), x)
    logp = x.detach().log_softmax(1)
    p = logp.exp()
    lk = logp[:, 0]
    qk = -torch.expm1(lk)
    B = -qk ** gamma * (1 + gamma * p[:, 0] * (-lk) / qk)
    expected = B[:, None] * (F.one_hot(t, 4).to(F64) - p)
    torch.testing.assert_close(g, expected, rtol=1e-8, atol=1e-300)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_softmax_focal_finite_when_p_is_one(dtype, gamma):
    x = torch.tensor([[200.0, 0.0, 0.0], [-200.0, 0.0, 0.0], [100.0, -100.0, 0.0]], dtype=dtype,
                     requires_grad=True)
    t = torch.tensor([0, 0, 1])
    loss = R.softmax_focal_loss(x, t, gamma, reduction="none")
    assert loss.dtype == dtype
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert loss[0].item() == 0.0
    assert loss[1].float().item() == pytest.approx(200.0, rel=1e-2)
    assert loss[2].float().item() == pytest.approx(200.0, rel=1e-2)


def test_softmax_focal_all_ignored_mean_is_nan():
    x = randn(4, 3)
    t = torch.full((4,), -100)
    loss = R.softmax_focal_loss(x, t)
    assert torch.isnan(loss)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.equal(g, torch.zeros_like(g))


# ---------------------------------------------------------------------------------------------
# binary_cross_entropy_with_logits vs torch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wshape", [None, (3, 1, 1), (5, 6), (4, 3, 5, 6), (1,)])
@pytest.mark.parametrize("pwshape", [None, (3, 1, 1), (6,)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_matches_torch(wshape, pwshape, reduction):
    x = randn(4, 3, 5, 6, scale=4.0)
    t = torch.rand(4, 3, 5, 6, generator=gen(2), dtype=F64)
    t[0] = t[0].round()
    w = torch.rand(wshape, generator=gen(3), dtype=F64) if wshape else None
    pw = torch.rand(pwshape, generator=gen(4), dtype=F64) * 3 if pwshape else None
    kw = dict(weight=w, reduction=reduction, pos_weight=pw)  # torch: no grad for weight, pos_weight
    assert_same(lambda x: R.binary_cross_entropy_with_logits(x, t, **kw),
                lambda x: F.binary_cross_entropy_with_logits(x, t, **kw), [x])


def test_bce_hand_values():
    x = torch.tensor([0.0, 2.0, -3.0], dtype=F64)
    t = torch.tensor([1.0, 0.0, 0.25], dtype=F64)
    pw = torch.tensor([2.0, 2.0, 2.0], dtype=F64)
    sp = lambda v: math.log1p(math.exp(v))
    # -pw t log p - (1 - t) log(1 - p) = pw t softplus(-x) + (1 - t) softplus(x)
    expected = [2 * sp(0.0), sp(2.0), 2 * 0.25 * sp(3.0) + 0.75 * sp(-3.0)]
    out = R.binary_cross_entropy_with_logits(x, t, reduction="none", pos_weight=pw)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=F64), **TIGHT)


def test_bce_size_mismatch_value_error_like_torch():
    x = torch.randn(3, 5)
    t = torch.rand(3, 4)
    with pytest.raises(ValueError) as torch_err:
        F.binary_cross_entropy_with_logits(x, t)
    with pytest.raises(ValueError) as ref_err:
        R.binary_cross_entropy_with_logits(x, t)
    assert str(ref_err.value) == str(torch_err.value)
    with pytest.raises(ValueError, match="Target size"):
        R.binary_cross_entropy_with_logits(x, torch.rand(5))    # broadcastable is not enough


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_bce_low_precision(dtype):
    x = randn(100, scale=10.0, dtype=dtype)
    t = torch.rand(100, generator=gen(1)).to(dtype)
    loss = R.binary_cross_entropy_with_logits(x, t)
    assert loss.dtype == dtype
    exact = F.binary_cross_entropy_with_logits(x.detach().double(), t.double())
    torch.testing.assert_close(loss.double(), exact, rtol=torch.finfo(dtype).eps, atol=0)


# ---------------------------------------------------------------------------------------------
# total_variation vs loops
# ---------------------------------------------------------------------------------------------


def tv_loops(x, w, norm, eps):
    """Per-image TV by plain Python loops over pixels."""
    H, W = x.shape[-2:]
    batch = x.shape[:-2]
    out = torch.zeros(batch, dtype=F64)
    w = torch.ones_like(x) if w is None else w.expand(x.shape)
    for idx in itertools.product(*[range(s) for s in batch]):
        img, wi = x[idx].tolist(), w[idx].tolist()
        total = 0.0
        for i in range(H):
            for j in range(W):
                dv = img[i + 1][j] - img[i][j] if i + 1 < H else 0.0
                dh = img[i][j + 1] - img[i][j] if j + 1 < W else 0.0
                if norm == "l1":
                    total += wi[i][j] * (abs(dv) + abs(dh))
                elif norm == "l2_squared":
                    total += wi[i][j] * (dv * dv + dh * dh)
                else:
                    total += wi[i][j] * math.sqrt(dv * dv + dh * dh + eps)
        out[idx] = total
    return out


@pytest.mark.parametrize("norm,eps", [("l1", 0.0), ("l2_squared", 0.0), ("isotropic", 0.0),
                                      ("isotropic", 1e-3)])
@pytest.mark.parametrize("wshape", [None, (4, 5), (3, 1, 1), (2, 3, 4, 5)])
def test_total_variation_matches_loops(norm, eps, wshape):
    x = randn(2, 3, 4, 5, requires_grad=False)
    x[0, 0, 1:3, 1:4] = 0.7   # a flat patch: zero differences
    w = torch.rand(wshape, generator=gen(3), dtype=F64) if wshape else None
    per_image = tv_loops(x, w, norm, eps)
    out = R.total_variation(x, w, norm=norm, eps=eps, reduction="none")
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, per_image, **TIGHT)
    torch.testing.assert_close(R.total_variation(x, w, norm=norm, eps=eps, reduction="sum"),
                               per_image.sum(), **TIGHT)
    torch.testing.assert_close(R.total_variation(x, w, norm=norm, eps=eps),
                               per_image.sum() / x.numel(), **TIGHT)


@pytest.mark.parametrize("shape", [(4, 6), (3, 4, 6), (2, 1, 4, 6)])
def test_total_variation_kornia_per_image(shape):
    # kornia.losses.total_variation(img, reduction="sum"): per-image anisotropic L1
    img = randn(*shape, requires_grad=False)
    pixel_dif1 = img[..., 1:, :] - img[..., :-1, :]
    pixel_dif2 = img[..., :, 1:] - img[..., :, :-1]
    kornia = pixel_dif1.abs().sum(dim=(-2, -1)) + pixel_dif2.abs().sum(dim=(-2, -1))
    out = R.total_variation(img, reduction="none")
    assert out.shape == shape[:-2]
    torch.testing.assert_close(out, kornia, **TIGHT)


def test_total_variation_l1_gradient_closed_form():
    # sgn(x_ij - x_{i-1,j}) - sgn(x_{i+1,j} - x_ij) + the horizontal pair, sgn(0) = 0
    x = randn(5, 6)
    (g,) = torch.autograd.grad(R.total_variation(x, reduction="sum"), x)
    xd = x.detach()
    dv = torch.sign(xd[1:, :] - xd[:-1, :])
    dh = torch.sign(xd[:, 1:] - xd[:, :-1])
    expected = torch.zeros_like(xd)
    expected[1:, :] += dv
    expected[:-1, :] -= dv
    expected[:, 1:] += dh
    expected[:, :-1] -= dh
    torch.testing.assert_close(g, expected, **TIGHT)


@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_total_variation_isotropic_gradient_closed_form(eps):
    # -(dv_ij + dh_ij) / n_ij + dv_{i-1,j} / n_{i-1,j} + dh_{i,j-1} / n_{i,j-1}
    x = randn(4, 5)
    (g,) = torch.autograd.grad(R.total_variation(x, norm="isotropic", eps=eps, reduction="sum"), x)
    xd = x.detach()
    H, W = xd.shape
    dv = torch.zeros_like(xd)
    dh = torch.zeros_like(xd)
    dv[:-1] = xd[1:] - xd[:-1]
    dh[:, :-1] = xd[:, 1:] - xd[:, :-1]
    n = torch.sqrt(dv ** 2 + dh ** 2 + eps)
    a, b = dv / n, dh / n
    if eps == 0.0:
        a[-1, -1] = b[-1, -1] = 0.0      # n = 0 at the last pixel: gradient 0
    expected = -(a + b)
    expected[1:] += a[:-1]
    expected[:, 1:] += b[:, :-1]
    torch.testing.assert_close(g, expected, **TIGHT)


@pytest.mark.parametrize("dtype", [F64] + list(HALF_DTYPES))
def test_total_variation_isotropic_zero_norm_gradient_is_zero(dtype):
    x = torch.full((2, 4, 5), 0.3, dtype=dtype, requires_grad=True)
    loss = R.total_variation(x, norm="isotropic")
    assert loss.item() == 0.0 and loss.dtype == dtype
    (g,) = torch.autograd.grad(loss, x)
    assert torch.equal(g, torch.zeros_like(g))
    y = randn(4, 5).detach()
    y[1:3, 1:3] = 1.0       # flat patch inside a random image: finite gradients
    y.requires_grad_(True)
    (gy,) = torch.autograd.grad(R.total_variation(y, norm="isotropic"), y)
    assert torch.isfinite(gy).all()


def test_total_variation_gradcheck():
    x = randn(2, 3, 4)
    w = torch.rand(3, 4, generator=gen(1), dtype=F64)
    for norm, eps in (("l2_squared", 0.0), ("isotropic", 1e-3)):
        assert torch.autograd.gradcheck(
            lambda x, norm=norm, eps=eps: R.total_variation(x, w, norm=norm, eps=eps,
                                                            reduction="none"), (x,))


# ---------------------------------------------------------------------------------------------
# bad input: ValueError / TypeError naming the argument
# ---------------------------------------------------------------------------------------------

_x = torch.randn(4, 5)
_t = torch.tensor([0, 1, 2, 3])
_b = torch.rand(4, 5)
_W = torch.randn(7, 5)
_img = torch.randn(2, 4, 4)

BAD = [
    (lambda: R.cross_entropy(_x, _t, reduction="avg"), ValueError, "reduction"),
    (lambda: R.cross_entropy(_x, _t, reduction=None), ValueError, "reduction"),
    (lambda: R.cross_entropy(_x, _t, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda: R.cross_entropy(_x, _t, label_smoothing=-0.1), ValueError, "label_smoothing"),
    (lambda: R.cross_entropy(_x, _t, z_loss=-1.0), ValueError, "z_loss"),
    (lambda: R.cross_entropy(_x, _t, softcap=0.0), ValueError, "softcap"),
    (lambda: R.cross_entropy(_x, _t, softcap=-2.0), ValueError, "softcap"),
    (lambda: R.cross_entropy(_x, _t, softcap="3"), TypeError, "softcap"),
    (lambda: R.cross_entropy(_x, _t.int()), TypeError, "target"),
    (lambda: R.cross_entropy(_x, _t.bool()), TypeError, "target"),
    (lambda: R.cross_entropy(_x, _t[:3]), ValueError, "target"),
    (lambda: R.cross_entropy(_x, torch.rand(4, 4)), ValueError, "target"),
    (lambda: R.cross_entropy(_x, _t, weight=torch.ones(4)), ValueError, "weight"),
    (lambda: R.cross_entropy(_x, _t, weight=torch.ones(5, dtype=torch.long)), TypeError, "weight"),
    (lambda: R.cross_entropy(_x, _t, ignore_index=1.5), TypeError, "ignore_index"),
    (lambda: R.cross_entropy(_x.long(), _t), TypeError, "input"),
    (lambda: R.cross_entropy(_x.numpy(), _t), TypeError, "input"),
    (lambda: R.cross_entropy(torch.tensor(1.0), torch.tensor(0)), ValueError, "input"),
    (lambda: R.cross_entropy(_x, _t, return_lse=1), TypeError, "return_lse"),
    (lambda: R.linear_cross_entropy(_x, _W[:, :4], _t), ValueError, "linear_weight"),
    (lambda: R.linear_cross_entropy(_x, _W.double(), _t), TypeError, "linear_weight"),
    (lambda: R.linear_cross_entropy(_x, _W, _t, linear_bias=torch.ones(6)), ValueError,
     "linear_bias"),
    (lambda: R.linear_cross_entropy(_x, _W, _t[:2]), ValueError, "target"),
    (lambda: R.linear_cross_entropy(_x, _W, _t, chunk_size=0), ValueError, "chunk_size"),
    (lambda: R.linear_cross_entropy(_x, _W, _t, reduction="max"), ValueError, "reduction"),
    (lambda: R.linear_cross_entropy(_x, _W, _t, label_smoothing=2.0), ValueError,
     "label_smoothing"),
    (lambda: R.sigmoid_focal_loss(_x, _b, gamma=-1.0), ValueError, "gamma"),
    (lambda: R.sigmoid_focal_loss(_x, _b, alpha=None), TypeError, "alpha"),
    (lambda: R.sigmoid_focal_loss(_x, _b[:2]), ValueError, "target"),
    (lambda: R.sigmoid_focal_loss(_x, _b.long()), TypeError, "target"),
    (lambda: R.sigmoid_focal_loss(_x, _b, reduction="batch"), ValueError, "reduction"),
    (lambda: R.sigmoid_focal_loss(_x, _b, weight=torch.ones(3)), ValueError, "weight"),
    (lambda: R.sigmoid_focal_loss(_x, _b, weight=torch.ones(2, 4, 5)), ValueError, "weight"),
    (lambda: R.softmax_focal_loss(_x, _t, gamma=-0.5), ValueError, "gamma"),
    (lambda: R.softmax_focal_loss(_x, _b), TypeError, "target"),
    (lambda: R.softmax_focal_loss(_x[0], _t[0]), ValueError, "input"),
    (lambda: R.softmax_focal_loss(_x, _t, weight=torch.ones(3)), ValueError, "weight"),
    (lambda: R.softmax_focal_loss(_x, _t, reduction="all"), ValueError, "reduction"),
    (lambda: R.binary_cross_entropy_with_logits(_x, _b, weight=torch.ones(3)), ValueError,
     "weight"),
    (lambda: R.binary_cross_entropy_with_logits(_x, _b, pos_weight=torch.ones(4)), ValueError,
     "pos_weight"),
    (lambda: R.binary_cross_entropy_with_logits(_x, _b.long()), TypeError, "target"),
    (lambda: R.binary_cross_entropy_with_logits(_x, _b, reduction="x"), ValueError, "reduction"),
    (lambda: R.total_variation(_img, norm="l2"), ValueError, "norm"),
    (lambda: R.total_variation(_img, norm="isotropic", eps=-1.0), ValueError, "eps"),
    (lambda: R.total_variation(_img, eps=1e-3), ValueError, "eps"),
    (lambda: R.total_variation(torch.randn(5)), ValueError, "input"),
    (lambda: R.total_variation(_img, torch.ones(3, 4)), ValueError, "weight"),
    (lambda: R.total_variation(_img, reduction="avg"), ValueError, "reduction"),
]


@pytest.mark.parametrize("call,exc,name", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_arguments_raise_naming_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
