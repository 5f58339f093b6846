"""The aligned row walk of the Triton softmax-row skeleton (kernels/_common.py, _softmax_row.py):
rows whose class axis is contiguous but which do not start on a 16-byte boundary (odd vocabulary
sizes like GPT-2's 50257, views with a storage offset) are walked as head / aligned body / tail.
Small odd sizes and a 64-class block exercise every piece; results are checked against a float64
torch oracle, and memory around the views must stay untouched. Also the lse-only kernel
(kernels/logsumexp.py), pass 1 of the skeleton alone."""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from fusedloss.kernels import _common  # noqa: E402
from fusedloss.kernels import cross_entropy as K  # noqa: E402
from fusedloss.kernels import logsumexp as L  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


class LaunchSpy:
    """Stands in for a kernel: records each launch's constexpr kwargs, then launches."""

    def __init__(self, kernel):
        self.kernel, self.kwargs = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(_common, "MAX_BLOCK_SIZE", 64)


@pytest.fixture
def ce_spy(monkeypatch):
    spy = LaunchSpy(K._cross_entropy_fwd_kernel)
    monkeypatch.setattr(K, "_cross_entropy_fwd_kernel", spy)
    return spy


def oracle(x, target, weight=None, ls=0.0, z=0.0, softcap=0.0):
    """Per-row loss, lse and gradient of their sum, float64, by autograd (torch's semantics)."""
    x64 = x.detach().cpu().double().requires_grad_(True)
    xs = softcap * torch.tanh(x64 / softcap) if softcap > 0 else x64
    lse = torch.logsumexp(xs, dim=1)
    w = None if weight is None else weight.cpu().double()
    t = target.cpu()
    if t.dtype.is_floating_point:
        t = t.double()
    loss = F.cross_entropy(xs, t, weight=w, reduction="none", label_smoothing=ls)
    if z > 0:
        wy = torch.ones_like(lse) if w is None or t.is_floating_point() else w[t.clamp(min=0)]
        keep = torch.ones_like(lse) if t.is_floating_point() else (t != -100).double()
        loss = loss + z * wy * keep * lse**2
    (grad,) = torch.autograd.grad(loss.sum(), x64)
    return loss.detach(), lse.detach(), grad


def close(actual, expected, dtype):
    tol = TOL.get(dtype, dict(rtol=2e-2, atol=2e-3))
    torch.testing.assert_close(actual.cpu().double(), expected, **tol, equal_nan=True)


def odd_rows(N, C, dtype, pad_left=1, pad_right=4, seed=0):
    """(N, C, 1) rows of an (N, pad_left + C + pad_right) buffer: the row stride is odd and the
    first element is pad_left elements past a 16-byte boundary; returns (view, buffer)."""
    g = torch.Generator().manual_seed(seed)
    buf = (torch.randn(N, pad_left + C + pad_right, generator=g, dtype=torch.float64) * 3)
    buf = buf.to(dtype).to(DEVICE)
    return buf[:, pad_left:pad_left + C].unsqueeze(-1), buf


def targets(N, C, D=1, seed=1):
    y = torch.randint(0, C, (N, D), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    y.view(-1)[::5] = -100
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [1037, 131, 3, 9])
@pytest.mark.parametrize("pad_left", [0, 1, 5])
def test_odd_rows_class_index(ce_spy, dtype, C, pad_left):
    N = 6
    x, buf = odd_rows(N, C, dtype, pad_left=pad_left, pad_right=(7 - C) % 4 + 2)
    y = targets(N, C)
    w = (torch.rand(C, generator=torch.Generator().manual_seed(2)) + 0.5).to(
        torch.float64 if dtype == torch.float64 else torch.float32).to(DEVICE)
    kw = dict(weight=w, ls=0.1, z=1e-3, softcap=6.0)
    loss, lse, grad = K.cross_entropy_fwd(x, y, w, None, -100, 0.1, 1e-3, 6.0, True)
    ref_loss, ref_lse, ref_grad = oracle(x.squeeze(-1), y.squeeze(-1), **kw)
    close(loss.squeeze(-1), ref_loss, dtype)
    close(lse.squeeze(-1), ref_lse, dtype)
    close(grad.squeeze(-1), ref_grad, dtype)
    vec = 16 // x.element_size()
    assert ce_spy.kwargs[-1]["VEC"] == vec, "odd rows take the head/body/tail walk"
    assert ce_spy.kwargs[-1]["G_VEC"] in (1, vec)
    # In place: the gradient lands in the view, the buffer's padding is untouched.
    before = buf.clone()
    loss_i, lse_i = K.cross_entropy_fwd_inplace(x, y, w, None, -100, 0.1, 1e-3, 6.0)
    assert torch.equal(loss_i, loss) and torch.equal(lse_i, lse)
    assert torch.equal(x, grad)
    inside = torch.zeros_like(buf, dtype=torch.bool)
    inside[:, pad_left:pad_left + C] = True
    assert torch.equal(buf[~inside], before[~inside])
    assert ce_spy.kwargs[-1]["G_VEC"] == vec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t_pad", [1, 2])
def test_odd_rows_probability_target(ce_spy, dtype, t_pad):
    """The target's rows aligned like the input's (t_pad == 1: hinted too) or not (t_pad == 2)."""
    N, C = 5, 1037
    x, _ = odd_rows(N, C, dtype, pad_left=1)
    g = torch.Generator().manual_seed(3)
    t = torch.softmax(torch.randn(N, t_pad + C + 4, generator=g, dtype=torch.float64), 1)
    t = t.to(dtype).to(DEVICE)[:, t_pad:t_pad + C].unsqueeze(-1)
    w = (torch.rand(C, generator=g) + 0.5).to(DEVICE)
    loss, lse, grad = K.cross_entropy_fwd(x, t, w, None, -100, 0.2, 1e-2, 0.0, True)
    ref_loss, ref_lse, ref_grad = oracle(x.squeeze(-1), t.squeeze(-1), weight=w, ls=0.2, z=1e-2)
    close(loss.squeeze(-1), ref_loss, dtype)
    close(lse.squeeze(-1), ref_lse, dtype)
    close(grad.squeeze(-1), ref_grad, dtype)
    vec = 16 // x.element_size()
    assert ce_spy.kwargs[-1]["VEC"] == vec
    assert ce_spy.kwargs[-1]["T_VEC"] == (vec if t_pad == 1 else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_odd_classes(ce_spy, dtype):
    """(N, H, W, C) memory as (N, C, H*W): class stride 1, several rows per program, each with
    its own head."""
    N, C, H, W = 2, 19, 3, 5
    g = torch.Generator().manual_seed(4)
    cl = (torch.randn(N, H, W, C, generator=g, dtype=torch.float64) * 2).to(dtype).to(DEVICE)
    x = cl.permute(0, 3, 1, 2).flatten(2)
    assert x.stride(1) == 1
    y = targets(N, C, H * W)
    loss, lse, grad = K.cross_entropy_fwd(x, y, None, None, -100, 0.1, 0.0, 0.0, True)
    ref_loss, ref_lse, ref_grad = oracle(x, y, ls=0.1)
    close(loss, ref_loss, dtype)
    close(lse, ref_lse, dtype)
    close(grad, ref_grad, dtype)
    assert ce_spy.kwargs[-1]["VEC"] == 16 // x.element_size()
    assert ce_spy.kwargs[-1]["BLOCK_ROWS"] > 1


def test_aligned_rows_keep_the_plain_walk(ce_spy):
    """Rows triton proves aligned (pointer, row stride and C multiples of 16) get VEC = 1: the
    kernel the aligned vocabularies (32000, 128256) always had."""
    x = torch.randn(4, 128, 1, device=DEVICE)
    K.cross_entropy_fwd(x, targets(4, 128), None, None, -100, 0.0, 0.0, 0.0, True)
    assert ce_spy.kwargs[-1]["VEC"] == 1


def test_nan_and_masked_rows_on_the_walk():
    x, _ = odd_rows(4, 1037, torch.float32, pad_left=3)
    x[1, 2, 0] = float("nan")  # in the head
    x[2, 1030, 0] = float("nan")  # in the tail
    x[3, 600:, 0] = float("-inf")  # masked vocabulary
    y = targets(4, 1037)
    y[3, 0] = 5
    loss, lse, grad = K.cross_entropy_fwd(x, y, None, None, -100, 0.0, 0.0, 0.0, True)
    assert lse[1:3].isnan().all() and grad[1:3].isnan().all()
    assert torch.isfinite(loss[[0, 3]]).all() and (grad[3, 600:] == 0).all()
    ref_loss, _, ref_grad = oracle(x[[0, 3]].squeeze(-1), y[[0, 3]].squeeze(-1))
    close(loss[[0, 3]].squeeze(-1), ref_loss, torch.float32)
    close(grad[[0, 3]].squeeze(-1), ref_grad, torch.float32)


# ---------------------------------------------------------------------------------------------
# The lse-only kernel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["odd_rows", "aligned", "transposed", "segmentation"])
def test_logsumexp(dtype, layout):
    g = torch.Generator().manual_seed(5)
    if layout == "odd_rows":
        x, _ = odd_rows(5, 1037, dtype, pad_left=1)
    elif layout == "aligned":
        x = torch.randn(5, 256, 1, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    elif layout == "transposed":
        x = torch.randn(300, 4, generator=g, dtype=torch.float64).to(dtype).to(DEVICE).t()
        x = x.unsqueeze(-1)
    else:
        x = torch.randn(2, 21, 13, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    lse = L.logsumexp_fwd(x)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    close(lse, torch.logsumexp(x.cpu().double(), dim=1), dtype)
    capped = L.logsumexp_fwd(x, softcap=2.0)
    xd = x.cpu().double()
    close(capped, torch.logsumexp(2.0 * torch.tanh(xd / 2.0), dim=1), dtype)


def test_logsumexp_specials():
    x, _ = odd_rows(4, 77, torch.float32, pad_left=2)
    x[0, 5, 0] = float("nan")
    x[1] = float("-inf")
    x[2, 3, 0] = float("inf")
    lse = L.logsumexp_fwd(x).squeeze(-1).cpu()
    # +inf: NaN, the lse of cross_entropy (whose loss is NaN there, as torch's), not
    # torch.logsumexp's inf.
    assert lse[0].isnan() and lse[1] == float("-inf") and lse[2].isnan()
    torch.testing.assert_close(lse[3].double(), torch.logsumexp(x[3].cpu().double(), 0)[0])
    assert L.logsumexp_fwd(torch.zeros(3, 0, 1, device=DEVICE)).eq(float("-inf")).all()
    assert L.logsumexp_fwd(torch.zeros(0, 5, 1, device=DEVICE)).shape == (0, 1)


def test_logsumexp_matches_cross_entropy_lse():
    x, _ = odd_rows(6, 301, torch.bfloat16, pad_left=1)
    _, lse, _ = K.cross_entropy_fwd(x, targets(6, 301), None, None, -100, 0.0, 0.0, 0.0, False)
    assert torch.equal(L.logsumexp_fwd(x), lse)
