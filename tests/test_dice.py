"""fusedloss.dice_loss / tversky_loss / dice_ce_loss: the reference against MONAI itself (its
spec), the Python path (op layer and the shared epilogue on the (N, C, 5) sums) on an ORACLE
backend that serves dice_fwd / dice_bwd from tests/_dice_oracle.py, and every fused backend that
has the device ops against the reference.

The oracle backend stays: it checks the epilogue, the canonical view, the custom ops' autograd,
fake kernels and torch.compile independently of the kernels. Tests on a real backend skip when
``fusedloss.backends("dice")`` says it has no kernel; the generic checks (non-contiguous, empty,
NaN, gradcheck, opcheck, compile, bad arguments) of real backends come from the OPS row in
tests/_support.py, run by tests/test_ops.py.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from _dice_oracle import dice_grad_oracle, dice_sums_oracle

import fusedloss
from _support import (
    Sample,
    _dice,
    _dice_bad,
    _dice_compile,
    _dice_gradcheck,
    _dice_ops,
    _dice_ref,
    _dice_samples,
    _dice_torch_half,
    assert_close,
    assert_half_precision_ok,
    channels_last,
    class_targets,
    loss_and_grads,
    make,
    noncontiguous,
    soft_targets,
)
from conftest import FUSED
from fusedloss import _backend, reference
from fusedloss._checks import acc_dtype

# ---------------------------------------------------------------------------------------------
# The oracle backend


class OracleKernels:
    """dice_fwd / dice_bwd as docs/KERNELS_dice_contract.md states them, computed by the float64
    oracle: target values checked (IndexError naming the value), sums and lse in the accumulation
    dtype, the gradient in input's dtype with ``empty_like`` strides and exactly 0 at ignored
    positions. ``calls`` records each call's arguments (the tests look at the strides)."""

    # The gradient oracle runs autograd; a custom op's kernel runs below the autograd dispatch
    # keys (thread-local state), so it runs on a thread of its own.
    _pool = ThreadPoolExecutor(1)

    def __init__(self):
        self.calls = []

    @staticmethod
    def _check_target(input, target, ignore_index, sigmoid):
        if sigmoid or target.numel() == 0:
            return
        c = input.shape[1]
        bad = (target != ignore_index) & ((target < 0) | (target >= c))
        if bool(bad.any()):
            raise IndexError(f"target {int(target[bad][0])} is out of bounds for {c} classes")

    def dice_fwd(self, input, target, ignore_index, sigmoid, squared_pred, with_ce,
                 with_smoothing):
        self.calls.append(("fwd", input, target))
        self._check_target(input, target, ignore_index, sigmoid)
        sums, lse = dice_sums_oracle(input, target, ignore_index, sigmoid, squared_pred, with_ce,
                                     with_smoothing)
        acc = acc_dtype(input.dtype)
        return sums.to(acc), lse.to(acc)

    def dice_bwd(self, grad_sums, input, target, lse, ignore_index, sigmoid, squared_pred,
                 with_ce, with_smoothing):
        self.calls.append(("bwd", input, target))
        g = self._pool.submit(dice_grad_oracle, grad_sums, input, target, ignore_index, sigmoid,
                              squared_pred, with_ce, with_smoothing).result()
        if not sigmoid:  # ignored positions exactly 0 (an inf upstream would give NaN here)
            g = torch.where((target != ignore_index).unsqueeze(1), g, 0.0)
        out = torch.empty_like(input)
        out.copy_(g)
        return out


def install_oracle(monkeypatch) -> OracleKernels:
    """Route the "dice" op's cpu backend (and "auto" on CPU tensors) to :class:`OracleKernels`."""
    oracle = OracleKernels()
    kernels, resolve_for = _backend.kernels, _backend.resolve_for

    def fake_kernels(op, backend):
        return oracle if op == "dice" else kernels(op, backend)

    def fake_resolve_for(backend, tensor, op="cross_entropy"):
        if op == "dice" and backend in ("auto", "cpu") and tensor.is_cpu:
            return "cpu"
        return resolve_for(backend, tensor, op)

    monkeypatch.setattr(_backend, "kernels", fake_kernels)
    monkeypatch.setattr(_backend, "resolve_for", fake_resolve_for)
    return oracle


@pytest.fixture
def oracle(monkeypatch):
    return install_oracle(monkeypatch)


@pytest.fixture(params=["oracle"] + list(FUSED))
def dice_backend(request, monkeypatch):
    """(backend, device): the oracle backend (as "cpu"), then every fused backend that has the
    Dice kernels (skipped until they land)."""
    if request.param == "oracle":
        install_oracle(monkeypatch)
        return "cpu", "cpu"
    info = fusedloss.backends("dice")[request.param]
    if not info["available"]:
        pytest.skip(f"{request.param}: {info['why']}")
    return request.param, FUSED[request.param]


def _named(samples, name):
    (s,) = [s for s in samples if s.name == name]
    return s


def check_sample(s, backend, dtype=torch.float32, what="", upstream_random=False):
    up = None
    if upstream_random:
        want = _dice_ref(*s.args, **s.kwargs)
        up = torch.rand(want.shape, dtype=want.dtype, device=want.device)
    got, g_got = loss_and_grads(_dice, s.args, {**s.kwargs, "backend": backend}, s.grad_args,
                                upstream=up)
    want, g_want = loss_and_grads(_dice_ref, s.args, s.kwargs, s.grad_args, upstream=up)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert_close(got, want, dtype, f"{what} loss")
    for a, b in zip(g_got, g_want):
        assert_close(a, b, dtype, f"{what} grad")
    return got, g_got


# ---------------------------------------------------------------------------------------------
# The Python path on the oracle backend: the generic checks of tests/test_ops.py


SAMPLE_NAMES = [s.name for s in _dice_samples("cpu")]


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_oracle_matches_reference(oracle, name):
    s = _named(_dice_samples("cpu"), name)
    check_sample(s, "cpu", what=name)
    assert any(c[0] == "fwd" for c in oracle.calls), "the fused path did not run"
    if not s.empty:
        check_sample(s, "cpu", what=f"{name} (random upstream)", upstream_random=True)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_oracle_noncontiguous(oracle, name):
    s = _named(_dice_samples("cpu"), name)
    s.args = tuple(noncontiguous(a) if isinstance(a, torch.Tensor) else a for a in s.args)
    s.kwargs = {k: noncontiguous(v) if isinstance(v, torch.Tensor) else v
                for k, v in s.kwargs.items()}
    check_sample(s, "cpu", what=f"{name} (non-contiguous)")


@pytest.mark.parametrize("name", [s.name for s in _dice_samples("cpu") if s.empty])
def test_oracle_empty(oracle, name):
    s = _named(_dice_samples("cpu"), name)
    for loss in ("dice", "tversky", "dice_ce"):
        for reduction in ("mean", "sum") if loss == "dice_ce" else ("mean", "sum", "none"):
            kw = {**s.kwargs, "reduction": reduction, "loss": loss}
            got, (g,) = loss_and_grads(_dice, s.args, {**kw, "backend": "cpu"})
            want = _dice_ref(*s.args, **kw)
            assert_close(got, want, torch.float32, f"{loss} {reduction}")
            assert g.shape == s.args[0].shape and not g.any()


@pytest.mark.parametrize("name", [s.name for s in _dice_samples("cpu")
                                  if s.nan_loss and not s.empty])
def test_oracle_nan_propagates(oracle, name):
    s = _named(_dice_samples("cpu"), name)
    x = torch.full_like(s.args[0], float("nan"))
    got = _dice(x, *s.args[1:], **{**s.kwargs, "reduction": "sum", "backend": "cpu"})
    assert torch.isnan(got)


@pytest.mark.parametrize("name", [s.name for s in _dice_gradcheck("cpu")])
def test_oracle_gradcheck(oracle, name):
    s = _named(_dice_gradcheck("cpu"), name)

    def f(x):
        return _dice(x, *s.args[1:], **{**s.kwargs, "backend": "cpu"})

    assert torch.autograd.gradcheck(f, (s.args[0].detach().clone().requires_grad_(),),
                                    eps=1e-6, atol=1e-7)


def test_oracle_opcheck(oracle):
    for op, args in _dice_ops("cpu", "cpu"):
        if op._qualified_op_name.startswith("fusedloss::"):  # not fusedloss_C (real kernels)
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("flags", [(False, False, False, False), (False, True, True, True),
                                   (True, False, False, False), (True, True, False, False)])
def test_oracle_custom_op_gradcheck(oracle, flags):
    """The custom ops' own autograd (what torch.compile traces; eager calls take
    DiceSumsEager): d(sums)/d(input) through fusedloss::dice_sums_backward."""
    sigmoid = flags[0]
    x = make((2, 3, 6), torch.float64).requires_grad_()
    t = (soft_targets((2, 3, 6)).double() if sigmoid
         else class_targets((2, 6), 3, ignore_frac=0.2))

    def f(z):
        return torch.ops.fusedloss.dice_sums(z, t, -100, *flags, "cpu")[0]

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)
    assert any(c[0] == "bwd" for c in oracle.calls)


@pytest.mark.parametrize("name", [s.name for s in _dice_compile("cpu")])
def test_oracle_compile_fullgraph(oracle, name):
    torch._dynamo.reset()
    s = _named(_dice_compile("cpu"), name)

    def step(x, t):
        return _dice(x, t, **{**s.kwargs, "backend": "cpu"})

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, (g_got,) = loss_and_grads(compiled, s.args, {})
    want, (g_want,) = loss_and_grads(_dice_ref, s.args, s.kwargs)
    assert_close(got, want, torch.float32, "compiled loss")
    assert_close(g_got, g_want, torch.float32, "compiled grad")
    assert any(c[0] == "bwd" for c in oracle.calls), "the compiled backward did not run the op"


@pytest.mark.parametrize("name", [b.name for b in _dice_bad("cpu")])
def test_bad_input(oracle, name):
    """Every path raises the same clear error naming the argument: the fused path (oracle),
    backend='reference' and the reference itself."""
    (bad,) = [b for b in _dice_bad("cpu") if b.name == name]
    backends = ("cpu", "reference") if "backend" not in bad.kwargs else (None,)
    for backend in backends:
        kw = dict(bad.kwargs) if backend is None else {"backend": backend, **bad.kwargs}
        with pytest.raises(bad.exc, match=bad.match):
            _dice(*bad.args, **kw)
    if "backend" not in bad.kwargs:
        with pytest.raises(bad.exc, match=bad.match):
            _dice_ref(*bad.args, **bad.kwargs)
    assert not oracle.calls, "a kernel ran before the arguments were checked"


def test_oracle_canonical_view_keeps_channels_last(oracle):
    """The kernels get an (N, C, D) VIEW of channels_last logits (class stride 1, no copy), and
    the gradient comes back channels_last."""
    for x in (channels_last(make((2, 5, 4, 6))), channels_last(make((2, 3, 2, 3, 4)))):
        t = class_targets((x.shape[0],) + x.shape[2:], x.shape[1])
        x = x.requires_grad_()
        fusedloss.dice_ce_loss(x, t, backend="cpu").backward()
        kind, seen, _ = oracle.calls[0]
        assert kind == "fwd" and seen.data_ptr() == x.data_ptr() and seen.stride(1) == 1
        assert seen.shape == (x.shape[0], x.shape[1], x[0, 0].numel())
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert x.grad.is_contiguous(memory_format=fmt)
        oracle.calls.clear()


def test_oracle_eval_skips_the_custom_op(oracle):
    """Without a gradient the kernel is called directly; with one, through the custom op whose
    backward runs dice_bwd once."""
    x = make((2, 3, 10))
    t = class_targets((2, 10), 3)
    with torch.no_grad():
        fusedloss.dice_loss(x, t, backend="cpu")
    assert [c[0] for c in oracle.calls] == ["fwd"]
    oracle.calls.clear()
    x.requires_grad_()
    fusedloss.dice_loss(x, t, backend="cpu").backward()
    assert [c[0] for c in oracle.calls] == ["fwd", "bwd"]


def test_oracle_double_backward_is_refused(oracle):
    x = make((2, 3, 7)).requires_grad_()
    t = class_targets((2, 7), 3)
    loss = fusedloss.dice_loss(x, t, backend="cpu")
    with pytest.raises(RuntimeError, match="first derivatives"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_oracle_torch_func_runs_the_reference(oracle):
    """Forward-mode AD and torch.func transforms have no rules in the fused ops: the reference."""
    x = make((2, 3, 7), torch.float64)
    t = class_targets((2, 7), 3)
    v = torch.randn_like(x)
    got = torch.func.jvp(lambda z: fusedloss.dice_ce_loss(z, t, backend="cpu"), (x,), (v,))
    want = torch.func.jvp(lambda z: reference.dice_ce_loss(z, t), (x,), (v,))
    assert not oracle.calls
    torch.testing.assert_close(got, want)
    g = torch.func.grad(lambda z: fusedloss.dice_loss(z, t, squared_pred=True, backend="cpu"))(x)
    (want,) = torch.autograd.grad(reference.dice_loss(x.requires_grad_(), t, squared_pred=True),
                                  x)
    assert not oracle.calls
    torch.testing.assert_close(g, want)


def test_oracle_weight_gradient(oracle):
    """The epilogue is plain torch: the Dice weight gets its gradient (torch's cross_entropy has
    none for its weight, so the reference cannot check ce_weight's; the fused path gives it)."""
    x = make((2, 4, 9))
    t = class_targets((2, 9), 4, ignore_frac=0.2)
    w, cw = torch.rand(4) + 0.1, torch.rand(4) + 0.1
    kw = {"loss": "dice_ce", "ce_weight": cw, "label_smoothing": 0.1}

    def grad(fn, **extra):
        ww = w.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x, t, weight=ww, **kw, **extra), ww)
        return g

    assert_close(grad(_dice, backend="cpu"), grad(_dice_ref), torch.float32, "weight grad")
    cc = cw.clone().requires_grad_()
    (g,) = torch.autograd.grad(_dice(x, t, **{**kw, "ce_weight": cc}, backend="cpu"), cc)
    assert torch.isfinite(g).all() and g.any()


def test_auto_without_kernel_falls_back_to_reference():
    """Until a build has the Dice kernels, backend='auto' runs the reference (with one warning);
    an explicit backend without them raises, saying why."""
    info = fusedloss.backends("dice")["cpu"]
    x, t = make((2, 3, 5)), class_targets((2, 5), 3)
    if info["available"]:
        pytest.skip("this build has the CPU Dice kernels")
    assert_close(fusedloss.dice_loss(x, t), reference.dice_loss(x, t), torch.float32, "auto")
    with pytest.raises(RuntimeError, match="dice"):
        fusedloss.dice_loss(x, t, backend="cpu")


# ---------------------------------------------------------------------------------------------
# The reference against MONAI itself

def _monai():
    return pytest.importorskip("monai.losses", reason="monai is not installed (pip install monai)")


SHAPES = {"2d": (2, 4, 5, 6), "3d": (2, 3, 3, 4, 5)}


def _inputs(shape, ignore):
    x = make(shape, torch.float64)
    t = class_targets((shape[0],) + shape[2:], shape[1], ignore_frac=0.2 if ignore else 0.0)
    if ignore:
        t.view(-1)[0] = -100  # at least one ignored position
    return x, t


def _close64(a, b, what, tol=1e-9):
    torch.testing.assert_close(a.reshape(b.shape), b, rtol=tol, atol=tol / 10,
                               msg=lambda m: f"{what}: {m}")


def _vs_monai(ours, theirs, x, what, tol=1e-9):
    """Loss and gradient of ``ours(x)`` and ``theirs(x)`` (float64) agree. With squared_pred MONAI
    takes G as vector_norm(one_hot)**2 of its float32 one-hot: float32 rounding (tol 1e-6)."""
    a = x.detach().clone().requires_grad_()
    b = x.detach().clone().requires_grad_()
    la, lb = ours(a), theirs(b)
    _close64(la, lb.reshape(la.shape), f"{what} loss", tol)
    up = torch.rand(la.shape, dtype=la.dtype)
    (ga,) = torch.autograd.grad(la, a, up)
    (gb,) = torch.autograd.grad(lb.reshape(la.shape), b, up)
    _close64(ga, gb, f"{what} grad", tol)


FLAGS = list(itertools.product([True, False], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("dims", list(SHAPES))
@pytest.mark.parametrize("include_background, squared_pred, batch, weighted", FLAGS)
@pytest.mark.parametrize("ignore", [False, True])
def test_reference_dice_is_monai(dims, include_background, squared_pred, batch, weighted, ignore):
    m = _monai()
    x, t = _inputs(SHAPES[dims], ignore)
    c = x.shape[1]
    w = torch.rand(c, dtype=torch.float64) + 0.1 if weighted else None
    for reduction in ("mean", "sum", "none"):
        opts = {"include_background": include_background, "squared_pred": squared_pred,
                "batch": batch, "smooth_nr": 1e-5, "smooth_dr": 1e-4}
        theirs = m.DiceLoss(softmax=True, to_onehot_y=True, reduction=reduction,
                            weight=None if w is None else (w if include_background else w[1:]),
                            ignore_index=-100 if ignore else None, **opts)
        _vs_monai(partial(reference.dice_loss, target=t, weight=w, reduction=reduction, **opts),
                  partial(theirs, target=t.unsqueeze(1)), x, f"dice {reduction}",
                  1e-6 if squared_pred else 1e-9)


@pytest.mark.parametrize("dims", list(SHAPES))
@pytest.mark.parametrize("alpha, beta", [(0.3, 0.7), (0.9, 0.1)])
@pytest.mark.parametrize("include_background, batch",
                         list(itertools.product([True, False], [False, True])))
@pytest.mark.parametrize("ignore", [False, True])
def test_reference_tversky_is_monai(dims, alpha, beta, include_background, batch, ignore):
    m = _monai()
    x, t = _inputs(SHAPES[dims], ignore)
    for reduction in ("mean", "sum", "none"):
        opts = {"include_background": include_background, "batch": batch, "smooth_nr": 1e-5,
                "smooth_dr": 1e-5}
        theirs = m.TverskyLoss(softmax=True, to_onehot_y=True, alpha=alpha, beta=beta,
                               reduction=reduction, ignore_index=-100 if ignore else None, **opts)
        _vs_monai(partial(reference.tversky_loss, target=t, alpha=alpha, beta=beta,
                          reduction=reduction, **opts),
                  partial(theirs, target=t.unsqueeze(1)), x, f"tversky {reduction}")


@pytest.mark.parametrize("dims", list(SHAPES))
@pytest.mark.parametrize("include_background, squared_pred, batch, weighted", FLAGS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_reference_dice_ce_is_monai(dims, include_background, squared_pred, batch, weighted,
                                    label_smoothing):
    m = _monai()
    x, t = _inputs(SHAPES[dims], False)
    w = torch.rand(x.shape[1], dtype=torch.float64) + 0.1 if weighted else None
    for reduction in ("mean", "sum"):
        opts = {"include_background": include_background, "squared_pred": squared_pred,
                "batch": batch}
        theirs = m.DiceCELoss(softmax=True, to_onehot_y=True, reduction=reduction, weight=w,
                              lambda_dice=0.6, lambda_ce=1.4, label_smoothing=label_smoothing,
                              **opts)
        _vs_monai(partial(reference.dice_ce_loss, target=t, weight=w, reduction=reduction,
                          ce_weight=w, lambda_dice=0.6, lambda_ce=1.4,
                          label_smoothing=label_smoothing, **opts),
                  partial(theirs, target=t.unsqueeze(1)), x, f"dice_ce {reduction}",
                  1e-6 if squared_pred else 1e-9)


@pytest.mark.parametrize("dims", list(SHAPES))
def test_reference_dice_ce_ignore_is_monai_dice_plus_torch_ce(dims):
    """MONAI's DiceCELoss has no ignore_index: with one, dice_ce_loss is MONAI's DiceLoss with
    ignore_index plus torch's cross_entropy with it."""
    m = _monai()
    x, t = _inputs(SHAPES[dims], True)
    w = torch.rand(x.shape[1], dtype=torch.float64) + 0.1
    dice = m.DiceLoss(softmax=True, to_onehot_y=True, ignore_index=-100, weight=w)
    _vs_monai(lambda z: reference.dice_ce_loss(z, t, w, ce_weight=w, label_smoothing=0.1),
              lambda z: dice(z, t.unsqueeze(1)) + F.cross_entropy(z, t, w, label_smoothing=0.1),
              x, "dice_ce ignore")


@pytest.mark.parametrize("dims", list(SHAPES))
@pytest.mark.parametrize("include_background, squared_pred, batch",
                         list(itertools.product([True, False], [False, True], [False, True])))
def test_reference_sigmoid_is_monai(dims, include_background, squared_pred, batch):
    m = _monai()
    shape = SHAPES[dims]
    x = make(shape, torch.float64)
    s = soft_targets(shape).double()
    opts = {"include_background": include_background, "batch": batch}
    for reduction in ("mean", "none"):
        theirs = m.DiceLoss(sigmoid=True, squared_pred=squared_pred, reduction=reduction, **opts)
        _vs_monai(partial(reference.dice_loss, target=s, reduction=reduction,
                          squared_pred=squared_pred, activation="sigmoid", **opts),
                  partial(theirs, target=s), x, f"sigmoid dice {reduction}")
        tv = m.TverskyLoss(sigmoid=True, alpha=0.3, beta=0.7, reduction=reduction, **opts)
        _vs_monai(partial(reference.tversky_loss, target=s, alpha=0.3, beta=0.7,
                          reduction=reduction, activation="sigmoid", **opts),
                  partial(tv, target=s), x, f"sigmoid tversky {reduction}")


def test_reference_ignore_index_is_a_class_too():
    """ignore_index may name a real class (MONAI's label-encoded rule: those positions leave
    every sum)."""
    m = _monai()
    x, t = _inputs((2, 4, 5, 6), False)
    theirs = m.DiceLoss(softmax=True, to_onehot_y=True, ignore_index=2, reduction="none")
    _vs_monai(lambda z: reference.dice_loss(z, t, ignore_index=2, reduction="none"),
              lambda z: theirs(z, t.unsqueeze(1)), x, "ignore class 2")


def test_tversky_half_half_is_dice():
    """alpha = beta = 1/2 is Dice (without smoothing: Tversky's smoothing terms count half)."""
    x, t = _inputs((2, 4, 5, 6), True)
    for kw in ({}, {"batch": True, "reduction": "none"}, {"include_background": False}):
        kw = {**kw, "smooth_nr": 0.0, "smooth_dr": 0.0}
        _close64(reference.tversky_loss(x, t, 0.5, 0.5, **kw), reference.dice_loss(x, t, **kw),
                 "tversky(0.5, 0.5)")


# ---------------------------------------------------------------------------------------------
# Every backend (the oracle, then the real kernels once they land)


@pytest.mark.parametrize("loss", ["dice", "tversky", "dice_ce"])
@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (1, 3, 3, 4, 5), (3, 19, 70), (2, 2, 1),
                                   (1, 5, 2100)])
def test_fused_matches_reference(dice_backend, loss, shape):
    backend, device = dice_backend
    x = make(shape, device=device)
    t = class_targets((shape[0],) + shape[2:], shape[1], device, ignore_frac=0.15)
    w = torch.rand(shape[1], device=device) + 0.1
    variants = [{}, {"weight": w, "include_background": False, "batch": True},
                {"squared_pred": True, "reduction": "sum"}]
    if loss == "tversky":
        variants = [{k: v for k, v in kw.items() if k != "squared_pred"} for kw in variants]
        variants[0].update(alpha=0.2, beta=0.8)
    if loss == "dice_ce":
        variants[1].update(ce_weight=w, label_smoothing=0.1, lambda_ce=0.5)
    else:
        variants.append({"reduction": "none", "smooth_nr": 0.0, "smooth_dr": 1e-2})
    for kw in variants:
        s = Sample("x", (x, t), {"loss": loss, **kw})
        check_sample(s, backend, what=f"{loss} {kw}")
    for fmt in (channels_last,) if len(shape) in (4, 5) else ():
        check_sample(Sample("cl", (fmt(x), t), {"loss": loss}), backend, what="channels_last")


def test_fused_sigmoid_matches_reference(dice_backend):
    backend, device = dice_backend
    for shape in ((2, 3, 4, 5), (1, 1, 33), (2, 2, 2, 3, 4)):
        x = make(shape, device=device)
        s = soft_targets(shape, device)
        for kw in ({}, {"squared_pred": True, "reduction": "none", "batch": True},
                   {"loss": "tversky", "alpha": 0.7, "beta": 0.3}):
            check_sample(Sample("sig", (x, s), {"activation": "sigmoid", **kw}), backend,
                         what=f"sigmoid {shape} {kw}")
    # a float64 target of a float32 input is read in the input's dtype
    x = make((2, 3, 6), device=device)
    s = soft_targets((2, 3, 6), device)
    got = fusedloss.dice_loss(x, s.double(), activation="sigmoid", backend=backend)
    assert_close(got, reference.dice_loss(x, s, activation="sigmoid"), torch.float32, "f64 t")


@pytest.mark.parametrize("smooth", [(1e-5, 1e-5), (0.0, 1e-5), (1.0, 1.0)])
def test_empty_class_gives_the_smoothing_value(dice_backend, smooth):
    """A class absent from the target and (p == 0) from the prediction: 1 - smooth_nr / smooth_dr
    (MONAI's value; 0 with the defaults)."""
    backend, device = dice_backend
    x = make((2, 4, 6, 5), device=device)
    x[:, 2] = -1e4  # p of class 2 underflows to 0
    t = class_targets((2, 6, 5), 4, device)
    t[t == 2] = 1
    nr, dr = smooth
    for batch in (False, True):
        got = fusedloss.dice_loss(x, t, reduction="none", smooth_nr=nr, smooth_dr=dr,
                                  batch=batch, backend=backend)
        assert (got[..., 2] == 1.0 - nr / dr).all(), got
        tv = fusedloss.tversky_loss(x, t, 0.3, 0.7, reduction="none", smooth_nr=nr,
                                    smooth_dr=dr, batch=batch, backend=backend)
        assert (tv[..., 2] == 1.0 - nr / dr).all(), tv


def test_all_ignored(dice_backend):
    """Every position ignored: every sum is 0, so the Dice terms are 1 - smooth_nr / smooth_dr,
    the cross-entropy 'mean' is NaN (torch's), and the gradient is exactly 0."""
    backend, device = dice_backend
    x = make((2, 3, 4, 5), device=device)
    t = torch.full((2, 4, 5), 7, device=device)
    for loss, kw in (("dice", {"reduction": "none"}), ("tversky", {"reduction": "sum"}),
                     ("dice_ce", {"label_smoothing": 0.1}),
                     ("dice_ce", {"reduction": "sum", "ce_weight": torch.ones(3, device=device)})):
        got, (g,) = loss_and_grads(_dice, (x, t), {"loss": loss, "ignore_index": 7,
                                                   "backend": backend, **kw})
        want = _dice_ref(x, t, loss=loss, ignore_index=7, **kw)
        assert_close(got, want, torch.float32, f"{loss} {kw}")
        if loss == "dice_ce" and kw.get("reduction", "mean") == "mean":
            assert torch.isnan(got)
        else:
            assert torch.isfinite(got).all()
        assert not g.any(), f"{loss}: gradient at ignored positions"


def test_ignored_positions_have_zero_gradient(dice_backend):
    backend, device = dice_backend
    x = make((2, 3, 40), device=device)
    t = class_targets((2, 40), 3, device, ignore_frac=0.3)
    for loss in ("dice", "tversky", "dice_ce"):
        _, (g,) = loss_and_grads(_dice, (x, t), {"loss": loss, "backend": backend})
        assert not g.permute(0, 2, 1)[t == -100].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["dice", "tversky", "dice_ce"])
@pytest.mark.parametrize("shape", [(2, 4, 6, 7), (1, 3, 4, 5, 6)])
def test_half_precision(dice_backend, dtype, loss, shape):
    """Within twice torch's own error at that precision (tests/_support.py)."""
    backend, device = dice_backend
    x = make(shape, dtype, device)
    t = class_targets((shape[0],) + shape[2:], shape[1], device, ignore_frac=0.1)
    for reduction in ("mean", "sum") if loss == "dice_ce" else ("mean", "none"):
        kw = {"loss": loss, "reduction": reduction}
        got, (g_got,) = loss_and_grads(_dice, (x, t), {**kw, "backend": backend})
        assert got.dtype == dtype and g_got.dtype == dtype
        th, (g_th,) = loss_and_grads(_dice_torch_half, (x, t), kw)
        ref, (g_ref,) = loss_and_grads(_dice_ref, (x.double(), t), kw)
        assert_half_precision_ok(got, th, ref, f"{reduction} loss")
        assert_half_precision_ok(g_got, g_th, g_ref, f"{reduction} grad")


def test_deterministic(dice_backend):
    """The same inputs give bitwise-equal losses and gradients."""
    backend, device = dice_backend
    x = make((2, 5, 33, 31), device=device)
    t = class_targets((2, 33, 31), 5, device, ignore_frac=0.1)
    for loss in ("dice", "dice_ce"):
        runs = [loss_and_grads(_dice, (x, t), {"loss": loss, "squared_pred": True,
                                               "backend": backend}) for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1][0], runs[1][1][0])


@pytest.mark.parametrize("bad", [3, -1, 2**40])
def test_bad_target_value_raises_naming_it(dice_backend, bad):
    backend, device = dice_backend
    x = make((2, 3, 70), device=device)
    t = class_targets((2, 70), 3, device)
    t[1, 65] = bad
    for loss in ("dice", "dice_ce"):
        with pytest.raises((IndexError, RuntimeError), match=str(bad)):
            _dice(x.clone().requires_grad_(), t, loss=loss, backend=backend)


@pytest.mark.parametrize("name", [s.name for s in _dice_compile("cpu")])
def test_compile_fullgraph(dice_backend, name):
    backend, device = dice_backend
    torch._dynamo.reset()
    s = _named(_dice_compile(device), name)

    def step(x, t):
        return _dice(x, t, **{**s.kwargs, "backend": backend})

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, (g_got,) = loss_and_grads(compiled, s.args, {})
    want, (g_want,) = loss_and_grads(step, s.args, {})
    assert_close(got, want, torch.float32, "compiled loss")
    assert_close(g_got, g_want, torch.float32, "compiled grad")


def test_modules(dice_backend):
    backend, device = dice_backend
    w = torch.rand(4, device=device) + 0.1
    x = make((2, 4, 3, 5), device=device)
    t = class_targets((2, 3, 5), 4, device, ignore_frac=0.1)
    m = fusedloss.nn.DiceLoss(w, include_background=False, batch=True, backend=backend)
    assert "weight" in dict(m.named_buffers()) and "include_background=False" in repr(m)
    assert_close(m(x, t), reference.dice_loss(x, t, w, include_background=False, batch=True),
                 torch.float32, "DiceLoss")
    m = fusedloss.nn.TverskyLoss(0.2, 0.8, reduction="none", backend=backend)
    assert "alpha=0.2" in repr(m)
    assert_close(m(x, t), reference.tversky_loss(x, t, 0.2, 0.8, reduction="none"),
                 torch.float32, "TverskyLoss")
    m = fusedloss.nn.DiceCELoss(w, ce_weight=w, lambda_ce=0.5, label_smoothing=0.1,
                                squared_pred=True, backend=backend)
    assert set(dict(m.named_buffers(remove_duplicate=False))) == {"weight", "ce_weight"}
    assert_close(m(x, t), reference.dice_ce_loss(x, t, w, ce_weight=w, lambda_ce=0.5,
                                                 label_smoothing=0.1, squared_pred=True),
                 torch.float32, "DiceCELoss")


def test_module_weight_checked_at_construction():
    bad = torch.tensor([1.0, -0.5, 2.0])
    for make_module in (lambda: fusedloss.nn.DiceLoss(bad), lambda: fusedloss.nn.TverskyLoss(
            weight=bad), lambda: fusedloss.nn.DiceCELoss(ce_weight=bad)):
        with pytest.raises(ValueError, match="weight"):
            make_module()
