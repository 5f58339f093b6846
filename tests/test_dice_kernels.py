"""The CPU kernels of the Dice device ops, torch.ops.fusedloss_C.dice_fwd / dice_bwd, called
directly against the float64 oracle of tests/_dice_oracle.py (docs/KERNELS.md, "Dice").

- every flag combination (softmax: squared_pred x with_ce x with_smoothing; sigmoid:
  squared_pred), float64 (tight), float32, and bfloat16 / float16 (the oracle on the same rounded
  inputs: the sums to float32's tolerance, the gradient to one rounding of its dtype);
- shapes: N = 1, D = 1, D = 0, N = 0, C = 2, 19, 70 and 150 (past any tile), D not a multiple of
  any vector pair, several fixed blocks per row (partials added in order);
- layouts: contiguous (N, C, D), channels_last (class stride 1), sliced and strided views, a
  non-contiguous target; the gradient keeps a dense input's strides;
- ignore_index (also a value inside [0, C), rows with every position ignored), bad targets
  raising a RuntimeError naming target in both ops, NaN propagation, determinism (two calls, and
  1 vs 2 threads, bitwise), and every instruction-set copy (ATEN_CPU_CAPABILITY, subprocesses).
"""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _dice_oracle import dice_grad_oracle, dice_sums_oracle

import fusedloss
from _support import cpu_capabilities

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not fusedloss.backends()["cpu"]["available"],
                                reason="fusedloss._C CPU kernels not built")

OPS = torch.ops.fusedloss_C if fusedloss.backends()["cpu"]["available"] else None

SOFTMAX_FLAGS = list(itertools.product([False, True], repeat=3))  # squared_pred, with_ce, with_sm
ALL_FLAGS = [(False, sq, ce, sm) for sq, ce, sm in SOFTMAX_FLAGS] + [
    (True, sq, False, False) for sq in (False, True)]  # (sigmoid, squared_pred, with_ce, with_sm)

# Sums: the kernel reads the same rounded values as the oracle, so every dtype is compared with
# its accumulation dtype's tolerance. Gradient: plus one rounding to the input's dtype.
SUM_TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def logits(n, c, d, dtype=torch.float64, scale=3.0):
    return (torch.randn(n, c, d, dtype=torch.float64) * scale).to(dtype)


def channels_last(x):
    """The same values with class stride 1 and position stride C (an NHWC tensor's (N, C, H*W))."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def make_target(x, sigmoid, ignore_index=-100, ignore_frac=0.2):
    n, c, d = x.shape
    if sigmoid:
        t = torch.rand(n, c, d, dtype=torch.float64)
        t[torch.rand(n, c, d) < 0.3] = 1.0  # hard and soft labels
        t[torch.rand(n, c, d) < 0.3] = 0.0
        return t.to(x.dtype)
    t = torch.randint(0, c, (n, d))
    if ignore_frac:
        t[torch.rand(n, d) < ignore_frac] = ignore_index
    return t


def run(x, t, flags, ignore_index=-100, gs=None):
    sigmoid, sq, ce, sm = flags
    sums, lse = OPS.dice_fwd(x, t, ignore_index, sigmoid, sq, ce, sm)
    if gs is None:
        gs = torch.randn(sums.shape, dtype=sums.dtype)
    grad = OPS.dice_bwd(gs, x, t, lse, ignore_index, sigmoid, sq, ce, sm)
    return sums, lse, grad, gs


def check(x, t, flags, ignore_index=-100, what=""):
    """dice_fwd and dice_bwd of x (any layout, any dtype) against the oracle on the same values."""
    sigmoid, sq, ce, sm = flags
    sums, lse, grad, gs = run(x, t, flags, ignore_index)
    n, c, d = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert sums.shape == (n, c, 5) and sums.dtype == acc and sums.is_contiguous()
    assert lse.dtype == acc and lse.shape == ((0,) if sigmoid else (n, d))
    assert grad.shape == x.shape and grad.dtype == x.dtype
    want, want_lse = dice_sums_oracle(x, t, ignore_index, sigmoid, sq, ce, sm)
    tol = SUM_TOL[x.dtype]
    torch.testing.assert_close(sums.double(), want, rtol=tol, atol=tol,
                               msg=lambda m: f"{what} {flags} sums: {m}")
    if not sigmoid:
        valid = t != ignore_index
        torch.testing.assert_close(lse.double()[valid], want_lse[valid], rtol=tol, atol=tol,
                                   msg=lambda m: f"{what} {flags} lse: {m}")
    g_want = dice_grad_oracle(gs, x, t, ignore_index, sigmoid, sq, ce, sm)
    gtol = GRAD_TOL[x.dtype]
    scale = max(1.0, g_want.abs().max().item()) if g_want.numel() else 1.0
    torch.testing.assert_close(grad.double(), g_want, rtol=gtol, atol=gtol * scale,
                               msg=lambda m: f"{what} {flags} grad: {m}")
    if not sigmoid:  # ignored positions: exactly 0
        assert (grad.permute(0, 2, 1)[t == ignore_index] == 0).all()
        # No saved lse (what the Python layer passes): recomputed per tile, the same gradient.
        grad2 = OPS.dice_bwd(gs, x, t, lse.new_empty(0), ignore_index, sigmoid, sq, ce, sm)
        torch.testing.assert_close(grad2.double(), g_want, rtol=gtol, atol=gtol * scale,
                                   msg=lambda m: f"{what} {flags} grad without lse: {m}")
        assert (grad2.permute(0, 2, 1)[t == ignore_index] == 0).all()
    return sums, grad


@pytest.mark.parametrize("flags", ALL_FLAGS, ids=lambda f: "-".join(
    k for k, v in zip(("sigmoid", "sq", "ce", "sm"), f) if v) or "plain")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flags(flags, dtype):
    for n, c, d in [(2, 5, 37), (1, 19, 300), (3, 2, 1), (37, 6, 1)]:
        x = logits(n, c, d, dtype)
        check(x, make_target(x, flags[0]), flags, what=f"({n}, {c}, {d})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flags", [(False, False, False, False), (False, True, True, True),
                                   (True, False, False, False), (True, True, False, False)])
def test_half(dtype, flags):
    for n, c, d in [(2, 19, 100), (1, 4, 33)]:
        x = logits(n, c, d, dtype)
        check(x, make_target(x, flags[0]), flags, what=f"{dtype}")
        check(channels_last(x), make_target(x, flags[0]), flags, what=f"{dtype} channels_last")


SHAPES = [(1, 4, 1), (5, 3, 1), (70, 19, 1), (1, 2, 31), (2, 19, 65), (2, 70, 45), (1, 150, 70),
          (1, 19, 5000), (2, 70, 1100), (1, 2, 4097)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("sigmoid", [False, True])
def test_shapes(shape, sigmoid):
    """Odd sizes, tails, C past any tile, several fixed blocks per row (D > K)."""
    flags = (sigmoid, True, not sigmoid, not sigmoid)
    x = logits(*shape, dtype=torch.float64)
    check(x, make_target(x, sigmoid), flags, what=str(shape))
    x = logits(*shape, dtype=torch.float32)
    check(x, make_target(x, sigmoid), flags, what=str(shape))


@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 4, 5), (0, 2, 0)], ids=str)
@pytest.mark.parametrize("sigmoid", [False, True])
def test_empty(shape, sigmoid):
    n, c, d = shape
    x = logits(n, c, d, torch.float32)
    t = make_target(x, sigmoid)
    sums, lse, grad, _ = run(x, t, (sigmoid, False, not sigmoid, not sigmoid))
    assert sums.shape == (n, c, 5) and (sums == 0).all()
    assert lse.shape == ((0,) if sigmoid else (n, d))
    assert grad.shape == x.shape


def layouts(n, c, d, dtype):
    base = logits(n, c, d, dtype)
    yield "contiguous", base
    yield "channels_last", channels_last(base)
    yield "sliced", torch.zeros(n, 2 * c + 1, d + 3, dtype=dtype)[:, 1::2, 2:-1].copy_(base)
    yield "strided", torch.zeros(n, d, 2 * c, dtype=dtype)[:, :, ::2].transpose(1, 2).copy_(base)
    yield "expanded", base[:, :, :1].expand(n, c, d)


@pytest.mark.parametrize("flags", [(False, False, True, True), (False, True, False, False),
                                   (True, False, False, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layouts(flags, dtype):
    for name, x in layouts(3, 7, 45, dtype):
        t = make_target(x, flags[0])
        check(x, t, flags, what=name)
        if flags[0]:  # a target in another layout than the input's
            check(x, channels_last(t), flags, what=name + " cl-target")
            ts = torch.zeros(3, 7, 90, dtype=t.dtype)[:, :, ::2].copy_(t)
            check(x, ts, flags, what=name + " sliced target")
        else:  # a non-contiguous target
            tn = torch.full((3, 2 * 45), 5, dtype=torch.long)[:, ::2].copy_(t)
            check(x, tn, flags, what=name + " strided target")
            check(x, t.t().contiguous().t(), flags, what=name + " transposed target")


@pytest.mark.parametrize("sigmoid", [False, True])
def test_grad_strides(sigmoid):
    x4 = torch.randn(2, 5, 6, 7).to(memory_format=torch.channels_last)
    x = x4.flatten(2)  # (N, C, H*W) with class stride 1
    assert x.stride() == (5 * 42, 1, 5)
    t = make_target(x, sigmoid)
    _, _, grad, _ = run(x, t, (sigmoid, False, False, False))
    assert grad.stride() == x.stride()
    for name, y in layouts(2, 5, 9, torch.float32):
        _, _, grad, _ = run(y, make_target(y, sigmoid), (sigmoid, False, False, False))
        # torch.empty_like: input's strides when non-overlapping and dense, else dense strides
        # in input's stride order
        assert grad.stride() == torch.empty_like(y).stride(), name
        if name in ("contiguous", "channels_last"):
            assert grad.stride() == y.stride(), name


@pytest.mark.parametrize("flags", [(False, False, True, True), (False, True, True, False)])
def test_ignore_index(flags):
    x = logits(3, 6, 50)
    for ii in (-100, 2, -1):
        t = make_target(x, False, ignore_index=ii, ignore_frac=0.3)
        t[1] = ii  # a row with every position ignored
        sums, grad = check(x, t, flags, ignore_index=ii, what=f"ignore_index={ii}")
        assert (sums[1] == 0).all()
        assert (grad[1] == 0).all()
    t = torch.full((3, 50), -100)  # everything ignored
    sums, grad = check(x, t, flags, what="all ignored")
    assert (sums == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("op", ["fwd", "bwd"])
@pytest.mark.parametrize("bad", [6, 1000, -1, -101])
def test_bad_target(op, bad):
    x = logits(2, 6, 40, torch.float32)
    t = make_target(x, False)
    sums, lse = OPS.dice_fwd(x, t, -100, False, False, True, True)
    t[1, 37] = bad
    with pytest.raises(RuntimeError, match=rf"target.*{bad}"):
        if op == "fwd":
            OPS.dice_fwd(x, t, -100, False, False, True, True)
        else:
            OPS.dice_bwd(torch.randn_like(sums), x, t, lse, -100, False, False, True, True)


def test_bad_arguments():
    x = logits(2, 6, 40, torch.float32)
    t = make_target(x, False)
    with pytest.raises(RuntimeError, match="target"):
        OPS.dice_fwd(x, t.int(), -100, False, False, False, False)
    with pytest.raises(RuntimeError, match="target"):
        OPS.dice_fwd(x, t[:, :-1], -100, False, False, False, False)
    with pytest.raises(RuntimeError, match="target"):
        OPS.dice_fwd(x, x.double(), -100, True, False, False, False)
    with pytest.raises(RuntimeError, match="with_ce"):
        OPS.dice_fwd(x, x, -100, True, False, True, False)
    with pytest.raises(RuntimeError, match="input"):
        OPS.dice_fwd(x.int(), t, -100, False, False, False, False)
    sums, lse = OPS.dice_fwd(x, t, -100, False, False, False, False)
    with pytest.raises(RuntimeError, match="grad_sums"):
        OPS.dice_bwd(sums[:, :, :4], x, t, lse, -100, False, False, False, False)
    with pytest.raises(RuntimeError, match="lse"):
        OPS.dice_bwd(sums, x, t, lse[:, :-1], -100, False, False, False, False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_nan(dtype):
    """A NaN logit at a counted position: NaN in P and SM of every class of its n, in I and NLL of
    its target class, NaN in its own gradient; nothing else changes. At an ignored position: no
    effect at all."""
    x = logits(2, 5, 40, dtype)
    t = make_target(x, False, ignore_frac=0.0)
    t[0, 7] = -100
    flags = (False, True, True, True)
    clean, _, g_clean, gs = run(x, t, flags)
    xn = x.clone()
    xn[1, 2, 11] = float("nan")
    xn[0, 3, 7] = float("nan")  # ignored position
    sums, lse, grad, _ = run(xn, t, flags, gs=gs)
    assert lse[0, 7] == 0  # an ignored position's lse: finite whatever its logits
    y = t[1, 11].item()
    nan = torch.zeros(2, 5, 5, dtype=torch.bool)
    nan[1, :, 1] = nan[1, :, 4] = True
    nan[1, y, 0] = nan[1, y, 3] = True
    assert torch.equal(sums.isnan(), nan)
    assert torch.equal(sums[~nan], clean[~nan])
    gnan = torch.zeros(x.shape, dtype=torch.bool)
    gnan[1, :, 11] = True
    assert torch.equal(grad.isnan(), gnan)
    assert torch.equal(grad[~gnan], g_clean[~gnan])
    # sigmoid: the element's own class
    xs = x.clone()
    ts = make_target(x, True)
    xs[1, 2, 11] = float("nan")
    sums, _, grad, _ = run(xs, ts, (True, False, False, False))
    assert torch.equal(sums.isnan().any(-1), (xs.isnan().any(-1)))
    assert torch.equal(grad.isnan(), xs.isnan())


def test_extreme_logits():
    """Large logits (exp would overflow without the max), -inf logits and +inf."""
    x = logits(2, 4, 33) * 1e3
    t = make_target(x, False, ignore_frac=0.0)
    check(x, t, (False, True, True, True), what="x1e3")
    # float32: the saved lse is rounded to float32, so the backward's p = exp(z - lse) carries a
    # relative error up to |lse| * 2^-24 (3e-4 at 3000): checked against that bound.
    xf = x.float()
    sums, lse, grad, gs = run(xf, t, (False, False, True, True))
    want, _ = dice_sums_oracle(xf, t, -100, False, False, True, True)
    torch.testing.assert_close(sums.double(), want, rtol=2e-5, atol=2e-5)
    g_want = dice_grad_oracle(gs, xf, t, -100, False, False, True, True)
    bound = 4 * 2.0**-24 * xf.abs().max().item() * max(1.0, g_want.abs().max().item())
    torch.testing.assert_close(grad.double(), g_want, rtol=0, atol=bound)
    xs = logits(2, 4, 33) * 200  # sigmoid saturates both ways without NaN
    check(xs, make_target(xs, True), (True, True, False, False), what="sigmoid x200")
    xi = logits(1, 3, 20)
    xi[0, 1, 5] = float("inf")
    sums, lse, grad, _ = run(xi, make_target(xi, False, ignore_frac=0.0),
                             (False, False, False, False))
    assert lse[0, 5].isnan() and sums[0, :, 1].isnan().all() and grad[0, :, 5].isnan().all()


@pytest.mark.parametrize("sigmoid", [False, True])
def test_deterministic(sigmoid):
    """Bitwise-equal sums and gradients on every call, whatever the thread count."""
    x = logits(3, 19, 5000, torch.float32)  # three blocks per row, several threads
    t = make_target(x, sigmoid)
    flags = (sigmoid, False, not sigmoid, not sigmoid)
    gs = torch.randn(3, 19, 5)
    threads = torch.get_num_threads()
    try:
        out = []
        for nt in (2, 2, 1):
            torch.set_num_threads(nt)
            sums, lse, grad, _ = run(x, t, flags, gs=gs)
            out.append((sums, lse, grad))
    finally:
        torch.set_num_threads(threads)
    for sums, lse, grad in out[1:]:
        assert torch.equal(sums, out[0][0])
        assert torch.equal(lse, out[0][1])
        assert torch.equal(grad, out[0][2])


def test_unrequested_sums_and_grads():
    """NLL and SM are 0 without with_ce / with_smoothing, and their upstream gradients then have no
    effect; G's upstream gradient never has one."""
    x = logits(2, 5, 30)
    t = make_target(x, False)
    sums, lse = OPS.dice_fwd(x, t, -100, False, False, False, False)
    assert (sums[..., 3:] == 0).all()
    gs = torch.randn(2, 5, 5, dtype=torch.float64)
    g0 = OPS.dice_bwd(gs, x, t, lse, -100, False, False, False, False)
    gs2 = gs.clone()
    gs2[..., 2:] = torch.randn(2, 5, 3, dtype=torch.float64)
    assert torch.equal(g0, OPS.dice_bwd(gs2, x, t, lse, -100, False, False, False, False))
    xs = logits(2, 5, 30)
    ts = make_target(xs, True)
    sums, lse = OPS.dice_fwd(xs, ts, -100, True, False, False, False)
    assert (sums[..., 3:] == 0).all() and lse.shape == (0,)
    g0 = OPS.dice_bwd(gs, xs, ts, lse, -100, True, False, False, False)
    assert torch.equal(g0, OPS.dice_bwd(gs2, xs, ts, lse, -100, True, False, False, False))


ISA_SCRIPT = r"""
import itertools, sys, torch
sys.path.insert(0, "tests")
import fusedloss
from _dice_oracle import dice_grad_oracle, dice_sums_oracle
torch.manual_seed(0)
ops = torch.ops.fusedloss_C
flags_all = [(False, sq, ce, sm) for sq, ce, sm in itertools.product([False, True], repeat=3)]
flags_all += [(True, False, False, False), (True, True, False, False)]
for (n, c, d), dtype, flags in itertools.product(
        [(2, 5, 37), (1, 19, 2100), (2, 70, 9), (40, 5, 1)],
        [torch.float64, torch.float32, torch.bfloat16], flags_all):
    sigmoid, sq, ce, sm = flags
    base = (torch.randn(n, c, d, dtype=torch.float64) * 3).to(dtype)
    for x in (base, base.transpose(1, 2).contiguous().transpose(1, 2)):
        if sigmoid:
            t = torch.rand(n, c, d, dtype=torch.float64).to(dtype)
        else:
            t = torch.randint(0, c, (n, d))
            t[torch.rand(n, d) < 0.2] = -100
        sums, lse = ops.dice_fwd(x, t, -100, sigmoid, sq, ce, sm)
        gs = torch.randn(sums.shape, dtype=sums.dtype)
        g = ops.dice_bwd(gs, x, t, lse, -100, sigmoid, sq, ce, sm)
        want, _ = dice_sums_oracle(x, t, -100, sigmoid, sq, ce, sm)
        gw = dice_grad_oracle(gs, x, t, -100, sigmoid, sq, ce, sm)
        tol = 1e-11 if dtype == torch.float64 else 2e-5
        gtol = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(sums.double(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(g.double(), gw, rtol=gtol, atol=gtol * max(1, gw.abs().max()))
        assert g.stride() == x.stride()
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("cap", cpu_capabilities())
def test_every_isa(cap):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(ISA_SCRIPT)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.split()[-1].lower() == cap, p.stdout[-2000:]


@pytest.mark.parametrize("sigmoid", [False, True])
def test_streamed_gradient(sigmoid):
    """A gradient of 32 MiB or more is written with streaming stores (whole aligned pairs): the
    same values as the ordinary stores of a small call on a slice of the positions (each
    position's gradient depends only on its logits, target, lse and its row's grad_sums)."""
    n, c, d = 1, 4, 1 << 21  # 32 MiB of float32
    x = logits(n, c, d, torch.float32)
    t = make_target(x, sigmoid)
    sums, lse, grad, gs = run(x, t, (sigmoid, True, not sigmoid, not sigmoid))
    for a, b in [(0, 4096), (d // 2 + 64, d // 2 + 4096 + 64 + 5), (d - 3000, d)]:
        ts = t[..., a:b].contiguous()
        ls = lse if sigmoid else lse[:, a:b].contiguous()
        g = OPS.dice_bwd(gs, x[..., a:b].contiguous(), ts, ls, -100, sigmoid, True,
                         not sigmoid, not sigmoid)
        assert torch.equal(g, grad[..., a:b])
