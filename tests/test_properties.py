"""Property tests (hypothesis): random shapes, strides, dtypes, reductions, weights and ignore
patterns, every public loss on the CPU kernels against the reference, values and gradients.

The example tables of tests/_support.py pick the cases someone thought of; these draw the ones
nobody did (a class dim of 1, a weight broadcast over one odd dimension, an all-ignored spatial
row, a transposed input). Derandomized, so that a CI failure reproduces; a failing example is
printed as the call to paste into a test.
"""

from __future__ import annotations

import pytest
import torch

import fusedloss
from _support import assert_close, loss_and_grads
from fusedloss import reference

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
given, settings, HealthCheck = hypothesis.given, hypothesis.settings, hypothesis.HealthCheck

EXAMPLES = 300  # per loss (the issue: a few hundred); the drawn calls are small, about 5 ms each
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pytestmark = pytest.mark.skipif(not fusedloss.backends()["cpu"]["available"],
                                reason="fusedloss._C CPU kernels not built")

DTYPES = st.sampled_from([torch.float32, torch.float64])
REDUCTIONS = st.sampled_from(["none", "mean", "sum"])


def _tensor(draw, shape, dtype, scale=3.0):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _layout(draw, x):
    """The same values in another layout: as is, transposed-and-back (non-contiguous, dense) or
    every stride doubled."""
    how = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if how == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "strided" and x.dim() >= 1:
        buf = torch.empty(x.shape + (2,), dtype=x.dtype)
        buf[..., 0] = x
        return buf[..., 0]
    return x


def _compare(fused, ref, args, kwargs, dtype, grad_args=(0,), upstream_seed=0):
    got, g_got = loss_and_grads(fused, args, {**kwargs, "backend": "cpu"}, grad_args)
    up = None
    if got.dim():
        up = torch.randn(got.shape, generator=torch.Generator().manual_seed(upstream_seed),
                         dtype=torch.float64).to(got.dtype)
        got, g_got = loss_and_grads(fused, args, {**kwargs, "backend": "cpu"}, grad_args, up)
    want, g_want = loss_and_grads(ref, args, kwargs, grad_args, up)
    assert_close(got, want, dtype, "loss")
    for a, b in zip(g_got, g_want):
        assert_close(a, b, dtype, "grad")


def _class_case(draw, max_c=40):
    """(input (N, C, *spatial), target, dtype, reduction, weight, ignore_index)."""
    dtype = draw(DTYPES)
    n = draw(st.integers(1, 5))
    c = draw(st.integers(1, max_c))
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
    x = _layout(draw, _tensor(draw, (n, c) + spatial, dtype))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.randint(0, c, (n,) + spatial, generator=g)
    ignore_index = draw(st.sampled_from([-100, 0, -1]))
    frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
    t[torch.rand(t.shape, generator=g) < frac] = ignore_index
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.1).to(dtype) \
        if draw(st.booleans()) else None
    return x, t, dtype, draw(REDUCTIONS), weight, ignore_index


@SETTINGS
@given(st.data())
def test_cross_entropy(data):
    x, t, dtype, reduction, weight, ignore_index = _class_case(data.draw)
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
              label_smoothing=data.draw(st.sampled_from([0.0, 0.1])))
    _compare(fusedloss.cross_entropy, reference.cross_entropy, (x, t), kw, dtype)


@SETTINGS
@given(st.data())
def test_softmax_focal_loss(data):
    x, t, dtype, reduction, weight, ignore_index = _class_case(data.draw)
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
              gamma=data.draw(st.sampled_from([0.0, 0.5, 2.0, 3.7])))
    _compare(fusedloss.softmax_focal_loss, reference.softmax_focal_loss, (x, t), kw, dtype)


def _broadcastable(draw, shape):
    """A shape that broadcasts to ``shape``: trailing dims kept or set to 1, leading dims
    dropped."""
    drop = draw(st.integers(0, len(shape)))
    return tuple(1 if draw(st.booleans()) else s for s in shape[drop:])


def _elementwise_case(draw):
    dtype = draw(DTYPES)
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=4)))
    x = _layout(draw, _tensor(draw, shape, dtype))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        t = (t > 0.5).double()
    return x, t.to(dtype), dtype, shape, g


@SETTINGS
@given(st.data())
def test_sigmoid_focal_loss(data):
    x, t, dtype, shape, g = _elementwise_case(data.draw)
    weight = None
    if data.draw(st.booleans()):
        weight = torch.rand(_broadcastable(data.draw, shape), generator=g,
                            dtype=torch.float64).to(dtype)
    kw = dict(alpha=data.draw(st.sampled_from([-1.0, 0.25])),
              gamma=data.draw(st.sampled_from([0.0, 0.5, 2.0])),
              reduction=data.draw(REDUCTIONS), weight=weight)
    _compare(fusedloss.sigmoid_focal_loss, reference.sigmoid_focal_loss, (x, t), kw, dtype)


@SETTINGS
@given(st.data())
def test_binary_cross_entropy_with_logits(data):
    x, t, dtype, shape, g = _elementwise_case(data.draw)
    weight = pos_weight = None
    if data.draw(st.booleans()):
        weight = torch.rand(_broadcastable(data.draw, shape), generator=g,
                            dtype=torch.float64).to(dtype)
    if data.draw(st.booleans()):
        pos_weight = (torch.rand(shape[-1:], generator=g, dtype=torch.float64) * 3).to(dtype)
    kw = dict(weight=weight, pos_weight=pos_weight, reduction=data.draw(REDUCTIONS))
    _compare(fusedloss.binary_cross_entropy_with_logits,
             reference.binary_cross_entropy_with_logits, (x, t), kw, dtype)


@SETTINGS
@given(st.data())
def test_total_variation(data):
    dtype = data.draw(DTYPES)
    lead = tuple(data.draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    shape = lead + (data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9)))
    x = _layout(data.draw, _tensor(data.draw, shape, dtype))
    norm = data.draw(st.sampled_from(["l1", "l2_squared", "isotropic"]))
    weight = None
    if data.draw(st.booleans()):
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
        weight = torch.rand(_broadcastable(data.draw, shape), generator=g,
                            dtype=torch.float64).to(dtype)
    kw = dict(norm=norm, eps=data.draw(st.sampled_from([0.0, 1e-6])) if norm == "isotropic"
              else 0.0, reduction=data.draw(REDUCTIONS))
    # the fused paths give no weight gradient: the weight is a constant here
    _compare(fusedloss.total_variation, reference.total_variation, (x, weight), kw, dtype)


def _dice_case(draw):
    """(input (N, C, *spatial), int64 target, dtype, shared kwargs) for the Dice family."""
    dtype = draw(DTYPES)
    n, c = draw(st.integers(1, 3)), draw(st.integers(2, 9))
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    x = _layout(draw, _tensor(draw, (n, c) + spatial, dtype))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.randint(0, c, (n,) + spatial, generator=g)
    ignore_index = draw(st.sampled_from([-100, 0]))
    t[torch.rand(t.shape, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = ignore_index
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.1).to(dtype) \
        if draw(st.booleans()) else None
    kw = dict(weight=weight, ignore_index=ignore_index,
              include_background=draw(st.booleans()), batch=draw(st.booleans()),
              smooth_nr=draw(st.sampled_from([1e-5, 0.0, 1.0])), smooth_dr=1e-5)
    return x, t, dtype, kw


@SETTINGS
@given(st.data())
def test_dice_loss(data):
    x, t, dtype, kw = _dice_case(data.draw)
    kw.update(reduction=data.draw(REDUCTIONS), squared_pred=data.draw(st.booleans()))
    _compare(fusedloss.dice_loss, reference.dice_loss, (x, t), kw, dtype)


@SETTINGS
@given(st.data())
def test_tversky_loss(data):
    x, t, dtype, kw = _dice_case(data.draw)
    kw.update(reduction=data.draw(REDUCTIONS), alpha=data.draw(st.sampled_from([0.3, 0.5, 0.7])),
              beta=data.draw(st.sampled_from([0.3, 0.5, 0.7])))
    _compare(fusedloss.tversky_loss, reference.tversky_loss, (x, t), kw, dtype)


@SETTINGS
@given(st.data())
def test_dice_ce_loss(data):
    x, t, dtype, kw = _dice_case(data.draw)
    kw.update(reduction=data.draw(st.sampled_from(["mean", "sum"])),
              squared_pred=data.draw(st.booleans()),
              label_smoothing=data.draw(st.sampled_from([0.0, 0.1])),
              lambda_ce=data.draw(st.sampled_from([1.0, 0.5])),
              ce_weight=kw["weight"] if data.draw(st.booleans()) else None)
    _compare(fusedloss.dice_ce_loss, reference.dice_ce_loss, (x, t), kw, dtype)
