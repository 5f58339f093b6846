"""Shared test support: running a loss forward and backward, tolerances, flash-attention's half
precision rule, and the table of ops (:data:`OPS`) whose samples drive ``tests/test_ops.py``.

A new loss adds one :class:`OpInfo` row to :data:`OPS` (docs/ADDING_A_LOSS.md): its sample inputs,
its bad inputs and its custom ops. ``tests/test_ops.py`` then checks it on every backend that runs
here against the reference: values and gradients, non-contiguous inputs, empty batches, NaN,
float64 gradcheck, ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``. What is
particular to a loss (parity with torch and peers, extremes, semantics) stays in
``tests/test_<loss>.py``.

Tolerances (:data:`TOL`): float64 1e-10 (same math, another order), float32 2e-5 relative and
absolute. Half precision (:func:`assert_half_precision_ok`): the fused error against a float64
reference is at most twice torch's own error at that precision, plus a floor of 1e-6 for exact
ties.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import reference

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


# ---------------------------------------------------------------------------------------------
# Running a loss


def cpu_capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this CPU can run ("default", "avx2", "avx512"): each selects
    one instruction-set copy of the CPU kernels (tests run them all in subprocesses)."""
    caps = ["default"]
    best = torch.backends.cpu.get_cpu_capability().lower()
    if best in ("avx2", "avx512"):
        caps.append("avx2")
    if best == "avx512":
        caps.append("avx512")
    return caps


def make(shape, dtype=torch.float32, device="cpu", scale=3.0) -> torch.Tensor:
    """Random logits, drawn in float64 and rounded once (the same values in every dtype)."""
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


def class_targets(shape, num_classes, device="cpu", ignore_frac=0.0, ignore_index=-100):
    t = torch.randint(0, num_classes, shape)
    if ignore_frac:
        t[torch.rand(shape) < ignore_frac] = ignore_index
    return t.to(device)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in memory with every stride doubled (and so no dimension contiguous)."""
    if t.dim() == 0:
        return t
    buf = torch.empty(t.shape + (2,), dtype=t.dtype, device=t.device)
    out = buf[..., 0]
    out.copy_(t)
    return out


def loss_and_grads(fn: Callable, args: tuple, kwargs: dict, grad_args=(0,), upstream=None):
    """``fn(*args, **kwargs)`` and the gradients of ``args[i]`` for i in grad_args, on fresh
    leaf copies. The first output is the loss when fn returns a tuple; ``upstream`` is the
    gradient fed to backward (ones by default)."""
    args = list(args)
    leaves = []
    for i in grad_args:
        args[i] = args[i].detach().clone().requires_grad_(True)
        leaves.append(args[i])
    out = fn(*args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(loss, leaves, torch.ones_like(loss) if upstream is None else
                                upstream, allow_unused=True)
    return loss, grads


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """Within TOL[dtype] (NaN where the other has NaN), and the same shape."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| in float64 (the scale of the whole tensor)."""
    got, ref = got.double(), ref.double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def assert_half_precision_ok(fused: torch.Tensor, torch_half: torch.Tensor,
                             ref64: torch.Tensor, what: str = "", floor: float = 1e-6):
    """flash-attention's rule: the fused result's error against the float64 reference is at most
    twice the error of torch's own computation at the same precision (plus ``floor``)."""
    ours, theirs = rel_err(fused, ref64), rel_err(torch_half, ref64)
    assert ours <= 2 * theirs + floor, f"{what}: error {ours:.3g} > 2 x torch's {theirs:.3g}"


# ---------------------------------------------------------------------------------------------
# The op table


@dataclasses.dataclass
class Sample:
    """One call of a loss: ``fn(*args, **kwargs)``. ``grad_args`` are the positions of the
    arguments that get gradients; a float tensor argument is cast to the test's dtype."""

    name: str
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    grad_args: tuple = (0,)
    empty: bool = False      # a batch with no rows: shapes and zero-size gradients are checked
    nan_loss: bool = True    # a NaN in every input element makes the (summed) loss NaN

    def cast(self, dtype: torch.dtype) -> "Sample":
        def c(a):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                return a.to(dtype)
            return a
        return dataclasses.replace(self, args=tuple(c(a) for a in self.args),
                                   kwargs={k: c(v) for k, v in self.kwargs.items()})


@dataclasses.dataclass
class BadInput:
    """A call that must raise ``exc`` with a message matching ``match`` (the argument's name)."""

    name: str
    args: tuple
    kwargs: dict
    exc: Any
    match: str


@dataclasses.dataclass
class OpInfo:
    """One public loss and everything the generic tests need to check it."""

    name: str                                            # the loss, a key of _backend.OPS
    fused: Callable                                      # fusedloss.<loss> (takes backend=)
    reference: Callable                                  # fusedloss.reference.<loss>
    samples: Callable[[str], list]                       # device -> [Sample] (float32)
    bad_inputs: Callable[[str], list]                    # device -> [BadInput]
    custom_ops: Callable[[str, str], list]               # (device, backend) -> [(op, args)]
    gradcheck_samples: Callable[[str], list]             # device -> [Sample] (float64, small)
    compile_samples: Callable[[str], list]               # device -> [Sample]
    torch_half: Optional[Callable] = None                # torch's own computation of the loss


# cross_entropy ------------------------------------------------------------------------------


def _ce_samples(device):
    def t(shape, c, frac=0.0):
        return class_targets(shape, c, device, frac)
    x = lambda *s: make(s, device=device)  # noqa: E731
    prob = lambda *s: torch.softmax(make(s, device=device), 1)  # noqa: E731
    w5 = torch.rand(5, device=device) + 0.1
    return [
        Sample("1-row", (x(1, 1), t((1,), 1))),
        Sample("odd-vocab", (x(5, 4099), t((5,), 4099)), {"reduction": "sum"}),
        Sample("mean-ignored", (x(8, 13), t((8,), 13, 0.4))),
        Sample("none-all-extras", (x(6, 300), t((6,), 300, 0.3)),
               {"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}),
        Sample("weighted-smoothed", (x(7, 5), t((7,), 5, 0.3)),
               {"weight": w5, "label_smoothing": 0.2}),
        Sample("spatial", (x(2, 5, 3, 4), t((2, 3, 4), 5, 0.2)), {"reduction": "none"}),
        Sample("unbatched", (x(9), torch.tensor(4, device=device))),
        Sample("prob-target", (x(4, 11), prob(4, 11)), {"label_smoothing": 0.1}),
        Sample("prob-spatial", (x(2, 6, 5), prob(2, 6, 5)), {"reduction": "none"}),
        Sample("empty-rows", (x(0, 10), t((0,), 10)), empty=True),
        Sample("empty-spatial", (x(2, 4, 0), t((2, 0), 4)), {"reduction": "none"}, empty=True),
    ]


def _ce_bad(device):
    x = make((4, 5), device=device)
    t = class_targets((4,), 5, device)
    return [
        BadInput("reduction", (x, t), {"reduction": "avg"}, ValueError, "reduction"),
        BadInput("target-shape", (x, t[:3]), {}, ValueError, "target with class indices"),
        BadInput("target-rank", (x, t.view(2, 2)), {}, ValueError, "target with class indices"),
        BadInput("input-dtype", (x.long(), t), {}, TypeError, "input"),
        BadInput("target-int32", (x, t.int()), {}, TypeError, "target"),
        BadInput("target-bool", (x, t.bool()), {}, TypeError, "target"),
        BadInput("input-0d", (x[0, 0], t), {}, ValueError, "input"),
        BadInput("no-classes", (make((4, 0), device=device), t), {}, ValueError, "class"),
        BadInput("weight-shape", (x, t), {"weight": torch.ones(4, device=device)}, ValueError,
                 "weight"),
        BadInput("weight-dtype", (x, t), {"weight": torch.ones(5, dtype=torch.long,
                                                                device=device)},
                 TypeError, "weight"),
        BadInput("label_smoothing", (x, t), {"label_smoothing": 1.5}, ValueError,
                 "label_smoothing"),
        BadInput("label_smoothing-nan", (x, t), {"label_smoothing": float("nan")}, ValueError,
                 "label_smoothing"),
        BadInput("z_loss", (x, t), {"z_loss": -1.0}, ValueError, "z_loss"),
        BadInput("softcap", (x, t), {"softcap": 0.0}, ValueError, "softcap"),
        BadInput("ignore_index-type", (x, t), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        BadInput("prob-shape", (x, torch.rand(4, 6, device=device)), {}, ValueError,
                 "input's shape"),
        BadInput("prob-ignore_index", (x, torch.rand(4, 5, device=device)), {"ignore_index": 2},
                 ValueError, "ignore_index"),
        BadInput("backend", (x, t), {"backend": "tpu"}, ValueError, "backend"),
        BadInput("backend-type", (x, t), {"backend": 3}, TypeError, "backend"),
    ]


def _ce_ops(device, backend):
    x = make((3, 2, 17), device=device)
    t = class_targets((3, 17), 2, device)
    t[0, 0] = -100
    p = torch.softmax(make((3, 2, 17), device=device), 1)
    w, s = torch.rand(2, device=device), torch.tensor(0.5, device=device)
    ops = torch.ops.fusedloss
    out = []
    for tgt in (t, p):
        ii = -100 if tgt is t else -1
        for compute_grad in (False, True):
            out.append((ops.cross_entropy_fwd, (x.clone().requires_grad_(compute_grad), tgt, w,
                                                s, ii, 0.1, 1e-3, 3.0, compute_grad, backend)))
        out.append((ops.cross_entropy_fwd_inplace,
                    (x.clone(), tgt, w, None, ii, 0.0, 0.0, 0.0, backend)))
    grad = make((3, 4, 5), device=device)
    out.append((ops.scale_grad_, (grad, torch.rand(3, 5, device=device), backend)))
    out.append((ops.scale_grad_, (grad, torch.tensor(2.0, device=device).expand(3, 5), backend)))
    if backend != "triton":  # fusedloss._C's eager one-call ops (cpu and cuda)
        c_ops = torch.ops.fusedloss_C
        x4 = make((3, 5, 2, 4), device=device)
        t4 = class_targets((3, 2, 4), 5, device, ignore_frac=0.3)
        p4 = torch.softmax(make((3, 5, 2, 4), device=device), 1)
        for reduction in (0, 1, 2):
            for tgt, ii, cw in ((t4, -100, torch.rand(5, device=device)), (p4, -1, None)):
                args = (x4.clone().requires_grad_(), tgt, cw, ii, reduction, 0.1, 1e-3, 0.0,
                        torch.float32)
                out.append((c_ops.cross_entropy_loss, args))
                out.append((c_ops.cross_entropy_loss_inplace,
                            (x4.clone().requires_grad_() * 1,) + args[1:]))
        out.append((c_ops.cross_entropy_mean_factor, (t4, None, -100, torch.float32)))
        out.append((c_ops.cross_entropy_mean_factor,
                    (t4, torch.rand(5, device=device), -100, torch.float64)))
    return out


def _ce_gradcheck(device):
    x = make((3, 9), torch.float64, device)
    t = class_targets((3,), 9, device, ignore_frac=0.25)
    t[0] = 2  # at least one row that is not ignored
    w = torch.rand(9, dtype=torch.float64, device=device) + 0.1
    p = torch.softmax(make((3, 9), torch.float64, device), 1)
    extras = {"weight": w, "label_smoothing": 0.1, "z_loss": 0.01, "softcap": 4.0}
    return [
        Sample("mean", (x, t)),
        Sample("none-extras", (x, t), {"reduction": "none", **extras}),
        Sample("mean-extras", (x, t), extras),
        Sample("prob-none", (x, p), {"reduction": "none", "label_smoothing": 0.1}),
        Sample("spatial", (make((2, 3, 4), torch.float64, device),
                           class_targets((2, 4), 3, device)), {"reduction": "none"}),
    ]


def _ce_compile(device):
    x = make((5, 8), device=device)
    t = class_targets((5,), 8, device, ignore_frac=0.3)
    t[0] = 1
    return [
        Sample("mean-extras", (x, t), {"label_smoothing": 0.1, "z_loss": 1e-3}),
        Sample("none", (x, t), {"reduction": "none"}),
        Sample("inplace", (x, t), {"inplace_backward": True}),
        Sample("prob", (x, torch.softmax(make((5, 8), device=device), 1)), {"reduction": "sum"}),
    ]


# linear_cross_entropy -----------------------------------------------------------------------


def _lce(input, linear_weight, target, **kw):
    return fusedloss.linear_cross_entropy(input, linear_weight, target, **kw)


def _lce_ref(input, linear_weight, target, **kw):
    return reference.linear_cross_entropy(input, linear_weight, target, **kw)


def _lce_samples(device):
    h = lambda *s: make(s, device=device, scale=0.5)  # noqa: E731
    t = lambda s, v, f=0.0: class_targets(s, v, device, f)  # noqa: E731
    return [
        Sample("1-token", (h(1, 8), h(33, 8), t((1,), 33)), grad_args=(0, 1)),
        Sample("chunked-ignored", (h(9, 16), h(50, 16), t((9,), 50, 0.3)),
               {"chunk_size": 4, "label_smoothing": 0.1}, grad_args=(0, 1)),
        Sample("bias-none", (h(5, 6), h(17, 6), t((5,), 17)),
               {"linear_bias": make((17,), device=device), "reduction": "none", "z_loss": 1e-3,
                "softcap": 3.0}, grad_args=(0, 1)),
        Sample("batch-dims", (h(2, 3, 8), h(21, 8), t((2, 3), 21, 0.2)), {"reduction": "sum"},
               grad_args=(0, 1)),
        Sample("empty", (h(0, 8), h(21, 8), t((0,), 21)), grad_args=(0, 1), empty=True),
    ]


def _lce_bad(device):
    h, w = make((4, 8), device=device), make((10, 8), device=device)
    t = class_targets((4,), 10, device)
    return [
        BadInput("weight-rank", (h, w[0], t), {}, ValueError, "linear_weight"),
        BadInput("hidden-mismatch", (h, w[:, :5], t), {}, ValueError, "linear_weight"),
        BadInput("weight-dtype", (h, w.double(), t), {}, TypeError, "linear_weight"),
        BadInput("bias-shape", (h, w, t), {"linear_bias": torch.zeros(3, device=device)},
                 ValueError, "linear_bias"),
        BadInput("target-shape", (h, w, t[:2]), {}, ValueError, "target"),
        BadInput("target-dtype", (h, w, t.int()), {}, TypeError, "target"),
        BadInput("chunk_size", (h, w, t), {"chunk_size": 0}, ValueError, "chunk_size"),
        BadInput("reduction", (h, w, t), {"reduction": "avg"}, ValueError, "reduction"),
        BadInput("label_smoothing", (h, w, t), {"label_smoothing": -0.1}, ValueError,
                 "label_smoothing"),
    ]


def _lce_ops(device, backend):
    h, w = make((6, 8), device=device), make((10, 8), device=device)
    t = class_targets((6,), 10, device, ignore_frac=0.3)
    b = make((10,), device=device)
    op = torch.ops.fusedloss.linear_cross_entropy_fwd
    bwd = torch.ops.fusedloss.linear_cross_entropy_bwd
    up = make((6,), device=device)
    return [(op, (h.clone().requires_grad_(cg), w.clone().requires_grad_(cg), bias, t, None,
                  torch.tensor(0.25, device=device), -100, 0.1, 1e-3, 0.0, 4, cg, backend))
            for cg in (False, True) for bias in (None, b)] + [
        (bwd, (h, w, bias, t, None, None, up, -100, 0.0, 0.0, 0.0, 4, backend))
        for bias in (None, b)]


def _lce_gradcheck(device):
    h = make((5, 4), torch.float64, device, scale=0.5)
    w = make((7, 4), torch.float64, device, scale=0.5)
    t = class_targets((5,), 7, device, ignore_frac=0.2)
    t[0] = 3
    return [
        Sample("mean", (h, w, t), {"chunk_size": 2}, grad_args=(0, 1)),
        Sample("none-extras", (h, w, t), {"reduction": "none", "label_smoothing": 0.1,
                                         "z_loss": 1e-2, "softcap": 3.0}, grad_args=(0, 1)),
    ]


def _lce_compile(device):
    h, w = make((6, 8), device=device, scale=0.5), make((12, 8), device=device, scale=0.5)
    t = class_targets((6,), 12, device, ignore_frac=0.3)
    return [Sample("mean", (h, w, t), {"chunk_size": 4}, grad_args=(0, 1)),
            Sample("none", (h, w, t), {"reduction": "none"}, grad_args=(0, 1))]


# sigmoid_focal_loss and binary_cross_entropy_with_logits (the elementwise skeleton) ------------


def soft_targets(shape, device="cpu", hard_frac=0.5):
    """Targets in [0, 1]: hard 0/1 values at about hard_frac of the elements, soft elsewhere."""
    t = torch.rand(shape, dtype=torch.float64)
    hard = torch.rand(shape) < hard_frac
    t[hard] = (t[hard] > 0.5).double()
    return t.float().to(device)


def _sf_samples(device):
    x = lambda *s: make(s, device=device)  # noqa: E731
    t = lambda *s: soft_targets(s, device)  # noqa: E731
    hard = lambda *s: (torch.rand(s) < 0.3).float().to(device)  # noqa: E731
    return [
        Sample("hard-none", (x(4, 7), hard(4, 7))),
        Sample("soft-mean-weight", (x(3, 5, 6), t(3, 5, 6)),
               {"reduction": "mean", "gamma": 0.5, "weight": torch.rand(5, 1, device=device)}),
        Sample("sum-no-alpha", (x(2, 33), t(2, 33)), {"reduction": "sum", "alpha": -1.0}),
        Sample("gamma0-mean", (x(5, 9), t(5, 9)), {"reduction": "mean", "gamma": 0.0}),
        Sample("gamma5-weight-full", (x(6, 4), t(6, 4)),
               {"gamma": 5.0, "alpha": 0.9, "weight": torch.rand(6, 4, device=device)}),
        Sample("many-blocks", (x(3, 17001), t(3, 17001)), {"reduction": "sum"}),
        Sample("0-d", (x(), t()), {"reduction": "mean"}),
        Sample("empty", (x(0, 5), t(0, 5)), {"reduction": "mean"}, empty=True),
    ]


def _sf_bad(device):
    x, t = make((4, 5), device=device), soft_targets((4, 5), device)
    return [
        BadInput("gamma", (x, t), {"gamma": -0.5}, ValueError, "gamma"),
        BadInput("gamma-nan", (x, t), {"gamma": float("nan")}, ValueError, "gamma"),
        BadInput("alpha-type", (x, t), {"alpha": "0.25"}, TypeError, "alpha"),
        BadInput("target-shape", (x, t[:3]), {}, ValueError, "target"),
        BadInput("target-dtype", (x, t.long()), {}, TypeError, "target"),
        BadInput("input-dtype", (x.long(), t), {}, TypeError, "input"),
        BadInput("weight-shape", (x, t), {"weight": torch.ones(3, device=device)}, ValueError,
                 "weight"),
        BadInput("weight-grows", (x, t), {"weight": torch.ones(2, 4, 5, device=device)},
                 ValueError, "weight"),
        BadInput("weight-dtype", (x, t), {"weight": torch.ones(5, dtype=torch.long,
                                                                device=device)},
                 TypeError, "weight"),
        BadInput("reduction", (x, t), {"reduction": "avg"}, ValueError, "reduction"),
        BadInput("backend", (x, t), {"backend": "tpu"}, ValueError, "backend"),
    ]


def _sf_ops(device, backend):
    x = make((3, 4, 5), device=device)
    t = soft_targets((3, 4, 5), device)
    w = torch.rand(4, 1, device=device)
    out = []
    for red in (0, 1, 2):
        for cg in (False, True):
            scale = 1.0 / 60 if red == 1 else 1.0
            out.append((torch.ops.fusedloss.sigmoid_focal_fwd,
                        (x.clone().requires_grad_(cg), t, w, 0.25, 2.0, scale, red, cg, backend)))
    out.append((torch.ops.fusedloss.sigmoid_focal_fwd,
                (x.clone(), t, None, -1.0, 0.0, 1.0, 2, True, backend)))
    if backend != "triton":
        for red in (0, 1):
            out.append((torch.ops.fusedloss_C.sigmoid_focal_fwd,
                        (x.clone(), t, w, 0.25, 0.5, 1.0, red, True)))
    return out


def _sf_gradcheck(device):
    x = make((3, 4), torch.float64, device)
    t = soft_targets((3, 4), device).double()
    w = torch.rand(4, dtype=torch.float64, device=device) + 0.1
    return [
        Sample("mean-weight", (x, t), {"reduction": "mean", "weight": w}),
        Sample("none-gamma-half", (x, (t > 0.5).double()), {"gamma": 0.5}),
        Sample("sum-no-alpha", (x, t), {"reduction": "sum", "alpha": -1.0, "gamma": 1.0}),
    ]


def _sf_compile(device):
    x = make((4, 6), device=device)
    t = soft_targets((4, 6), device)
    return [
        Sample("mean-weight", (x, t),
               {"reduction": "mean", "weight": torch.rand(6, device=device)}),
        Sample("none", (x, t)),
    ]


def _bce_samples(device):
    x = lambda *s: make(s, device=device)  # noqa: E731
    t = lambda *s: soft_targets(s, device)  # noqa: E731
    r = lambda *s: torch.rand(s, device=device) + 0.1  # noqa: E731
    return [
        Sample("mean", (x(4, 7), t(4, 7))),
        Sample("weight-pos_weight-none", (x(2, 3, 4, 5), t(2, 3, 4, 5)),
               {"weight": r(4, 1), "pos_weight": r(5), "reduction": "none"}),
        Sample("pos_weight-chw-sum", (x(2, 3, 4, 4), t(2, 3, 4, 4)),
               {"pos_weight": r(3, 1, 1), "reduction": "sum"}),
        Sample("weight-full-mean", (x(3, 8), t(3, 8)), {"weight": r(3, 8)}),
        Sample("many-blocks", (x(2, 20003), t(2, 20003)), {"weight": r(20003), "reduction": "sum"}),
        Sample("0-d", (x(), t()), {"reduction": "none"}),
        Sample("empty", (x(0, 3), t(0, 3)), {"pos_weight": r(3)}, empty=True),
    ]


def _bce_bad(device):
    x, t = make((4, 5), device=device), soft_targets((4, 5), device)
    return [
        BadInput("target-size", (x, t[:3]), {}, ValueError, "Target size"),
        BadInput("target-dtype", (x, t.long()), {}, TypeError, "target"),
        BadInput("input-dtype", (x.long(), t), {}, TypeError, "input"),
        BadInput("weight-shape", (x, t), {"weight": torch.ones(3, device=device)}, ValueError,
                 "weight"),
        BadInput("pos_weight-shape", (x, t), {"pos_weight": torch.ones(4, device=device)},
                 ValueError, "pos_weight"),
        BadInput("pos_weight-dtype", (x, t), {"pos_weight": torch.ones(5, dtype=torch.long,
                                                                        device=device)},
                 TypeError, "pos_weight"),
        BadInput("reduction", (x, t), {"reduction": "avg"}, ValueError, "reduction"),
        BadInput("backend", (x, t), {"backend": "tpu"}, ValueError, "backend"),
    ]


def _bce_ops(device, backend):
    x = make((3, 4, 5), device=device)
    t = soft_targets((3, 4, 5), device)
    w, pw = torch.rand(4, 1, device=device), torch.rand(5, device=device) + 0.5
    out = []
    for red in (0, 1, 2):
        for cg in (False, True):
            scale = 1.0 / 60 if red == 1 else 1.0
            out.append((torch.ops.fusedloss.bce_fwd,
                        (x.clone().requires_grad_(cg), t, w, pw, scale, red, cg, backend)))
    out.append((torch.ops.fusedloss.bce_fwd, (x.clone(), t, None, None, 1.0, 0, True, backend)))
    if backend != "triton":
        for red in (0, 2):
            out.append((torch.ops.fusedloss_C.bce_fwd, (x.clone(), t, w, pw, 1.0, red, True)))
    return out


def _bce_gradcheck(device):
    x = make((3, 4), torch.float64, device)
    t = soft_targets((3, 4), device).double()
    w = torch.rand(3, 1, dtype=torch.float64, device=device) + 0.1
    pw = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    return [
        Sample("mean", (x, t)),
        Sample("none-weights", (x, t), {"reduction": "none", "weight": w, "pos_weight": pw}),
        Sample("sum-pos_weight", (x, t), {"reduction": "sum", "pos_weight": pw}),
    ]


def _bce_compile(device):
    x = make((4, 6), device=device)
    t = soft_targets((4, 6), device)
    return [
        Sample("mean", (x, t)),
        Sample("none-pos_weight", (x, t), {"reduction": "none",
                                           "pos_weight": torch.rand(6, device=device) + 0.5}),
    ]


OPS = [
    OpInfo("cross_entropy", fusedloss.cross_entropy, reference.cross_entropy, _ce_samples,
           _ce_bad, _ce_ops, _ce_gradcheck, _ce_compile, torch_half=F.cross_entropy),
    OpInfo("linear_cross_entropy", _lce, _lce_ref, _lce_samples, _lce_bad, _lce_ops,
           _lce_gradcheck, _lce_compile),
    OpInfo("sigmoid_focal", fusedloss.sigmoid_focal_loss, reference.sigmoid_focal_loss,
           _sf_samples, _sf_bad, _sf_ops, _sf_gradcheck, _sf_compile),
    OpInfo("bce", fusedloss.binary_cross_entropy_with_logits,
           reference.binary_cross_entropy_with_logits, _bce_samples, _bce_bad, _bce_ops,
           _bce_gradcheck, _bce_compile, torch_half=F.binary_cross_entropy_with_logits),
]


# total_variation -----------------------------------------------------------------------------


def _tv(input, weight=None, **kw):
    return fusedloss.total_variation(input, weight, **kw)


def _tv_ref(input, weight=None, **kw):
    return reference.total_variation(input, weight, **kw)


def _tv_samples(device):
    x = lambda *s: make(s, device=device)  # noqa: E731
    w = lambda *s: torch.rand(s, device=device) + 0.5  # noqa: E731
    return [
        Sample("l1-mean", (x(2, 3, 7, 9),)),
        Sample("l2-sum", (x(2, 3, 5, 6),), {"norm": "l2_squared", "reduction": "sum"}),
        Sample("iso-none", (x(2, 3, 6, 5),), {"norm": "isotropic", "reduction": "none"}),
        Sample("iso-eps-weighted", (x(2, 3, 6, 5), w(2, 1, 6, 5)),
               {"norm": "isotropic", "eps": 1e-3}),
        Sample("l1-weighted-none", (x(2, 3, 5, 21), w(2, 1, 5, 21)), {"reduction": "none"}),
        Sample("l2-weight-row", (x(3, 4, 19), w(4, 1)), {"norm": "l2_squared"}),
        Sample("single-image", (x(17, 33),), {"reduction": "none"}),
        Sample("h1", (x(2, 1, 40),), {"reduction": "none"}),
        Sample("w1", (x(2, 40, 1),), {"norm": "isotropic"}),
        Sample("bands", (x(1, 2, 70, 600), w(70, 600)), {"norm": "isotropic", "reduction": "sum"}),
        Sample("5d-weight", (x(2, 2, 3, 4, 5), w(1, 2, 1, 4, 5)), {"reduction": "none"}),
        Sample("empty-batch", (x(0, 3, 4, 5),), empty=True),
        Sample("empty-hw", (x(2, 3, 0, 5),), {"norm": "isotropic"}, empty=True),
    ]


def _tv_bad(device):
    x = make((2, 3, 4, 5), device=device)
    return [
        BadInput("input-1d", (x[0, 0, 0],), {}, ValueError, "input"),
        BadInput("input-dtype", (x.long(),), {}, TypeError, "input"),
        BadInput("norm", (x,), {"norm": "l3"}, ValueError, "norm"),
        BadInput("norm-type", (x,), {"norm": 1}, ValueError, "norm"),
        BadInput("eps-negative", (x,), {"norm": "isotropic", "eps": -1e-3}, ValueError, "eps"),
        BadInput("eps-nan", (x,), {"norm": "isotropic", "eps": float("nan")}, ValueError, "eps"),
        BadInput("eps-l1", (x,), {"eps": 1e-3}, ValueError, "eps"),
        BadInput("weight-shape", (x, torch.ones(3, 1, 1, device=device)[:2]), {}, ValueError,
                 "weight"),
        BadInput("weight-larger", (x, torch.ones(4, 2, 3, 4, 5, device=device)), {}, ValueError,
                 "weight"),
        BadInput("weight-dtype", (x, torch.ones(4, 5, dtype=torch.long, device=device)), {},
                 TypeError, "weight"),
        BadInput("reduction", (x,), {"reduction": "avg"}, ValueError, "reduction"),
        BadInput("backend", (x,), {"backend": "tpu"}, ValueError, "backend"),
    ]


def _tv_ops(device, backend):
    op = torch.ops.fusedloss.tv_fwd
    x = make((2, 3, 5, 6), device=device)
    w = torch.rand(2, 1, 5, 6, device=device)
    out = []
    for norm, eps in ((0, 0.0), (1, 0.0), (2, 1e-3)):
        for cg in (False, True):
            out.append((op, (x.clone().requires_grad_(cg), w if cg else None, norm, eps, 0.25,
                             cg, backend)))
    out.append((op, (make((4, 7), device=device).requires_grad_(), None, 0, 0.0, 1.0, True,
                     backend)))
    if backend != "triton":  # fusedloss._C's device op on the canonical (P, Q, H, W)
        c_op = torch.ops.fusedloss_C.tv_fwd
        for cg in (False, True):
            out.append((c_op, (x, w.expand(x.shape), 2, 1e-3, 0.5, cg)))
    return out


def _tv_gradcheck(device):
    x = lambda *s: make(s, torch.float64, device)  # noqa: E731
    w = torch.rand(2, 1, 4, 5, dtype=torch.float64, device=device) + 0.5
    return [
        Sample("l1", (x(2, 2, 4, 5),)),
        Sample("l2-none", (x(2, 2, 4, 5),), {"norm": "l2_squared", "reduction": "none"}),
        Sample("iso-weighted", (x(2, 2, 4, 5), w), {"norm": "isotropic", "reduction": "sum"}),
        Sample("iso-eps-none", (x(2, 2, 4, 5),), {"norm": "isotropic", "eps": 0.1,
                                                  "reduction": "none"}),
    ]


def _tv_compile(device):
    x = make((2, 3, 6, 7), device=device)
    w = torch.rand(2, 1, 6, 7, device=device)
    return [
        Sample("l1-mean", (x,)),
        Sample("iso-weighted-none", (x, w), {"norm": "isotropic", "reduction": "none"}),
    ]


OPS.append(OpInfo("tv", _tv, _tv_ref, _tv_samples, _tv_bad, _tv_ops, _tv_gradcheck,
                  _tv_compile))
# softmax_focal_loss -------------------------------------------------------------------------


def _sf_samples(device):
    def t(shape, c, frac=0.0):
        return class_targets(shape, c, device, frac)
    x = lambda *s: make(s, device=device)  # noqa: E731
    w = lambda c: torch.rand(c, device=device) + 0.1  # noqa: E731
    return [
        Sample("1-row", (x(1, 1), t((1,), 1))),
        Sample("mean-ignored", (x(8, 13), t((8,), 13, 0.4))),
        Sample("none-weighted", (x(6, 7), t((6,), 7, 0.3)),
               {"weight": w(7), "gamma": 0.5, "reduction": "none"}),
        Sample("gamma0-sum", (x(5, 9), t((5,), 9)), {"gamma": 0.0, "reduction": "sum"}),
        Sample("spatial", (x(2, 5, 3, 4), t((2, 3, 4), 5, 0.2)), {"reduction": "none"}),
        # several blocks of the reduced output: along n (D == 1), along d, large C
        Sample("rows-blocks", (x(2100, 3), t((2100,), 3, 0.1)), {"weight": w(3)}),
        Sample("spatial-blocks", (x(2, 4, 1100), t((2, 1100), 4, 0.1)),
               {"reduction": "sum", "gamma": 1.5}),
        Sample("large-C-blocks", (x(20, 4099), t((20,), 4099, 0.1)), {"gamma": 3.0}),
        Sample("empty-rows", (x(0, 10), t((0,), 10)), empty=True),
        Sample("empty-spatial", (x(2, 4, 0), t((2, 0), 4)), {"reduction": "none"}, empty=True),
    ]


def _sf_bad(device):
    x = make((4, 5), device=device)
    t = class_targets((4,), 5, device)
    return [
        BadInput("reduction", (x, t), {"reduction": "avg"}, ValueError, "reduction"),
        BadInput("gamma", (x, t), {"gamma": -1.0}, ValueError, "gamma"),
        BadInput("gamma-nan", (x, t), {"gamma": float("nan")}, ValueError, "gamma"),
        BadInput("target-shape", (x, t[:3]), {}, ValueError, "target"),
        BadInput("target-int32", (x, t.int()), {}, TypeError, "target"),
        BadInput("target-float", (x, t.float()), {}, TypeError, "target"),
        BadInput("input-dtype", (x.long(), t), {}, TypeError, "input"),
        BadInput("input-1d", (x[0], t[0]), {}, ValueError, "input"),
        BadInput("weight-shape", (x, t), {"weight": torch.ones(4, device=device)}, ValueError,
                 "weight"),
        BadInput("ignore_index-type", (x, t), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        BadInput("backend", (x, t), {"backend": "tpu"}, ValueError, "backend"),
    ]


def _sf_ops(device, backend):
    x = make((3, 2, 17), device=device)
    t = class_targets((3, 17), 2, device)
    t[0, 0] = -100
    w, s = torch.rand(2, device=device), torch.tensor(0.5, device=device)
    x1 = make((70, 5), device=device).unsqueeze(2)
    t1 = class_targets((70, 1), 5, device, ignore_frac=0.2)
    out = []
    for xx, tt, ww in ((x, t, w), (x1, t1, None)):
        for reduce in (False, True):
            for compute_grad in (False, True):
                out.append((torch.ops.fusedloss.softmax_focal_fwd,
                            (xx.clone().requires_grad_(compute_grad), tt, ww, s, 2.0, -100,
                             reduce, compute_grad, backend)))
    if backend != "triton":
        out.append((torch.ops.fusedloss_C.softmax_focal_fwd, (x, t, w, s, 0.5, -100, True, True)))
        out.append((torch.ops.fusedloss_C.softmax_focal_fwd, (x, t, None, None, 2.0, -100, False,
                                                              False)))
    return out


def _sf_gradcheck(device):
    x = make((3, 9), torch.float64, device)
    t = class_targets((3,), 9, device, ignore_frac=0.25)
    t[0] = 2
    w = torch.rand(9, dtype=torch.float64, device=device) + 0.1
    return [
        Sample("mean", (x, t)),
        Sample("none-weighted", (x, t), {"reduction": "none", "weight": w, "gamma": 0.5}),
        Sample("mean-gamma3.5", (x, t), {"weight": w, "gamma": 3.5}),
        Sample("spatial-sum", (make((2, 3, 4), torch.float64, device),
                               class_targets((2, 4), 3, device)), {"reduction": "sum",
                                                                   "gamma": 1.0}),
    ]


def _sf_compile(device):
    x = make((5, 8), device=device)
    t = class_targets((5,), 8, device, ignore_frac=0.3)
    t[0] = 1
    return [
        Sample("mean-weighted", (x, t), {"weight": torch.rand(8, device=device) + 0.1}),
        Sample("none", (x, t), {"reduction": "none", "gamma": 0.5}),
        Sample("spatial-sum", (make((2, 3, 70), device=device),
                               class_targets((2, 70), 3, device)), {"reduction": "sum"}),
    ]


def _sf_torch_half(input, target, gamma=2.0, weight=None, ignore_index=-100, reduction="mean"):
    """The focal loss from torch ops at the input's precision (log_softmax + gather)."""
    logp = torch.log_softmax(input, 1)
    valid = target != ignore_index
    y = torch.where(valid, target, 0).unsqueeze(1)
    lp = logp.gather(1, y).squeeze(1)
    w = torch.ones(input.shape[1], dtype=input.dtype, device=input.device) if weight is None \
        else weight.to(input.dtype)
    wy = torch.where(valid, w[y.squeeze(1)], 0)
    loss = -wy * (-torch.expm1(lp)) ** gamma * lp
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / wy.sum()


OPS.append(OpInfo("softmax_focal", fusedloss.softmax_focal_loss, reference.softmax_focal_loss,
                  _sf_samples, _sf_bad, _sf_ops, _sf_gradcheck, _sf_compile,
                  torch_half=_sf_torch_half))
# dice_loss / tversky_loss / dice_ce_loss (one row: the device ops are shared) -----------------

_DICE_FNS = {"dice": "dice_loss", "tversky": "tversky_loss", "dice_ce": "dice_ce_loss"}


def _dice(input, target, *, loss="dice", **kw):
    """fusedloss.dice_loss / tversky_loss / dice_ce_loss, chosen by ``loss``."""
    return getattr(fusedloss, _DICE_FNS[loss])(input, target, **kw)


def _dice_ref(input, target, *, loss="dice", **kw):
    return getattr(reference, _DICE_FNS[loss])(input, target, **kw)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                        else torch.channels_last_3d)


def _dice_samples(device):
    def t(shape, c, frac=0.0):
        return class_targets(shape, c, device, frac)
    x = lambda *s: make(s, device=device)  # noqa: E731
    soft = lambda *s: soft_targets(s, device)  # noqa: E731
    w = lambda c: torch.rand(c, device=device) + 0.1  # noqa: E731
    all_ignored = torch.full((2, 3, 4), -100, device=device)
    return [
        Sample("2d-mean-ignored", (x(2, 4, 5, 6), t((2, 5, 6), 4, 0.2))),
        Sample("3d-none-batch-nobg-weight", (x(2, 3, 3, 4, 5), t((2, 3, 4, 5), 3, 0.1)),
               {"reduction": "none", "batch": True, "include_background": False,
                "weight": w(3)}),
        Sample("channels_last-none", (channels_last(x(2, 5, 6, 7)), t((2, 6, 7), 5, 0.1)),
               {"reduction": "none", "weight": w(5)}),
        Sample("channels_last_3d-sum", (channels_last(x(1, 3, 3, 4, 5)), t((1, 3, 4, 5), 3)),
               {"reduction": "sum", "squared_pred": True}),
        Sample("squared-smooth", (x(3, 6, 33), t((3, 33), 6, 0.3)),
               {"reduction": "sum", "squared_pred": True, "smooth_nr": 0.0,
                "smooth_dr": 1e-3}),
        Sample("absent-classes", (x(2, 7, 9), t((2, 9), 2)), {"reduction": "none"}),
        Sample("1-position", (x(1, 2, 1), t((1, 1), 2))),
        Sample("sigmoid-C1", (x(2, 1, 7, 3), soft(2, 1, 7, 3)), {"activation": "sigmoid"}),
        Sample("sigmoid-none-nobg-squared", (x(2, 3, 4, 5), soft(2, 3, 4, 5)),
               {"activation": "sigmoid", "reduction": "none", "include_background": False,
                "squared_pred": True, "weight": w(3)}),
        Sample("tversky-weighted", (x(2, 4, 5, 6), t((2, 5, 6), 4, 0.2)),
               {"loss": "tversky", "alpha": 0.3, "beta": 0.7, "weight": w(4)}),
        Sample("tversky-batch-none-nobg", (x(3, 3, 17), t((3, 17), 3)),
               {"loss": "tversky", "alpha": 0.8, "beta": 0.2, "batch": True,
                "include_background": False, "reduction": "none"}),
        Sample("tversky-sigmoid-sum", (x(2, 2, 9), soft(2, 2, 9)),
               {"loss": "tversky", "activation": "sigmoid", "reduction": "sum"}),
        Sample("dice_ce-mean-all-extras", (x(2, 4, 5, 6), t((2, 5, 6), 4, 0.2)),
               {"loss": "dice_ce", "weight": w(4), "ce_weight": w(4), "label_smoothing": 0.1,
                "lambda_dice": 0.7, "lambda_ce": 1.3}),
        Sample("dice_ce-sum-nobg-squared-batch", (x(2, 3, 4, 5, 2), t((2, 4, 5, 2), 3, 0.1)),
               {"loss": "dice_ce", "reduction": "sum", "include_background": False,
                "squared_pred": True, "batch": True, "ce_weight": w(3)}),
        Sample("dice_ce-smoothing-noweight", (channels_last(x(2, 5, 3, 3)), t((2, 3, 3), 5)),
               {"loss": "dice_ce", "label_smoothing": 0.3}),
        Sample("all-ignored", (x(2, 3, 3, 4), all_ignored), {"reduction": "none"},
               nan_loss=False),
        Sample("empty-batch", (x(0, 3, 4), t((0, 4), 3)), empty=True),
        Sample("empty-spatial", (x(2, 3, 0), t((2, 0), 3)), {"weight": w(3)}, empty=True),
    ]


def _dice_bad(device):
    x = make((2, 4, 5), device=device)
    t = class_targets((2, 5), 4, device)
    s = soft_targets((2, 4, 5), device)
    ones = lambda *a, **k: torch.ones(*a, device=device, **k)  # noqa: E731
    return [
        BadInput("reduction", (x, t), {"reduction": "avg"}, ValueError, "reduction"),
        BadInput("input-2d", (x[:, :, 0], t[:, 0]), {}, ValueError, "input"),
        BadInput("input-dtype", (x.long(), t), {}, TypeError, "input"),
        BadInput("input-1-class", (x[:, :1], t * 0), {}, ValueError, "input"),
        BadInput("target-shape", (x, t[:, :3]), {}, ValueError, "target"),
        BadInput("target-int32", (x, t.int()), {}, TypeError, "target"),
        BadInput("target-float", (x, t.float()), {}, TypeError, "target"),
        BadInput("target-type", (x, [0, 1]), {}, TypeError, "target"),
        BadInput("weight-shape", (x, t), {"weight": ones(3)}, ValueError, "weight"),
        BadInput("weight-dtype", (x, t), {"weight": ones(4, dtype=torch.long)}, TypeError,
                 "weight"),
        BadInput("weight-negative", (x, t), {"weight": torch.tensor([1.0, -1.0, 1.0, 1.0],
                                                                   device=device)},
                 ValueError, "weight"),
        BadInput("smooth_nr", (x, t), {"smooth_nr": -1e-5}, ValueError, "smooth_nr"),
        BadInput("smooth_dr-nan", (x, t), {"smooth_dr": float("nan")}, ValueError, "smooth_dr"),
        BadInput("ignore_index-type", (x, t), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        BadInput("include_background-type", (x, t), {"include_background": 0}, TypeError,
                 "include_background"),
        BadInput("batch-type", (x, t), {"batch": "yes"}, TypeError, "batch"),
        BadInput("squared_pred-type", (x, t), {"squared_pred": 1}, TypeError, "squared_pred"),
        BadInput("activation", (x, t), {"activation": "relu"}, ValueError, "activation"),
        BadInput("sigmoid-target-shape", (x, s[:, :3]), {"activation": "sigmoid"}, ValueError,
                 "target"),
        BadInput("sigmoid-target-int", (x, s.long()), {"activation": "sigmoid"}, TypeError,
                 "target"),
        BadInput("sigmoid-1-channel-nobg", (x[:, :1], s[:, :1]),
                 {"activation": "sigmoid", "include_background": False}, ValueError,
                 "include_background"),
        BadInput("tversky-alpha", (x, t), {"loss": "tversky", "alpha": -0.1}, ValueError,
                 "alpha"),
        BadInput("tversky-beta-type", (x, t), {"loss": "tversky", "beta": "0.5"}, TypeError,
                 "beta"),
        BadInput("dice_ce-none", (x, t), {"loss": "dice_ce", "reduction": "none"}, ValueError,
                 "reduction"),
        BadInput("dice_ce-sigmoid", (x, s), {"loss": "dice_ce", "activation": "sigmoid"},
                 ValueError, "activation"),
        BadInput("dice_ce-lambda_ce", (x, t), {"loss": "dice_ce", "lambda_ce": -1.0},
                 ValueError, "lambda_ce"),
        BadInput("dice_ce-lambda_dice", (x, t), {"loss": "dice_ce", "lambda_dice": float("inf")},
                 ValueError, "lambda_dice"),
        BadInput("dice_ce-ce_weight", (x, t), {"loss": "dice_ce", "ce_weight": ones(5)},
                 ValueError, "ce_weight"),
        BadInput("dice_ce-ce_weight-negative", (x, t),
                 {"loss": "dice_ce", "ce_weight": -ones(4)}, ValueError, "ce_weight"),
        BadInput("dice_ce-label_smoothing", (x, t), {"loss": "dice_ce", "label_smoothing": 1.5},
                 ValueError, "label_smoothing"),
        BadInput("backend", (x, t), {"backend": "tpu"}, ValueError, "backend"),
    ]


def _dice_ops(device, backend):
    x = make((2, 3, 17), device=device)
    t = class_targets((2, 17), 3, device, ignore_frac=0.2)
    x5 = make((2, 5, 4, 6), device=device).contiguous(memory_format=torch.channels_last)
    x5 = x5.reshape(2, 5, 24)  # class stride 1
    t5 = class_targets((2, 24), 5, device)
    s = soft_targets((2, 3, 17), device)
    ops = torch.ops.fusedloss
    out = []
    for xx, tt, sig in ((x, t, False), (x5, t5, False), (x, s, True)):
        for squared in (False, True):
            for with_ce, with_sm in (((False, False),) if sig else
                                     ((False, False), (True, False), (True, True))):
                flags = (-100, sig, squared, with_ce, with_sm)
                for grad in (False, True):
                    out.append((ops.dice_sums,
                                (xx.clone().requires_grad_(grad), tt) + flags + (backend,)))
                n, c, d = xx.shape
                lse = (torch.logsumexp(xx, 1) if not sig else xx.new_empty(0))
                gs = make((n, c, 5), device=device)
                out.append((ops.dice_sums_backward, (gs, xx, tt, lse) + flags + (backend,)))
    if backend != "triton" and hasattr(torch.ops.fusedloss_C, "dice_fwd"):
        c_ops = torch.ops.fusedloss_C  # fusedloss_C's device ops on the canonical view
        out.append((c_ops.dice_fwd, (x5, t5, -100, False, False, True, True)))
        out.append((c_ops.dice_bwd, (make((2, 5, 5), device=device), x5, t5,
                                     torch.logsumexp(x5, 1), -100, False, False, True, True)))
        out.append((c_ops.dice_fwd, (x, s, -100, True, True, False, False)))
    return out


def _dice_gradcheck(device):
    x = make((2, 3, 5), torch.float64, device)
    t = class_targets((2, 5), 3, device, ignore_frac=0.2)
    t[0, 0] = 1
    s = soft_targets((2, 3, 5), device).double()
    w = torch.rand(3, dtype=torch.float64, device=device) + 0.1
    return [
        Sample("mean", (x, t)),
        Sample("none-weight-nobg", (x, t), {"reduction": "none", "weight": w,
                                            "include_background": False}),
        Sample("squared-batch-sum", (x, t), {"squared_pred": True, "batch": True,
                                             "reduction": "sum"}),
        Sample("sigmoid-squared", (x, s), {"activation": "sigmoid", "squared_pred": True}),
        Sample("tversky", (x, t), {"loss": "tversky", "alpha": 0.3, "beta": 0.7, "weight": w}),
        Sample("dice_ce-extras", (x, t), {"loss": "dice_ce", "ce_weight": w,
                                          "label_smoothing": 0.2, "lambda_dice": 0.5}),
        Sample("dice_ce-sum-squared", (x, t), {"loss": "dice_ce", "reduction": "sum",
                                               "squared_pred": True, "batch": True}),
    ]


def _dice_compile(device):
    x = make((2, 4, 5, 6), device=device)
    t = class_targets((2, 5, 6), 4, device, ignore_frac=0.2)
    w = torch.rand(4, device=device) + 0.1
    return [
        Sample("dice-mean-weight", (x, t), {"weight": w, "include_background": False}),
        Sample("dice-none-batch", (x, t), {"reduction": "none", "batch": True,
                                           "squared_pred": True}),
        Sample("dice-channels_last", (channels_last(x), t), {}),
        Sample("sigmoid", (x, soft_targets((2, 4, 5, 6), device)), {"activation": "sigmoid"}),
        Sample("tversky-none", (x, t), {"loss": "tversky", "alpha": 0.7, "beta": 0.3,
                                        "reduction": "none"}),
        Sample("dice_ce-extras", (x, t), {"loss": "dice_ce", "ce_weight": w,
                                          "label_smoothing": 0.1, "reduction": "sum"}),
    ]


def _dice_torch_half(input, target, *, loss="dice", weight=None, ignore_index=-100,
                     reduction="mean", include_background=True, squared_pred=False, batch=False,
                     smooth_nr=1e-5, smooth_dr=1e-5, alpha=0.5, beta=0.5, ce_weight=None,
                     label_smoothing=0.0, lambda_dice=1.0, lambda_ce=1.0):
    """The Dice family from torch ops at the input's precision (softmax, one-hot, sums): what a
    user writes (MONAI's computation) in half precision."""
    n, c = input.shape[:2]
    valid = (target != ignore_index).unsqueeze(1)
    y = torch.where(valid.squeeze(1), target, 0)
    p = torch.softmax(input, 1) * valid
    g = F.one_hot(y, c).movedim(-1, 1).to(input.dtype) * valid
    dims = tuple(range(2, input.dim()))
    if batch:
        dims = (0,) + dims
    inter = (p * g).sum(dims)
    pred = (p * p if squared_pred else p).sum(dims)
    ground = (g * g if squared_pred else g).sum(dims)
    if loss == "tversky":
        f = 1 - (inter + smooth_nr) / (inter + alpha * (pred - inter) + beta * (ground - inter)
                                       + smooth_dr)
    else:
        f = 1 - (2 * inter + smooth_nr) / (pred + ground + smooth_dr)
    if weight is not None:
        f = f * weight.to(f.dtype)
    if not include_background:
        f = f[..., 1:]
    out = f if reduction == "none" else f.mean() if reduction == "mean" else f.sum()
    if loss == "dice_ce":
        out = lambda_dice * out + lambda_ce * F.cross_entropy(
            input, target, ce_weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing)
    return out


OPS.append(OpInfo("dice", _dice, _dice_ref, _dice_samples, _dice_bad, _dice_ops,
                  _dice_gradcheck, _dice_compile, torch_half=_dice_torch_half))
