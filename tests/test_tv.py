"""fusedloss.total_variation on every fused backend that runs here: what is particular to it (the
generic checks come from the op table in tests/_support.py).

Against the reference: every norm, weighted and not, every reduction, layouts (channels_last,
transposed, strided), H or W = 1, band boundaries of the CPU tiling; half precision by the 2x-torch
rule; determinism across thread counts; the upstream gradient of 'none'. Against the peers'
formulas: the tutorials' TVLoss ('mean' = sum of absolute differences / numel), kornia's
anisotropic total_variation (its per-image 'sum'; its 'mean' averages each direction over its own
count, which is not one of fusedloss's reductions: README), BasicSR's WeightedTVLoss weights.
"""

import subprocess
import sys

import pytest
import torch

import fusedloss
from _support import TOL, assert_half_precision_ok, make
from fusedloss import reference

NORMS = ("l1", "l2_squared", "isotropic")
REDUCTIONS = ("none", "sum", "mean")


def run(fn, x, *args, upstream=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss, x.grad


def close(a, b, dtype, what=""):
    tol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def check(backend, x, weight=None, dtype=torch.float32, upstream=None, **kw):
    x = x.to(dtype)
    if weight is not None:
        weight = weight.to(dtype)
    got, g_got = run(fusedloss.total_variation, x, weight, upstream=upstream, backend=backend,
                     **kw)
    want, g_want = run(reference.total_variation, x, weight, upstream=upstream, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    close(got, want, dtype, "loss")
    assert g_got.shape == x.shape
    close(g_got, g_want, dtype, "grad")
    return got, g_got


def layouts(x):
    """The same images contiguous, channels_last, transposed in H/W, and strided."""
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "transposed", x.transpose(-1, -2).contiguous().transpose(-1, -2)
    yield "strided", torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype,
                                 device=x.device)[..., ::2].copy_(x)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", (False, True), ids=("unweighted", "weighted"))
def test_matches_reference(backend, device, norm, reduction, weighted):
    x = make((2, 3, 9, 37), device=device)
    w = torch.rand(2, 1, 9, 37, device=device) + 0.5 if weighted else None
    eps = 1e-4 if norm == "isotropic" else 0.0
    check(backend, x, w, norm=norm, reduction=reduction, eps=eps)
    check(backend, x.double(), w, torch.float64, norm=norm, reduction=reduction, eps=eps)


@pytest.mark.parametrize("norm", NORMS)
def test_layouts(backend, device, norm):
    x = make((2, 3, 11, 20), device=device)
    w = torch.rand(2, 1, 11, 20, device=device)
    for _, xl in layouts(x):
        assert xl.shape == x.shape
        for weight in (None, w, w.transpose(-1, -2).contiguous().transpose(-1, -2)):
            check(backend, xl, weight, norm=norm, reduction="none")


@pytest.mark.parametrize("shape", [(1, 1), (1, 50), (50, 1), (3, 1, 1), (2, 2, 1, 17),
                                   (2, 2, 17, 1), (1, 1, 2, 2), (1, 1, 130, 300)])
@pytest.mark.parametrize("norm", NORMS)
def test_shapes(backend, device, shape, norm):
    """H or W of 1, tiny images, and (CPU) images of several bands (rows per band from W)."""
    x = make(shape, device=device)
    check(backend, x, norm=norm, reduction="none")
    check(backend, x, torch.rand(shape[-2:], device=device), norm=norm, reduction="sum")


@pytest.mark.parametrize("width", [1, 7, 15, 16, 17, 31, 32, 33, 65, 100])
def test_widths(backend, device, width):
    """Vector tails: widths around the vector sizes (8, 16 floats; 32 bf16)."""
    x = make((2, 2, 6, width), device=device)
    for norm in NORMS:
        check(backend, x, torch.rand(2, 1, 6, width, device=device), norm=norm)


def test_broadcast_weights(backend, device):
    x = make((2, 3, 8, 10), device=device)
    for shape in [(10,), (8, 1), (3, 1, 1), (2, 1, 1, 1), (1, 3, 8, 10), (2, 3, 8, 10)]:
        check(backend, x, torch.rand(shape, device=device), norm="isotropic")


def test_upstream_none(backend, device):
    """reduction='none': each image's gradient times its upstream value."""
    x = make((3, 2, 5, 6), device=device)
    up = torch.randn(3, 2, device=device)
    for norm in NORMS:
        check(backend, x, upstream=up, norm=norm, reduction="none")
    check(backend, x, upstream=torch.tensor(2.5, device=device), norm="l1", reduction="mean")


def test_sign_at_zero(backend, device):
    """l1: sgn(0) = 0 (flat regions get a zero gradient); isotropic: 0 where the norm is 0."""
    x = torch.zeros(1, 1, 6, 6, device=device)
    x[0, 0, 2:4, 2:4] = 1.0
    for norm in NORMS:
        loss, g = check(backend, x, norm=norm, reduction="sum")
        assert g[0, 0, 0, 0] == 0 and g[0, 0, 5, 5] == 0
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("norm", NORMS)
def test_half_precision(backend, device, dtype, norm):
    """Within twice the error of torch's own half-precision slicing form (float32 accumulation)."""
    x = make((2, 3, 33, 70), device=device, scale=1.0)
    xh = x.to(dtype)
    ref64 = reference.total_variation(xh.double(), norm=norm, reduction="none")
    got = fusedloss.total_variation(xh, norm=norm, reduction="none", backend=backend)
    assert got.dtype == dtype
    dv = xh[..., 1:, :] - xh[..., :-1, :]
    dh = xh[..., :, 1:] - xh[..., :, :-1]
    if norm == "l1":
        theirs = dv.abs().sum((-2, -1)) + dh.abs().sum((-2, -1))
    elif norm == "l2_squared":
        theirs = (dv * dv).sum((-2, -1)) + (dh * dh).sum((-2, -1))
    else:
        dvf = torch.nn.functional.pad(dv, (0, 0, 0, 1))
        dhf = torch.nn.functional.pad(dh, (0, 1, 0, 0))
        theirs = (dvf * dvf + dhf * dhf).sqrt().sum((-2, -1))
    assert_half_precision_ok(got, theirs, ref64, f"{dtype} {norm}", floor=1e-3)
    # the gradient: against the float64 gradient of the same (rounded) images
    _, g = run(fusedloss.total_variation, xh, norm=norm, backend=backend)
    _, g64 = run(reference.total_variation, xh.double(), norm=norm)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), g64, rtol=1e-2, atol=1e-2 * g64.abs().max().item())


def test_deterministic_across_threads(backend, device):
    """Per-image sums from fixed bands in a fixed order: bitwise the same for 1 and 2 threads."""
    if backend != "cpu":
        pytest.skip("thread count: CPU")
    code = (
        "import torch, fusedloss\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(2, 3, 300, 257)\n"
        "out = []\n"
        "for t in (1, 2):\n"
        "    torch.set_num_threads(t)\n"
        "    y = x.clone().requires_grad_()\n"
        "    l = fusedloss.total_variation(y, norm='isotropic', reduction='none')\n"
        "    l.sum().backward()\n"
        "    out.append((l.detach(), y.grad))\n"
        "assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tutorial_tvloss_mean(backend, device):
    """The tutorials' TVLoss: (sum |dv| + sum |dh|) / numel is fusedloss's l1 'mean'."""
    x = make((4, 3, 16, 24), device=device)
    tutorial = ((x[..., 1:, :] - x[..., :-1, :]).abs().sum()
                + (x[..., :, 1:] - x[..., :, :-1]).abs().sum()) / x.numel()
    close(fusedloss.total_variation(x, backend=backend), tutorial, torch.float32, "TVLoss")


def test_basicsr_weighted(backend, device):
    """BasicSR's WeightedTVLoss weights w[..., :-1, :] the vertical and w[..., :, :-1] the
    horizontal differences: fusedloss's weight (the terms that start at each pixel)."""
    x = make((2, 3, 10, 12), device=device)
    w = torch.rand(2, 1, 10, 12, device=device)
    want = (((x[..., 1:, :] - x[..., :-1, :]).abs() * w[..., :-1, :]).sum()
            + ((x[..., :, 1:] - x[..., :, :-1]).abs() * w[..., :, :-1]).sum())
    close(fusedloss.total_variation(x, w, reduction="sum", backend=backend), want,
          torch.float32, "BasicSR")


def test_kornia_anisotropic(backend, device):
    """kornia.losses.total_variation(img, 'sum') is the per-image l1 ('none'), over the last two
    axes with every leading axis kept. Its 'mean' averages each direction over its own count
    ((H-1) W and H (W-1)), which no fusedloss reduction is; checked here from the two sums."""
    kornia = pytest.importorskip("kornia")
    x = make((2, 3, 9, 13), device=device)
    got = fusedloss.total_variation(x, reduction="none", backend=backend)
    close(got, kornia.losses.total_variation(x, reduction="sum"), torch.float32, "kornia sum")
    h, w = x.shape[-2:]
    # a single column has vertical terms only
    sum_v = sum(fusedloss.total_variation(x[..., :, j:j + 1], reduction="none", backend=backend)
                for j in range(w))
    sum_h = got - sum_v
    close(sum_v / ((h - 1) * w) + sum_h / (h * (w - 1)),
          kornia.losses.total_variation(x, reduction="mean"), torch.float32, "kornia mean")


def test_weight_gradient_refused(backend, device):
    x = make((1, 1, 4, 4), device=device)
    w = torch.rand(4, 4, device=device, requires_grad=True)
    with pytest.raises(NotImplementedError, match="weight"):
        fusedloss.total_variation(x, w, backend=backend)
    # the reference differentiates the weight
    reference.total_variation(x, w).backward()
    assert w.grad is not None


def test_module(backend, device):
    x = make((2, 3, 8, 8), device=device)
    m = fusedloss.nn.TotalVariationLoss(norm="isotropic", eps=1e-3, reduction="sum",
                                        backend=backend)
    assert "isotropic" in repr(m)
    close(m(x), reference.total_variation(x, norm="isotropic", eps=1e-3, reduction="sum"),
          torch.float32, "module")
    w = torch.rand(2, 1, 8, 8, device=device)
    close(m(x, w), reference.total_variation(x, w, norm="isotropic", eps=1e-3, reduction="sum"),
          torch.float32, "module weighted")


def test_no_grad_path(backend, device):
    """Without a gradient the kernel only sums (and returns the same loss)."""
    x = make((2, 3, 20, 30), device=device)
    with torch.no_grad():
        a = fusedloss.total_variation(x, norm="isotropic", reduction="none", backend=backend)
    b = fusedloss.total_variation(x.clone().requires_grad_(), norm="isotropic",
                                  reduction="none", backend=backend)
    assert torch.equal(a, b.detach())


def test_isotropic_eps(backend, device):
    """eps enters every pixel's norm (flat images give numel * sqrt(eps) per weight)."""
    x = torch.ones(2, 3, 5, 4, device=device)
    got = fusedloss.total_variation(x, norm="isotropic", eps=0.04, reduction="sum",
                                    backend=backend)
    close(got, torch.tensor(x.numel() * 0.2, device=device), torch.float32, "flat")


TV_ISA_CASES = r"""
import torch
import fusedloss
from fusedloss import reference
torch.manual_seed(0)
for shape in [(2, 3, 9, 37), (1, 2, 70, 600), (3, 1, 17), (2, 5, 1)]:
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.rand(shape[-2:], dtype=torch.float64)
    layouts = [x, x.transpose(-1, -2).contiguous().transpose(-1, -2)]
    for xl in layouts:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for norm in ("l1", "l2_squared", "isotropic"):
                for weight in (None, w):
                    a = xl.to(dtype).clone().requires_grad_()
                    b = a.detach().double().clone().requires_grad_()
                    la = fusedloss.total_variation(a, weight, norm=norm, reduction="none")
                    lb = reference.total_variation(b, weight, norm=norm, reduction="none")
                    la.sum().backward(); lb.sum().backward()
                    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
                    scale = lb.abs().max().item() + 1
                    err = (la.double() - lb).abs().max().item()
                    assert err <= tol * scale, (shape, dtype, norm)
                    gs = b.grad.abs().max().item() + 1
                    err = (a.grad.double() - b.grad).abs().max().item()
                    assert err <= tol * gs, (shape, dtype, norm)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("cap", ["default", "avx2", "avx512"])
def test_every_isa_copy(cap):
    """The CPU stencil under each instruction-set copy compiled into fusedloss._C (vector widths
    8 and 16 floats, and the generic copy), every dtype and norm, against the float64 reference
    on the same rounded images."""
    from _support import cpu_capabilities

    if cap not in cpu_capabilities():
        pytest.skip(f"this CPU cannot run the {cap} copy")
    if not fusedloss.backends("tv")["cpu"]["available"]:
        pytest.skip("fusedloss._C CPU kernels not built")
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", TV_ISA_CASES], cwd=root, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "ATEN_CPU_CAPABILITY": cap})
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.split()[-1].lower() == cap
