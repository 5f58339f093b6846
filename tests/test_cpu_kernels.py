"""The CPU kernel skeletons (csrc/cpu), through the ops built on them, under every instruction-set
copy compiled into fusedloss._C (ATEN_CPU_CAPABILITY=default|avx2|avx512, each in a fresh
process, since torch reads it once).

- elementwise.h (operands broadcast by stride, any strides of the output), via scale_grad_:
  non-contiguous, transposed, expanded and sliced grads and upstream gradients, every dtype,
  against torch's float32 multiply rounded once; bitwise.
- softmax_rows.h (rows, spatial and gathered layouts written once), via cross_entropy: every
  layout and mode against torch in float64.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedloss
from _support import cpu_capabilities

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not fusedloss.backends()["cpu"]["available"],
                                reason="fusedloss._C CPU kernels not built")




def _run(code, cap):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.split()[-1].lower() == cap, p.stdout[-2000:]
    return p.stdout


# One script per capability: the cases are built in the subprocess (a fresh process per copy).
SCALE_GRAD_CASES = r"""
import itertools, torch
import fusedloss  # loads fusedloss._C
torch.manual_seed(0)
op = torch.ops.fusedloss_C.scale_grad_

def grads(n, c, d, dtype):
    # (name, grad) with the same values, in several layouts, with zeros and -0.
    base = torch.randn(n, c, d, dtype=torch.float64) * 3
    base[0, ::3] = 0.0
    base[-1, -1] = -0.0
    base = base.to(dtype)
    yield "contiguous", base.clone()
    yield "class-major", base.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    yield "transposed", base.transpose(1, 2).contiguous().transpose(1, 2)
    yield "sliced", torch.zeros(n, 2 * c + 1, d + 3, dtype=dtype)[:, 1::2, 2:-1].copy_(base)
    yield "reversed", base.flip(1).contiguous().flip(1)

def upstreams(n, d, acc):
    s = torch.rand(n, d, dtype=acc) * 4 - 2
    s[0, 0] = float("nan")
    yield "per-row", s
    yield "transposed", s.t().contiguous().t()
    yield "sliced", torch.zeros(n, 2 * d, dtype=acc)[:, ::2].copy_(s)
    yield "expanded-n", s[:1].expand(n, d)
    yield "expanded-d", s[:, :1].expand(n, d)
    yield "scalar", torch.tensor(-1.75, dtype=acc).expand(n, d)
    yield "scalar-nan", torch.tensor(float("nan"), dtype=acc).expand(n, d)
    yield "float64", s.double()

checked = 0
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for (n, c, d) in [(3, 37, 1), (2, 5, 67), (4, 33, 3), (1, 1, 1), (2, 1, 40)]:
        for (gname, g), (sname, s) in itertools.product(grads(n, c, d, dtype),
                                                        upstreams(n, d, acc)):
            if sname == "float64" and acc == torch.float64:
                continue
            s_acc = s.to(acc)
            want = torch.where(g == 0, torch.zeros((), dtype=acc),
                               g.to(acc) * s_acc[:, None, :]).to(dtype)
            got = g.clone() if gname == "contiguous" else g
            before = got.data_ptr(), got.stride()
            op(got, s)
            assert (got.data_ptr(), got.stride()) == before
            ok = torch.equal(got.isnan(), want.isnan()) and torch.equal(
                got.nan_to_num(), want.nan_to_num())
            assert ok, (dtype, (n, c, d), gname, sname, (got - want).abs().max())
            checked += 1
# the memory around a strided grad is untouched
buf = torch.randn(3, 40, 9)
keep = buf.clone()
view = buf[:, 1:-1:3, 2:7]
op(view, torch.full((3, 5), 2.0))
mask = torch.ones_like(buf, dtype=torch.bool)
mask[:, 1:-1:3, 2:7] = False
assert torch.equal(buf[mask], keep[mask])
assert torch.equal(view, keep[:, 1:-1:3, 2:7] * 2)
# scalar 1: grad untouched (even a NaN stays the same NaN payload)
g = torch.randn(2, 7, 3)
g[0, 0, 0] = float("nan")
ptr_vals = g.clone()
op(g, torch.ones(()).expand(2, 3))
assert torch.equal(g.nan_to_num(), ptr_vals.nan_to_num())
print(checked)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("cap", cpu_capabilities())
def test_scale_grad_broadcast_by_stride(cap):
    """scale_grad_ on the elementwise skeleton: every layout of grad (written through its own
    strides, nothing else touched) times every layout of the upstream gradient (per row,
    transposed, sliced, expanded along N or D, one scalar), bitwise equal to torch's
    float32 multiply rounded once, with exact zeros kept."""
    out = _run(SCALE_GRAD_CASES, cap)
    assert int(out.split()[-2]) > 500


def test_scale_grad_rejects_overlapping_grad():
    g = torch.zeros(1, 1, 1).expand(2, 3, 4)
    with pytest.raises(RuntimeError, match="single memory location|internal overlap"):
        torch.ops.fusedloss_C.scale_grad_(g, torch.full((2, 4), 2.0))


SOFTMAX_ROWS_CASES = r"""
import torch, torch.nn.functional as F
import fusedloss
torch.manual_seed(0)

def layouts(n, c, d):
    base = torch.randn(n, c, d, dtype=torch.float64) * 3
    yield "rows", base[:, :, 0] if d == 1 else None
    yield "spatial", base
    yield "rows-d", base.transpose(1, 2).contiguous().transpose(1, 2)  # class stride 1, D > 1
    yield "class-major", base.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # gathered if D = 1
    yield "gathered", torch.zeros(n, c, 2 * d, dtype=torch.float64)[:, :, ::2].copy_(base)
    yield "strided-rows", torch.zeros(n, c + 5, d, dtype=torch.float64)[:, 2:-3].copy_(base)

checked = 0
for dtype, tol in [(torch.float32, 3e-5), (torch.bfloat16, 3e-2), (torch.float64, 1e-10)]:
    for (n, c, d) in [(5, 37, 1), (3, 2100, 1), (2, 11, 45), (2, 4500, 3)]:
        for name, x0 in layouts(n, c, d):
            if x0 is None:
                continue
            for mode in ["index", "prob"]:
                for kw in [dict(), dict(label_smoothing=0.2), dict(softcap=4.0),
                           dict(weight=True, label_smoothing=0.1, z_loss=1e-3)]:
                    x = x0.to(dtype).requires_grad_(True)
                    tshape = (x.shape[0],) + tuple(x.shape[2:])
                    if mode == "index":
                        t = torch.randint(0, c, tshape)
                        t.view(-1)[0] = -100
                    else:
                        t = torch.softmax(torch.randn(x.shape, dtype=torch.float64), 1).to(dtype)
                    kw = dict(kw)
                    if kw.pop("weight", False):
                        kw["weight"] = (torch.rand(c, dtype=torch.float64) + 0.5).to(
                            torch.float64 if dtype == torch.float64 else torch.float32)
                    cap = kw.pop("softcap", None)
                    up = torch.rand(tshape, dtype=torch.float64) + 0.5
                    loss = fusedloss.cross_entropy(x, t, reduction="none", softcap=cap,
                                                   backend="cpu", **kw)
                    (g,) = torch.autograd.grad(loss, x, up.to(loss.dtype))
                    xr = x.detach().double().requires_grad_(True)
                    xs = cap * torch.tanh(xr / cap) if cap else xr
                    rkw = dict(kw)
                    if "weight" in rkw:
                        rkw["weight"] = rkw["weight"].double()
                    tr = t if mode == "index" else t.double()
                    zl = rkw.pop("z_loss", 0.0)
                    ref = F.cross_entropy(xs, tr, reduction="none", **rkw)
                    if zl:
                        lse = torch.logsumexp(xs, 1)
                        wy = rkw["weight"][t.clamp(min=0)] if mode == "index" else 1.0
                        valid = (t != -100) if mode == "index" else True
                        ref = ref + zl * wy * lse ** 2 * valid
                    (gr,) = torch.autograd.grad(ref, xr, up)
                    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
                    torch.testing.assert_close(g.double(), gr, rtol=tol, atol=tol)
                    checked += 1
print(checked)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("cap", cpu_capabilities())
def test_softmax_rows_layouts_and_policies(cap):
    """cross_entropy's two policies on the softmax-row skeleton, in each of its layouts (rows,
    spatial, gathered, strided rows; more than one pass-1 chunk; a masked tail), with label
    smoothing, softcap, weights and z_loss, against torch in float64."""
    out = _run(SOFTMAX_ROWS_CASES, cap)
    assert int(out.split()[-2]) > 100


# The per-element losses on the elementwise skeleton, under every instruction-set copy: both ops,
# every dtype, 'none' / 'sum' (the skeleton's block sums, across block boundaries), operands
# contiguous, transposed, sliced and broadcast (the fast inner-stride specialisations and the
# gathered path), hard and soft targets, against the float64 reference.
EW_LOSS_CASES = r"""
import torch
import fusedloss
from fusedloss import reference
torch.manual_seed(0)
C = torch.ops.fusedloss_C

def layouts(shape, dtype):
    base = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype)
    yield "contiguous", base
    yield "transposed", base.transpose(-1, -2).contiguous().transpose(-1, -2)
    yield "sliced", torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype)[..., ::2].copy_(base)

checked = 0
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    tol = {torch.float32: 2e-5, torch.float64: 1e-10}.get(dtype, 1e-2)
    for shape in ((3, 37), (2, 17000)):
        t = torch.rand(shape, dtype=torch.float64)
        t[:, ::2] = (t[:, ::2] > 0.5).double()
        for wname, w in (("none", None), ("row", torch.rand(shape[-1], dtype=torch.float64)),
                         ("col", torch.rand(shape[0], 1, dtype=torch.float64)),
                         ("full", torch.rand(shape, dtype=torch.float64))):
            for name, x in layouts(shape, dtype):
                td = t.to(dtype) if w is None else t  # float64 operands: the acc-dtype path
                xd = x.double()
                for red in (0, 2):
                    scale = 1.0
                    l, g = C.bce_fwd(x, td, w, w, scale, red, True)
                    xr = xd.clone().requires_grad_()
                    lr = reference.binary_cross_entropy_with_logits(
                        xr, td.double(), w, "none" if red == 0 else "sum", w)
                    (gr,) = torch.autograd.grad(lr.sum(), xr)
                    torch.testing.assert_close(l.double(), lr.detach(), rtol=tol, atol=tol)
                    torch.testing.assert_close(g.double(), gr, rtol=tol, atol=tol)
                    l, g = C.sigmoid_focal_fwd(x, td, w, 0.25, 0.5, scale, red, True)
                    lr = reference.sigmoid_focal_loss(xr, td.double(), 0.25, 0.5,
                                                      "none" if red == 0 else "sum", weight=w)
                    (gr,) = torch.autograd.grad(lr.sum(), xr)
                    torch.testing.assert_close(l.double(), lr.detach(), rtol=tol, atol=tol)
                    torch.testing.assert_close(g.double(), gr, rtol=tol, atol=tol)
                    checked += 2
print(checked)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("cap", cpu_capabilities())
def test_elementwise_losses_every_isa(cap):
    """bce_fwd and sigmoid_focal_fwd on every instruction-set copy of the elementwise skeleton."""
    out = _run(EW_LOSS_CASES, cap)
    assert int(out.split()[-2]) > 300
