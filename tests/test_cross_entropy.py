"""fusedloss.cross_entropy on every fused backend that runs here, against the reference and torch.

Tolerances: float64 1e-10 (same math, different order), float32 1e-5 relative, half precision by
flash-attention's rule: the fused error against a float64 reference is at most twice torch's own
error at that precision (plus a floor of one float32 ulp-scale 1e-6 for exact ties).
"""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from _support import TOL, make
from _support import class_targets as targets
from fusedloss import reference


def run(fn, x, *args, upstream=None, **kw):
    """Loss and input gradient of fn(x, ...); upstream: the gradient fed to backward."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    g = torch.ones_like(loss) if upstream is None else upstream
    loss.backward(g)
    return out, x.grad


def close(a, b, dtype, what=""):
    tol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def check(backend, device, x, t, dtype=torch.float32, upstream=None, **kw):
    """Values and gradients of the fused path against the reference, in dtype (fp32/fp64)."""
    x = x.to(device=device, dtype=dtype)
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        t = t.to(device=device, dtype=dtype)
    else:
        t = t.to(device)
    if "weight" in kw and kw["weight"] is not None:
        kw["weight"] = kw["weight"].to(device=device, dtype=dtype)
    up = None if upstream is None else upstream.to(device=device, dtype=dtype)
    got, g_got = run(fusedloss.cross_entropy, x, t, upstream=up, backend=backend, **kw)
    want, g_want = run(reference.cross_entropy, x, t, upstream=up, **kw)
    if isinstance(got, tuple):
        close(got[0], want[0], dtype, "loss")
        close(got[1], want[1], dtype, "lse")
        assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    else:
        assert got.dtype == dtype and got.shape == want.shape
        close(got, want, dtype, "loss")
    close(g_got, g_want, dtype, "grad")
    return got, g_got


# ---------------------------------------------------------------------------------------------
# Parity with the reference and torch

SHAPES = [(1, 1), (1, 5), (3, 7), (4, 300), (2, 1000), (5, 4099)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(backend, device, shape, reduction):
    x = make(shape)
    t = targets(shape[:1], shape[1])
    check(backend, device, x, t, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch(backend, device, dtype):
    x = make((6, 33), dtype, device).requires_grad_(True)
    t = targets((6,), 33, device, ignore_frac=0.3)
    w = torch.rand(33, dtype=dtype, device=device) + 0.5
    for kw in [{}, {"weight": w}, {"label_smoothing": 0.2}, {"weight": w, "label_smoothing": 0.2}]:
        for reduction in ["mean", "sum", "none"]:
            got = fusedloss.cross_entropy(x, t, reduction=reduction, backend=backend, **kw)
            want = F.cross_entropy(x, t, reduction=reduction, **kw)
            close(got, want, dtype, f"loss {kw} {reduction}")
            g = torch.rand_like(got) if reduction == "none" else torch.tensor(1.7, dtype=dtype)
            (g_got,) = torch.autograd.grad(got, x, g)
            (g_want,) = torch.autograd.grad(want, x, g)
            close(g_got, g_want, dtype, f"grad {kw} {reduction}")


@pytest.mark.parametrize("vocab", [50257, 128256])
def test_llm_vocab(backend, device, vocab):
    rows = 2 if backend == "triton" and device == "cpu" else 8
    x = make((rows, vocab))
    t = targets((rows,), vocab)
    t[0] = vocab - 1  # the last class, past every full block
    check(backend, device, x, t)


@pytest.mark.parametrize("kind", ["index", "tail", "odd-c", "smoothed-weighted", "prob", "bf16"])
def test_large_gradient(backend, device, kind):
    """A gradient over 32 MiB (on GPUs: a large-shape check): the CPU kernel writes it with
    streaming stores when its rows start vector-aligned (whole vector pairs streamed; the target
    column and the row's tail stored as usual). "tail": aligned rows with a tail that is not a
    whole pair (32784 = 1024.5 pairs of AVX-512 floats); "odd-c": unaligned rows, which must fall
    back to ordinary stores."""
    if backend == "triton" and device == "cpu":
        pytest.skip("40 MiB rows are minutes under the Triton interpreter")
    c = {"tail": 32784, "odd-c": 32767}.get(kind, 32768)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    n = 320 * 4 // dtype.itemsize  # x 32768 classes: 40 MiB of gradient
    x = make((n, c), dtype)
    t = targets((n,), c, ignore_frac=0.1)
    t[0] = c - 1
    kw = {}
    if kind == "smoothed-weighted":
        kw = {"weight": torch.rand(c) + 0.5, "label_smoothing": 0.1}
    if kind == "prob":
        t = torch.softmax(make((n, c)), 1)
    if kind == "bf16":
        x, t = x.to(device), t.to(device)
        got, g_got = run(fusedloss.cross_entropy, x, t, backend=backend)
        want, g_want = run(reference.cross_entropy, x.double(), t)
        assert g_got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=0)  # 2 bf16 ulps
        torch.testing.assert_close(g_got.double(), g_want, rtol=1e-2, atol=1e-9)
        return
    check(backend, device, x, t, **kw)


def test_spatial_dims(backend, device):
    """(N, C, d1, d2): the class dimension is strided (segmentation logits)."""
    x = make((2, 5, 3, 4))
    t = targets((2, 3, 4), 5, ignore_frac=0.2)
    for reduction in ["mean", "sum", "none"]:
        check(backend, device, x, t, reduction=reduction)
        check(backend, device, x, t, reduction=reduction, weight=torch.rand(5) + 0.1,
              label_smoothing=0.1)


def test_unbatched(backend, device):
    x = make((11,))
    t = torch.tensor(4)
    for reduction in ["mean", "sum", "none"]:
        got, _ = check(backend, device, x, t, reduction=reduction)
        assert got.shape == ()


@pytest.mark.parametrize("layout", ["sliced", "transposed", "spatial-permuted", "expanded-rows"])
def test_non_contiguous(backend, device, layout):
    if layout == "sliced":
        x = make((4, 200))[:, ::3]  # class stride 3
    elif layout == "transposed":
        x = make((70, 5)).t()  # (5, 70): row stride 1, class stride 5
    elif layout == "spatial-permuted":
        x = make((2, 3, 4, 6)).permute(0, 3, 1, 2)  # (N, C, H, W) from channels-last memory
    else:
        x = make((1, 37)).expand(4, 37)  # every row the same memory
    assert not x.is_contiguous()
    t = targets((x.shape[0],) + tuple(x.shape[2:]), x.shape[1])
    check(backend, device, x, t, reduction="none", upstream=torch.rand(t.shape))
    check(backend, device, x, t)


def test_ignore_index(backend, device):
    x = make((8, 13))
    t = targets((8,), 13, ignore_frac=0.5, ignore_index=3)
    for reduction in ["mean", "sum", "none"]:
        got, g = check(backend, device, x, t, ignore_index=3, reduction=reduction)
    # class 3 is ignored; class -100 is just an ordinary bad target then, so use 3 only
    assert (g[t.to(g.device) == 3] == 0).all()


def test_all_ignored_mean_is_nan(backend, device):
    x = make((4, 9))
    t = torch.full((4,), -100)
    for kw in [{}, {"label_smoothing": 0.1}, {"weight": torch.rand(9)}]:
        got, g = check(backend, device, x, t, **kw)
        assert torch.isnan(got)
        assert (g == 0).all()  # torch: zero gradients


def test_weight_and_smoothing_with_ignore(backend, device):
    """pytorch#73205 / Liger PR 198: label smoothing with weight and ignore_index together."""
    x = make((16, 21))
    t = targets((16,), 21, ignore_frac=0.3)
    w = torch.rand(21) + 0.1
    for reduction in ["mean", "sum", "none"]:
        check(backend, device, x, t, weight=w, label_smoothing=0.3, reduction=reduction)
        check(backend, device, x, t, weight=w, label_smoothing=1.0, reduction=reduction)


def test_upstream_gradient(backend, device):
    """reduction='none' with an arbitrary upstream gradient (Liger #421, #488, #968) and a
    scaled mean (gradient accumulation, Liger #802)."""
    x = make((6, 40))
    t = targets((6,), 40, ignore_frac=0.3)
    check(backend, device, x, t, reduction="none", upstream=torch.randn(6))
    check(backend, device, x, t, reduction="mean", upstream=torch.tensor(0.25))
    check(backend, device, x, t, reduction="sum", upstream=torch.tensor(-3.0))


# ---------------------------------------------------------------------------------------------
# LLM extras

def test_z_loss_softcap_lse(backend, device):
    x = make((7, 300), scale=10.0)
    t = targets((7,), 300, ignore_frac=0.3)
    w = torch.rand(300) + 0.1
    for kw in [{"z_loss": 1e-2}, {"softcap": 5.0}, {"z_loss": 1e-3, "softcap": 2.0, "weight": w,
                                                    "label_smoothing": 0.1}]:
        for reduction in ["mean", "none"]:
            check(backend, device, x, t, reduction=reduction, **kw)
    (loss, lse), _ = check(backend, device, x, t, return_lse=True, softcap=5.0)
    xs = 5.0 * torch.tanh(x.to(device) / 5.0)
    close(lse, torch.logsumexp(xs, 1), torch.float32, "lse")
    assert not lse.requires_grad


def test_probability_targets(backend, device):
    x = make((5, 17))
    p = torch.softmax(torch.randn(5, 17), 1)
    for kw in [{}, {"weight": torch.rand(17) + 0.1}, {"label_smoothing": 0.2}, {"z_loss": 1e-2},
               {"softcap": 3.0}]:
        for reduction in ["mean", "sum", "none"]:
            check(backend, device, x, p, reduction=reduction, **kw)
    # (N, C, d) with probabilities too
    x = make((2, 6, 5))
    p = torch.softmax(torch.randn(2, 6, 5), 1)
    check(backend, device, x, p, reduction="none", upstream=torch.rand(2, 5))
    xt = x.to(device).requires_grad_(True)
    pt = p.to(device)
    close(fusedloss.cross_entropy(xt, pt, backend=backend), F.cross_entropy(xt, pt),
          torch.float32, "prob vs torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inplace_backward(backend, device, dtype):
    x0 = make((6, 300), dtype)
    t = targets((6,), 300, ignore_frac=0.3)
    for reduction in ["mean", "none"]:
        base = x0.to(device).clone().requires_grad_(True)
        logits = base * 1.0  # a non-leaf, like an lm_head output
        ptr = logits.data_ptr()
        loss = fusedloss.cross_entropy(logits, t.to(device), reduction=reduction,
                                       inplace_backward=True, backend=backend)
        g = torch.rand_like(loss) if reduction == "none" else None
        loss.backward(g)
        want_x = x0.to(device).clone().requires_grad_(True)
        want = reference.cross_entropy(want_x, t.to(device), reduction=reduction)
        want.backward(g)
        close(loss, want, dtype, "loss")
        close(base.grad, want_x.grad, dtype, "grad")
        assert logits.data_ptr() == ptr
        close(logits.detach(), want_x.grad, dtype, "gradient stored in the logits' memory")


def test_inplace_refuses_saved_logits(backend, device):
    """Liger #272/#343: an in-place gradient must not corrupt a tensor another op saved."""
    base = make((4, 50)).to(device).requires_grad_(True)
    logits = torch.tanh(base)  # tanh saves its output for backward
    loss = fusedloss.cross_entropy(logits, targets((4,), 50, device), inplace_backward=True,
                                   backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_path_leaves_input_alone(backend, device):
    x = make((4, 50)).to(device)
    before = x.clone()
    with torch.no_grad():
        fusedloss.cross_entropy(x, targets((4,), 50, device), inplace_backward=True,
                                backend=backend)
    assert torch.equal(x, before)


def test_nan_propagates(backend, device):
    x = make((3, 40))
    x[1, 7] = float("nan")
    t = torch.tensor([1, 2, 3])
    got = fusedloss.cross_entropy(x.to(device), t.to(device), reduction="none", backend=backend)
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2]]).all()


def test_extreme_logits(backend, device):
    """Shift invariance and saturation: huge logits, -inf (masked vocabulary)."""
    x = make((4, 100))
    t = targets((4,), 100)
    base = fusedloss.cross_entropy(x.to(device), t.to(device), reduction="none", backend=backend)
    shifted = fusedloss.cross_entropy((x + 1e4).to(device), t.to(device), reduction="none",
                                      backend=backend)
    torch.testing.assert_close(shifted, base, atol=2e-2, rtol=0)
    xm = x.clone()
    xm[:, 50:] = float("-inf")
    tm = t % 50
    check(backend, device, xm, tm)


# ---------------------------------------------------------------------------------------------
# Half precision

def _err(a, ref):
    return (a.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision(backend, device, dtype, reduction):
    """flash-attention's rule: fused error vs float64 <= 2x torch's own half-precision error."""
    n, c = 8, 3001
    x = make((n, c), dtype, device)
    t = targets((n,), c, device, ignore_frac=0.2)
    x64 = x.double().requires_grad_(True)
    ref = F.cross_entropy(x64, t, reduction=reduction)
    up = torch.rand_like(ref) if reduction == "none" else None
    (g_ref,) = torch.autograd.grad(ref, x64, up)
    xt = x.clone().requires_grad_(True)
    th = F.cross_entropy(xt, t, reduction=reduction)
    (g_th,) = torch.autograd.grad(th, xt, None if up is None else up.to(dtype))
    xf = x.clone().requires_grad_(True)
    got = fusedloss.cross_entropy(xf, t, reduction=reduction, backend=backend)
    (g_got,) = torch.autograd.grad(got, xf, None if up is None else up.to(dtype))
    assert got.dtype == dtype and g_got.dtype == dtype
    assert _err(got, ref) <= 2 * _err(th, ref) + 1e-6
    assert _err(g_got, g_ref) <= 2 * _err(g_th, g_ref) + 1e-9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_confident_prediction_gradient(backend, device, dtype):
    """Liger PR 1329: p_y = 0.999 made the bf16 gradient p_y - 1 100% wrong. Here the target
    gradient keeps its relative accuracy up to the rounding of the result."""
    c = 1000
    x = torch.zeros(2, c, dtype=dtype, device=device)
    x[:, 3] = 14.0  # p_3 ~ 0.9992 with 999 zeros
    t = torch.tensor([3, 3], device=device)
    xf = x.clone().requires_grad_(True)
    fusedloss.cross_entropy(xf, t, reduction="sum", backend=backend).backward()
    x64 = x.double().requires_grad_(True)
    F.cross_entropy(x64, t, reduction="sum").backward()
    want = x64.grad[:, 3]
    rel = ((xf.grad[:, 3].double() - want) / want).abs().max().item()
    eps = torch.finfo(dtype).eps
    assert rel <= eps, rel


# ---------------------------------------------------------------------------------------------
# Autograd, custom-op and compiler checks


def test_scale_grad_skips_one(backend, device):
    """The backward of a 'mean' loss with upstream 1 must not touch the gradient buffer."""
    grad = make((3, 4, 5), device=device)
    before = grad.clone()
    torch.ops.fusedloss.scale_grad_(grad, torch.ones((), device=device).expand(3, 5), backend)
    assert torch.equal(grad, before)
    torch.ops.fusedloss.scale_grad_(grad, torch.full((), 2.0, device=device).expand(3, 5), backend)
    assert torch.equal(grad, before * 2)
    g = torch.rand(3, 5, device=device)
    torch.ops.fusedloss.scale_grad_(grad, g, backend)
    torch.testing.assert_close(grad, before * 2 * g[:, None, :])


def test_torch_compile_inductor(backend, device):
    torch._dynamo.reset()
    x0 = make((6, 300), device=device)
    t = targets((6,), 300, device, ignore_frac=0.3)

    def step(x, t):
        return fusedloss.cross_entropy(x * 2.0, t, inplace_backward=True, backend=backend)

    x = x0.clone().requires_grad_(True)
    torch.compile(step, fullgraph=True)(x, t).backward()
    xr = x0.clone().requires_grad_(True)
    F.cross_entropy(xr * 2.0, t).backward()
    close(x.grad, xr.grad, torch.float32, "inductor grad")


def test_module_drop_in(backend, device):
    w = torch.rand(10, device=device) + 0.1
    ours = fusedloss.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.05,
                                         backend=backend)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.05)
    x = make((12, 10), device=device)
    t = targets((12,), 10, device)
    close(ours(x, t), theirs(x, t), torch.float32, "module")
    assert "ignore_index=2" in repr(ours)
    sd = ours.state_dict()
    assert "weight" in sd


# ---------------------------------------------------------------------------------------------
# Bad input: a clean Python exception naming the problem, never a crash or a wrong number


@pytest.mark.parametrize("bad", [5, 7, -1, -101, 2**40])
def test_bad_target_values(backend, device, bad):
    """A kernel must not trust a target it has not checked: out-of-range and negative (not
    ignore_index) class indices raise, in every reduction and with weights."""
    x = make((4, 5), device=device).requires_grad_(True)
    t = targets((4,), 5, device)
    t[2] = bad
    for kw in [{}, {"weight": torch.rand(5, device=device)}, {"reduction": "none"}]:
        with pytest.raises((IndexError, RuntimeError, AssertionError), match=r"(?i)target|bound"):
            fusedloss.cross_entropy(x, t, backend=backend, **kw)


def test_explicit_backend_that_cannot_run():
    x = make((4, 5))
    t = targets((4,), 5)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            fusedloss.cross_entropy(x, t, backend="cuda")


def test_reference_backend_and_env_override(monkeypatch):
    x = make((4, 5))
    t = targets((4,), 5)
    got = fusedloss.cross_entropy(x, t, backend="reference")
    close(got, F.cross_entropy(x, t), torch.float32, "reference backend")
    from fusedloss import _backend
    calls = []
    real = reference.cross_entropy
    monkeypatch.setattr(reference, "cross_entropy",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "reference")
    _backend.reset()  # read at the first call for a device type
    try:
        close(fusedloss.cross_entropy(x, t), F.cross_entropy(x, t), torch.float32, "env override")
        assert calls, "FUSEDLOSS_BACKEND=reference did not route to the reference"
    finally:
        monkeypatch.delenv("FUSEDLOSS_BACKEND")
        _backend.reset()
    calls.clear()
    fusedloss.cross_entropy(x, t)
    assert not calls or not fusedloss.backends()["cpu"]["available"]


@pytest.mark.slow
@pytest.mark.bigmem  # 4 GiB of bf16 logits, their gradient and torch's check: ~13 GB at the peak
def test_more_than_2_pow_31_elements_bf16():
    """pytorch#111484 / Liger: N x V > 2**31 must not overflow a 32-bit offset. CPU backend (the
    interpreter is too slow at this size); zero rows have loss log(C) exactly and the last row is
    random, checked against torch on that row alone."""
    if not fusedloss.backends()["cpu"]["available"]:
        pytest.skip(fusedloss.backends()["cpu"]["why"])
    c = 32768
    n = 2**31 // c + 2  # 2**31 + 65536 elements: the last rows sit past every 32-bit offset
    x = torch.zeros(n, c, dtype=torch.bfloat16)
    last = (torch.randn(c) * 3).to(torch.bfloat16)
    x[-1] = last
    t = torch.zeros(n, dtype=torch.int64)
    t[-1] = c - 5
    x.requires_grad_(True)
    loss = fusedloss.cross_entropy(x, t, reduction="none", backend="cpu")
    up = torch.zeros(n, dtype=torch.bfloat16)
    up[[0, -2, -1]] = 1
    loss.backward(up)
    xl = last.double().requires_grad_(True)
    want = F.cross_entropy(xl[None], t[-1:])
    want.backward()
    assert abs(loss[-1].double() - want).item() <= 2e-2 * abs(want.item())
    torch.testing.assert_close(x.grad[-1].double(), xl.grad, atol=2e-3, rtol=2e-2)
    log_c = torch.tensor(float(c)).log().item()
    assert (abs(loss[-2].float().item() - log_c) < 5e-2
            and abs(loss[0].float().item() - log_c) < 5e-2)
    g_zero = torch.full((c,), 1.0 / c, dtype=torch.float64)
    g_zero[0] -= 1
    torch.testing.assert_close(x.grad[-2].double(), g_zero, atol=1e-3, rtol=1e-2)
    assert (x.grad[1] == 0).all()  # upstream 0 rows: scaled to exactly 0
