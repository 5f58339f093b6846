"""Raw Triton cross-entropy launchers (kernels/cross_entropy.py) against the contract of
docs/KERNELS.md, with a float64 torch oracle written here. Without CUDA the kernels run under
triton's interpreter on CPU tensors; TRITON_INTERPRET must be set before the kernels are imported
(triton reads it when a kernel is decorated)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _load_kernels():
    """fusedloss.kernels.cross_entropy when installed, else the source package; either way a copy
    whose kernels were decorated for this machine (interpreted when there is no GPU)."""
    try:
        mod = importlib.import_module("fusedloss.kernels.cross_entropy")
    except Exception:
        mod = None
    if mod is None or (not CUDA and not mod._INTERPRETED):
        name = "_fusedloss_test_kernels"
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "kernels")])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[name] = pkg
        spec.loader.exec_module(pkg)
        mod = importlib.import_module(f"{name}.cross_entropy")
    return mod


K = _load_kernels()
COMMON = sys.modules[K.__name__.rsplit(".", 1)[0] + "._common"]
SG = importlib.import_module(K.__name__.rsplit(".", 1)[0] + ".scale_grad")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """A 64-class block so that C = 70 or 300 runs the class loop several times."""
    monkeypatch.setattr(COMMON, "MAX_BLOCK_SIZE", 64)


# ---------------------------------------------------------------------------------------------
# Oracle: the contract written plainly in float64 torch, gradient by autograd.
# ---------------------------------------------------------------------------------------------


def oracle(x, target, weight=None, loss_scale=None, ignore_index=-100, ls=0.0, z=0.0, softcap=0.0):
    x64 = x.detach().cpu().double().requires_grad_(True)
    N, C, D = x64.shape
    xs = softcap * torch.tanh(x64 / softcap) if softcap > 0 else x64
    lse = torch.logsumexp(xs, dim=1)
    w = weight.cpu().double() if weight is not None else torch.ones(C, dtype=torch.float64)
    if target.dtype.is_floating_point:
        t = (1 - ls) * target.detach().cpu().double() + ls / C
        wt = w[None, :, None] * t
        loss = (wt * (lse[:, None, :] - xs)).sum(1) + z * lse**2
    else:
        y = target.cpu()
        ignored = y == ignore_index
        ys = y.masked_fill(ignored, 0)
        xs_y = xs.gather(1, ys[:, None, :]).squeeze(1)
        wy = w[ys]
        loss = (1 - ls) * wy * (lse - xs_y) + z * wy * lse**2
        if ls > 0:
            loss = loss + ls / C * (w.sum() * lse - (w[None, :, None] * xs).sum(1))
        loss = torch.where(ignored, torch.zeros_like(loss), loss)
    if loss_scale is not None:
        loss = loss * loss_scale.cpu().double()
    (grad,) = torch.autograd.grad(loss.sum(), x64)
    return loss.detach(), lse.detach(), grad


def run_fwd(x, target, weight=None, loss_scale=None, ignore_index=-100, ls=0.0, z=0.0,
            softcap=0.0, compute_grad=True):
    return K.cross_entropy_fwd(x, target, weight, loss_scale, ignore_index, ls, z, softcap,
                               compute_grad)


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.cpu().double(), expected.double(), **TOL[dtype],
                               equal_nan=True)


def check(x, target, *, dtype=None, **kw):
    dtype = dtype or x.dtype
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss, lse, grad = run_fwd(x, target, **kw)
    ref_loss, ref_lse, ref_grad = oracle(x, target, **kw)
    assert loss.dtype == acc and lse.dtype == acc and grad.dtype == x.dtype
    assert loss.shape == lse.shape == (x.shape[0], x.shape[2])
    assert grad.shape == x.shape and grad.is_contiguous()
    assert_close(loss, ref_loss, dtype)
    assert_close(lse, ref_lse, dtype)
    assert_close(grad, ref_grad, dtype)
    return loss, lse, grad


def make(N, C, D, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, max(C, 1), (N, D), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def rand_prob(N, C, D, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.softmax(torch.randn(N, C, D, generator=g, dtype=torch.float64), 1)
    return t.to(dtype).to(DEVICE)


def weight_for(C, dtype=torch.float32, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(DEVICE)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The oracle itself is torch's cross_entropy.
# ---------------------------------------------------------------------------------------------


def test_oracle_matches_torch():
    x, y = make(6, 9, 2, torch.float64)
    y[0, 0] = -100
    w = weight_for(9, torch.float64)
    for kw in (dict(), dict(weight=w), dict(weight=w, label_smoothing=0.2, ignore_index=-100)):
        xr = x.detach().cpu().requires_grad_(True)
        ref = F.cross_entropy(xr, y.cpu(), reduction="none", **kw)
        ref.sum().backward()
        loss, _, grad = oracle(x, y, weight=kw.get("weight"), ls=kw.get("label_smoothing", 0.0))
        torch.testing.assert_close(loss, ref.detach())
        torch.testing.assert_close(grad, xr.grad)
    t = rand_prob(6, 9, 2, torch.float64)
    xr = x.detach().cpu().requires_grad_(True)
    ref = F.cross_entropy(xr, t.cpu(), weight=w.cpu(), reduction="none", label_smoothing=0.1)
    ref.sum().backward()
    loss, _, grad = oracle(x, t, weight=w, ls=0.1)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, xr.grad)


# ---------------------------------------------------------------------------------------------
# Parity with the oracle.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [1, 7, 300])
def test_plain(dtype, C):
    x, y = make(5, C, 1, dtype)
    check(x, y)


def test_default_block_size(monkeypatch):
    monkeypatch.setattr(COMMON, "MAX_BLOCK_SIZE", None)
    x, y = make(3, 300, 1, torch.float64)
    check(x, y, weight=weight_for(300, torch.float64), ls=0.1)


FEATURES = {
    "weight": dict(weight=True),
    "ignore": dict(ignore=True),
    "smooth_weight_ignore": dict(weight=True, ignore=True, ls=0.1),
    "smooth": dict(ls=0.25),
    "ignore_in_range": dict(ignore=True, ignore_index=2, weight=True, ls=0.1),
    "z_loss": dict(z=1e-2, weight=True),
    "softcap": dict(softcap=2.5),
    "loss_scale": dict(loss_scale=0.125, ignore=True),
    "everything": dict(weight=True, ignore=True, ls=0.1, z=1e-3, softcap=4.0, loss_scale=0.5),
    "prob": dict(prob=True),
    "prob_everything": dict(prob=True, weight=True, ls=0.2, z=1e-2, softcap=3.0, loss_scale=2.0),
}


def feature_args(spec, N, C, D, dtype, y):
    acc = acc_of(dtype)
    kw = {}
    target = y
    if spec.get("weight"):
        kw["weight"] = weight_for(C, acc)
    if spec.get("prob"):
        target = rand_prob(N, C, D, dtype)
    if spec.get("ignore"):
        ii = spec.get("ignore_index", -100)
        kw["ignore_index"] = ii
        target = y.clone()
        target.view(-1)[::3] = ii
    for k in ("ls", "z", "softcap"):
        if k in spec:
            kw[k] = spec[k]
    if "loss_scale" in spec:
        kw["loss_scale"] = torch.tensor(spec["loss_scale"], dtype=acc, device=DEVICE)
    return target, kw


@pytest.mark.parametrize("name", list(FEATURES))
@pytest.mark.parametrize("D", [1, 3])
def test_features_fp64(name, D):
    N, C = 4, 70
    x, y = make(N, C, D, torch.float64)
    target, kw = feature_args(FEATURES[name], N, C, D, torch.float64, y)
    check(x, target, **kw)


@pytest.mark.parametrize("name", ["everything", "prob_everything"])
def test_features_fp32(name):
    N, C, D = 3, 130, 2
    x, y = make(N, C, D, torch.float32)
    target, kw = feature_args(FEATURES[name], N, C, D, torch.float32, y)
    check(x, target, **kw)


def test_no_grad_returns_empty():
    x, y = make(3, 70, 1, torch.float32)
    loss, lse, grad = run_fwd(x, y, compute_grad=False)
    ref_loss, ref_lse, _ = oracle(x, y)
    assert grad.shape == (0,) and grad.dtype == x.dtype
    assert_close(loss, ref_loss, torch.float32)
    assert_close(lse, ref_lse, torch.float32)


# ---------------------------------------------------------------------------------------------
# Shapes and strides.
# ---------------------------------------------------------------------------------------------


def _layouts():
    g = torch.Generator().manual_seed(3)
    N, C = 5, 70
    base = torch.randn(N, 2 * C + 1, generator=g, dtype=torch.float64) * 2
    cl = torch.randn(2, 4, 3, C, generator=g, dtype=torch.float64)  # (N, H, W, C) channels-last
    return {
        "transposed": torch.randn(C, N, generator=g, dtype=torch.float64).t().unsqueeze(-1),
        "class_stride_2": base[:, 1::2].unsqueeze(-1),
        "segmentation": torch.randn(2, C, 4, 3, generator=g, dtype=torch.float64).flatten(2),
        "channels_last": cl.permute(0, 3, 1, 2).flatten(2),
        "n1": torch.randn(1, C, 1, generator=g, dtype=torch.float64),
        "n1_d": torch.randn(1, C, 5, generator=g, dtype=torch.float64),
        "d_stride_pad": torch.randn(3, C, 8, generator=g, dtype=torch.float64)[:, :, 1:7],
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_layouts(layout):
    x = _layouts()[layout].to(DEVICE)
    N, C, D = x.shape
    y = torch.randint(0, C, (N, D), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    y.view(-1)[::4] = -100
    kw = dict(weight=weight_for(C, torch.float64), ls=0.1)
    loss, lse, grad = check(x, y, **kw)
    # In place: the gradient lands in x through x's own strides, memory around it untouched.
    owner = x._base if x._base is not None else x
    before = owner.clone()
    xi = x.clone() if x._base is None else x
    outside = torch.ones_like(owner, dtype=torch.bool)
    offset = xi.storage_offset() - owner.storage_offset()
    outside.as_strided(xi.shape, xi.stride(), offset).fill_(False)
    loss_i, lse_i = K.cross_entropy_fwd_inplace(xi, y, kw["weight"], None, -100, 0.1, 0.0, 0.0)
    torch.testing.assert_close(loss_i, loss, rtol=0, atol=0)
    torch.testing.assert_close(lse_i, lse, rtol=0, atol=0)
    torch.testing.assert_close(xi, grad, rtol=0, atol=0)
    if x._base is not None:
        assert torch.equal(owner[outside], before[outside])


@pytest.mark.parametrize("D", [1, 4])
def test_empty(D):
    x = torch.randn(0, 7, D, device=DEVICE)
    y = torch.zeros(0, D, dtype=torch.long, device=DEVICE)
    loss, lse, grad = run_fwd(x, y)
    assert loss.shape == lse.shape == (0, D) and grad.shape == (0, 7, D)
    loss, lse = K.cross_entropy_fwd_inplace(x, y, None, None, -100, 0.0, 0.0, 0.0)
    assert loss.shape == (0, D)
    SG.scale_grad_(x, torch.ones(0, D, device=DEVICE))


@pytest.mark.parametrize("name", ["everything", "prob_everything"])
def test_inplace_with_features(name):
    N, C, D = 3, 130, 2
    x, y = make(N, C, D, torch.float32)
    target, kw = feature_args(FEATURES[name], N, C, D, torch.float32, y)
    loss, lse, grad = run_fwd(x, target, **kw)
    xt = x.transpose(0, 2).clone().transpose(0, 2)  # same values, non-contiguous
    loss_i, lse_i = K.cross_entropy_fwd_inplace(
        xt, target, kw.get("weight"), kw.get("loss_scale"), kw.get("ignore_index", -100),
        kw.get("ls", 0.0), kw.get("z", 0.0), kw.get("softcap", 0.0))
    assert torch.equal(loss_i, loss) and torch.equal(lse_i, lse) and torch.equal(xt, grad)


# ---------------------------------------------------------------------------------------------
# Numerics.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("extras", [False, True])
def test_half_precision_error_within_2x_torch(dtype, extras):
    N, C = 8, 300
    x, y = make(N, C, 1, dtype, scale=4.0)
    w = weight_for(C, torch.float32) if extras else None
    ls = 0.1 if extras else 0.0
    loss, _, grad = run_fwd(x, y, weight=w, ls=ls)
    ref_loss, _, ref_grad = oracle(x, y, weight=w, ls=ls)
    xt = x.detach().squeeze(-1).requires_grad_(True)
    tl_ = F.cross_entropy(xt, y.squeeze(-1), weight=None if w is None else w.to(dtype),
                          reduction="none", label_smoothing=ls)
    tl_.sum().backward()
    torch_loss_err = (tl_.detach().cpu().double() - ref_loss.squeeze(-1)).abs().max()
    torch_grad_err = (xt.grad.cpu().double() - ref_grad.squeeze(-1)).abs().max()
    our_loss_err = (loss.cpu().double() - ref_loss).abs().max()
    our_grad_err = (grad.cpu().double() - ref_grad).abs().max()
    assert our_loss_err <= 2 * torch_loss_err + 1e-6, (our_loss_err, torch_loss_err)
    assert our_grad_err <= 2 * torch_grad_err + 1e-6, (our_grad_err, torch_grad_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confident_target_gradient_accurate(dtype):
    # p_y close to 1 (1 - p_y from 1e-7 to 4e-3): the target-column gradient A (p_y - 1) must keep
    # its digits (Liger PR 1329), as torch's own does, at the target column and everywhere else.
    C = 70
    x = torch.zeros(5, C, 1, dtype=torch.float64)
    y = torch.tensor([[3], [10], [69], [0], [33]])
    x[torch.arange(5), y[:, 0], 0] = torch.tensor([20.0, 12.0, 9.0, 16.0, 4.0], dtype=torch.float64)
    x[:, :, 0] += 50.0  # a large lse: its rounding must not leak into p_j
    x, y = x.to(dtype).to(DEVICE), y.to(DEVICE)
    loss, _, grad = run_fwd(x, y)
    ref_loss, _, ref = oracle(x, y)
    xt = x.detach().squeeze(-1).requires_grad_(True)
    tloss = F.cross_entropy(xt, y.squeeze(-1), reduction="none")
    tloss.sum().backward()
    tgrad = xt.grad.unsqueeze(-1)

    def rel_err(a):
        return ((a.cpu().double() - ref) / ref.abs().clamp_min(1e-30)).abs()

    at = torch.zeros_like(ref, dtype=torch.bool)
    at[torch.arange(5), y.cpu()[:, 0]] = True
    assert (grad.cpu()[at] < 0).all()
    assert rel_err(grad)[at].max() <= 2 * rel_err(tgrad)[at].max() + 1e-6
    assert rel_err(grad).max() <= 2 * rel_err(tgrad).max() + 1e-6
    loss_err = ((loss.cpu().double() - ref_loss) / ref_loss).abs().max()
    ref_l = ref_loss.squeeze(-1)
    torch_loss_err = ((tloss.detach().cpu().double() - ref_l) / ref_l).abs().max()
    assert loss_err <= 2 * torch_loss_err + 1e-6


def test_nan_propagates_and_ignored_rows_stay_zero():
    x, y = make(4, 70, 1, torch.float32)
    x[1, 5, 0] = float("nan")
    x[2, 66, 0] = float("nan")
    y[2, 0] = -100  # ignored row with a NaN logit: loss 0, gradient 0
    loss, lse, grad = run_fwd(x, y, ls=0.1)
    assert loss[1].isnan().all() and lse[1].isnan().all() and grad[1].isnan().all()
    assert loss[2].item() == 0.0 and lse[2].isnan().all() and (grad[2] == 0).all()
    ref_loss, ref_lse, ref_grad = oracle(x[[0, 3]], y[[0, 3]], ls=0.1)
    assert_close(loss[[0, 3]], ref_loss, torch.float32)
    assert_close(grad[[0, 3]], ref_grad, torch.float32)


def test_all_nan_row_and_masked_vocab():
    x, y = make(3, 70, 1, torch.float32)
    x[0] = float("nan")
    x[1, 40:, 0] = float("-inf")  # masked vocabulary entries
    y[1, 0] = 3
    loss, lse, grad = run_fwd(x, y)
    assert loss[0].isnan().all() and lse[0].isnan().all()
    assert torch.isfinite(loss[1:]).all() and (grad[1, 40:] == 0).all()
    ref_loss, _, ref_grad = oracle(x[1:], y[1:])
    assert_close(loss[1:], ref_loss, torch.float32)
    assert_close(grad[1:], ref_grad, torch.float32)


def test_all_ignored_mean_is_nan_with_zero_grad():
    x, y = make(3, 70, 1, torch.float32)
    y.fill_(-100)
    inf = torch.tensor(float("inf"), device=DEVICE)
    loss, lse, grad = run_fwd(x, y, loss_scale=inf)
    assert loss.isnan().all() and torch.isfinite(lse).all() and (grad == 0).all()


def test_extreme_logits_finite():
    x, y = make(3, 70, 1, torch.float32)
    x = x * 1e4
    check(x, y, softcap=30.0)
    loss, _, grad = run_fwd(x, y)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@triton.jit
def _math_kernel(x_ptr, tanh_ptr, expm1_ptr, n, TERMS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(tanh_ptr + offs, COMMON._tanh(x, TERMS), mask=mask)
    tl.store(expm1_ptr + offs, COMMON._expm1(x, TERMS), mask=mask)


@pytest.mark.parametrize("dtype,terms,ulps", [(torch.float32, 8, 4), (torch.float64, 14, 8)])
def test_portable_tanh_expm1(dtype, terms, ulps):
    mags = [0.0, 1e-30, 1e-8, 1e-4, 1e-3, 0.01, 0.1, 0.2, 0.249, 0.251, 0.3, 0.49, 0.499, 0.5,
            0.501, 0.7, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 88.0, 100.0]
    vals = torch.tensor(mags + [-m for m in mags[1:]], dtype=torch.float64)
    vals = torch.cat([vals, torch.linspace(-3, 3, 61, dtype=torch.float64)]).to(dtype)
    specials = torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=dtype)
    x = torch.cat([vals, specials]).to(DEVICE)
    th, em = torch.empty_like(x), torch.empty_like(x)
    with COMMON._quiet():  # exp overflows (to inf, correctly) in the interpreter's numpy
        _math_kernel[(1,)](x, th, em, x.numel(), TERMS=terms,
                           BLOCK=triton.next_power_of_2(x.numel()))
    eps = torch.finfo(dtype).eps
    xd = x.cpu().double()[: vals.numel()]
    for got, want in ((th, torch.tanh(xd)), (em, torch.expm1(xd))):
        got = got.cpu().double()[: vals.numel()]
        fin = torch.isfinite(want.to(dtype))  # expm1(88), expm1(100) overflow float32: inf
        rel = ((got[fin] - want[fin]).abs() / want[fin].abs().clamp_min(torch.finfo(dtype).tiny))
        assert rel.max() <= ulps * eps, (rel.max() / eps, xd[fin][rel.argmax()])
        assert (got[~fin] == want.to(dtype).double()[~fin]).all()
    assert th[-3:-1].tolist() == [1.0, -1.0] and em[-3:-1].tolist()[1] == -1.0
    assert th[-1].isnan() and em[-1].isnan() and em[-3].item() == float("inf")


# ---------------------------------------------------------------------------------------------
# Bad targets.
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="on the GPU a bad target is a device-side assert")
@pytest.mark.parametrize("bad", [70, -1, 2**40, -101])
@pytest.mark.parametrize("D", [1, 3])
def test_out_of_range_target_raises(bad, D):
    x, y = make(3, 70, D, torch.float32)
    y[0, 0] = -100
    y[1, D - 1] = bad
    with pytest.raises(IndexError, match=rf"target {bad} is out of bounds for 70 classes"):
        run_fwd(x, y)
    with pytest.raises(IndexError, match="out of bounds"):
        K.cross_entropy_fwd_inplace(x.clone(), y, None, None, -100, 0.1, 0.0, 0.0)


@pytest.mark.skipif(CUDA, reason="on the GPU a bad target is a device-side assert")
def test_bad_target_with_zero_classes():
    x = torch.randn(2, 0, 1)
    y = torch.tensor([[-100], [0]])
    with pytest.raises(IndexError, match="target 0 is out of bounds for 0 classes"):
        run_fwd(x, y)
    loss, lse, _ = run_fwd(x[:1], y[:1])
    assert loss.item() == 0.0 and lse.item() == float("-inf")


# ---------------------------------------------------------------------------------------------
# scale_grad_
# ---------------------------------------------------------------------------------------------


def _grad_with_sentinels(N, C, D, dtype):
    g = torch.randn(N, C, D, generator=torch.Generator().manual_seed(5)).to(dtype)
    if dtype == torch.float32:
        bits = g.view(torch.int32)
        bits.view(-1)[0] = 0x7F800001  # signalling NaN: any multiply would quiet it
        bits.view(-1)[1] = 0x00000001  # denormal
        bits.view(-1)[2] = -0x80000000  # -0.0
    return g.to(DEVICE)


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16, torch.float64: torch.int64}[t.dtype]).clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 70, 1), (2, 7, 12)])
def test_scale_grad_scalar_one_leaves_memory_untouched(dtype, shape):
    g = _grad_with_sentinels(*shape, dtype)
    before = _bits(g)
    one = torch.ones((), device=DEVICE).expand(shape[0], shape[2])
    SG.scale_grad_(g, one)
    assert torch.equal(_bits(g), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(4, 70, 1), (2, 7, 12)])
def test_scale_grad_scalar_and_rows(dtype, shape):
    N, C, D = shape
    acc = acc_of(dtype)
    g0 = torch.randn(N, C, D, generator=torch.Generator().manual_seed(6)).to(dtype).to(DEVICE)
    g = g0.clone()
    SG.scale_grad_(g, torch.tensor(2.0, dtype=acc, device=DEVICE).expand(N, D))
    assert torch.equal(g, g0 * 2)
    gl = torch.rand(N, D, generator=torch.Generator().manual_seed(7), dtype=acc).to(DEVICE)
    g = g0.clone()
    SG.scale_grad_(g, gl)
    assert torch.equal(g, (g0.to(acc) * gl[:, None, :]).to(dtype))  # one rounding
    # Non-contiguous grad and grad_loss.
    gt = g0.transpose(0, 2).clone().transpose(0, 2)
    glt = gl.t().clone().t()
    SG.scale_grad_(gt, glt)
    assert torch.equal(gt, (g0.to(acc) * gl[:, None, :]).to(dtype))


def test_scale_grad_scalar_zero_and_nan():
    g0 = torch.randn(3, 70, 1, device=DEVICE)
    g = g0.clone()
    SG.scale_grad_(g, torch.tensor(0.0, device=DEVICE).expand(3, 1))
    assert (g == 0).all()
    g = g0.clone()
    SG.scale_grad_(g, torch.tensor(float("nan"), device=DEVICE).expand(3, 1))
    assert g.isnan().all()
