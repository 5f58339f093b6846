"""``fusedloss::logsumexp_fwd``, the softmax-row skeleton's lse-only policy, on every fused backend:
against torch.logsumexp (strides, odd sizes, softcap, half precision), its NaN / inf semantics, an
empty batch, opcheck, and its use by the vocab-parallel cross-entropy."""

from __future__ import annotations

import pytest
import torch

import fusedloss
from _support import make

LSE = torch.ops.fusedloss.logsumexp_fwd


def _skip_unless(backend):
    info = fusedloss.backends("logsumexp")[backend]
    if not info["available"]:
        pytest.skip(f"{backend}: {info['why']}")


def _want(x, softcap=0.0):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(acc)
    if softcap > 0:
        xs = softcap * torch.tanh(xs / softcap)
    return torch.logsumexp(xs, dim=1)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 1), (5, 4099, 1), (2, 50257, 1),
                                   (2, 5, 33), (1, 19, 100)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_torch(backend, device, shape, dtype):
    _skip_unless(backend)
    x = make(shape, dtype, device)
    got = LSE(x, 0.0, backend)
    want = _want(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["class-strided", "transposed", "sliced", "offset"])
def test_strides_and_softcap(backend, device, layout):
    _skip_unless(backend)
    if layout == "class-strided":
        x = make((3, 8, 6), device=device)  # (N, C, D) segmentation layout
    elif layout == "transposed":
        x = make((7, 9), device=device).t().unsqueeze(2)  # row stride 1, class stride 9
    elif layout == "sliced":
        x = make((4, 300), device=device)[:, ::3].unsqueeze(2)
    else:
        x = make((1, 5003), device=device)[:, 3:].reshape(2, 2500, 1)  # rows start unaligned
    for softcap in (0.0, 2.5):
        torch.testing.assert_close(LSE(x, softcap, backend), _want(x, softcap), rtol=2e-6,
                                   atol=2e-6)


def test_nan_inf_and_empty(backend, device):
    _skip_unless(backend)
    x = make((4, 10, 1), device=device)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3] = float("-inf")
    got = LSE(x, 0.0, backend).reshape(4)
    assert torch.isfinite(got[0])
    assert torch.isnan(got[1]) and torch.isnan(got[2])  # +inf: NaN, as cross-entropy's lse
    assert got[3] == float("-inf")
    empty = LSE(make((0, 10, 1), device=device), 0.0, backend)
    assert empty.shape == (0, 1)


def test_opcheck(backend, device):
    _skip_unless(backend)
    torch.library.opcheck(LSE, (make((3, 17, 2), device=device), 0.0, backend))
    torch.library.opcheck(LSE, (make((3, 17, 1), device=device), 1.5, backend))
    if backend != "triton":
        torch.library.opcheck(torch.ops.fusedloss_C.logsumexp_fwd,
                              (make((2, 9, 3), device=device), 0.0))


def test_bad_input(backend, device):
    _skip_unless(backend)
    with pytest.raises((RuntimeError, ValueError), match="(N, C, D)|3|dim"):
        LSE(make((3, 4), device=device), 0.0, backend)
