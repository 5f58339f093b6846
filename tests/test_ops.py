"""The checks every op gets, driven by the op table of ``tests/_support.py`` (:data:`OPS`), on
every fused backend that runs here: values and gradients against the reference (float32, and the
same samples non-contiguous), empty batches, NaN propagation, float64 gradcheck,
``torch.library.opcheck`` on its custom ops, ``torch.compile(fullgraph=True)``, and bad inputs
raising a clear error that names the argument.

A new loss adds a row to OPS, not a test file of this boilerplate (docs/ADDING_A_LOSS.md).
"""

from __future__ import annotations

import pytest
import torch

import fusedloss
from _support import OPS, assert_close, loss_and_grads, noncontiguous
from conftest import FUSED


def _params(samples_of):
    """(op, sample name, backend) for every op, sample and fused backend; unavailable backends
    are skipped with the reason."""
    out = []
    for op in OPS:
        status = fusedloss.backends(op.name)
        for sample in samples_of(op):
            for backend in FUSED:
                ok, why = status[backend]["available"], status[backend]["why"]
                marks = [] if ok else [pytest.mark.skip(reason=f"{backend}: {why}")]
                out.append(pytest.param(op, sample.name, backend, marks=marks,
                                        id=f"{op.name}-{sample.name}-{backend}"))
    return out


def _sample(samples, name):
    (s,) = [s for s in samples if s.name == name]
    return s


def _check_against_reference(op, s, backend, dtype=torch.float32, what=""):
    got, g_got = loss_and_grads(op.fused, s.args, {**s.kwargs, "backend": backend}, s.grad_args)
    want, g_want = loss_and_grads(op.reference, s.args, s.kwargs, s.grad_args)
    assert got.dtype == want.dtype, f"{what} loss dtype {got.dtype} != {want.dtype}"
    assert_close(got, want, dtype, f"{what} loss")
    for i, a, b in zip(s.grad_args, g_got, g_want):
        if b is None:
            assert a is None or not a.any(), f"{what} grad of arg {i}: expected none"
            continue
        assert_close(a, b, dtype, f"{what} grad of arg {i}")


@pytest.mark.parametrize("op, name, backend", _params(lambda op: op.samples("cpu")))
def test_matches_reference(op, name, backend):
    s = _sample(op.samples(FUSED[backend]), name)
    _check_against_reference(op, s, backend, what=name)


@pytest.mark.parametrize("op, name, backend", _params(lambda op: op.samples("cpu")))
def test_noncontiguous(op, name, backend):
    s = _sample(op.samples(FUSED[backend]), name)
    s.args = tuple(noncontiguous(a) if isinstance(a, torch.Tensor) else a for a in s.args)
    s.kwargs = {k: noncontiguous(v) if isinstance(v, torch.Tensor) else v
                for k, v in s.kwargs.items()}
    assert not any(isinstance(a, torch.Tensor) and a.numel() > 1 and a.is_contiguous()
                   for a in s.args), f"{name}: the transform left a contiguous argument"
    _check_against_reference(op, s, backend, what=f"{name} (non-contiguous)")


@pytest.mark.parametrize("op, name, backend",
                         _params(lambda op: [s for s in op.samples("cpu") if s.empty]))
def test_empty_batch(op, name, backend):
    s = _sample(op.samples(FUSED[backend]), name)
    for reduction in ("mean", "sum", "none"):
        kw = {**s.kwargs, "reduction": reduction}
        got, grads = loss_and_grads(op.fused, s.args, {**kw, "backend": backend}, s.grad_args)
        want = op.reference(*s.args, **kw)
        assert_close(got, want, torch.float32, f"{reduction}")  # 'mean': NaN like torch
        for i, g in zip(s.grad_args, grads):
            assert g is None or (g.shape == s.args[i].shape and not g.any()), f"grad of arg {i}"


@pytest.mark.parametrize("op, name, backend",
                         _params(lambda op: [s for s in op.samples("cpu")
                                             if s.nan_loss and not s.empty]))
def test_nan_propagates(op, name, backend):
    """NaN in the input gives NaN in the loss, never a silently finite number."""
    s = _sample(op.samples(FUSED[backend]), name)
    x = torch.full_like(s.args[0], float("nan"))
    got = op.fused(x, *s.args[1:], **{**s.kwargs, "reduction": "sum", "backend": backend})
    assert torch.isnan(got), f"{name}: loss {got} from NaN input"


@pytest.mark.parametrize("op, name, backend",
                         _params(lambda op: op.gradcheck_samples("cpu")))
def test_gradcheck_float64(op, name, backend):
    s = _sample(op.gradcheck_samples(FUSED[backend]), name)
    leaves = [s.args[i].detach().clone().requires_grad_(True) for i in s.grad_args]

    def f(*xs):
        args = list(s.args)
        for i, x in zip(s.grad_args, xs):
            args[i] = x
        return op.fused(*args, **{**s.kwargs, "backend": backend})

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-7)


def _op_params():
    out = []
    for op in OPS:
        status = fusedloss.backends(op.name)
        for backend in FUSED:
            ok, why = status[backend]["available"], status[backend]["why"]
            marks = [] if ok else [pytest.mark.skip(reason=f"{backend}: {why}")]
            out.append(pytest.param(op, backend, marks=marks, id=f"{op.name}-{backend}"))
    return out


@pytest.mark.parametrize("op, backend", _op_params())
def test_opcheck(op, backend):
    calls = op.custom_ops(FUSED[backend], backend)
    assert calls, f"{op.name}: no custom-op samples"
    for custom_op, args in calls:
        torch.library.opcheck(custom_op, args)


@pytest.mark.parametrize("op, name, backend", _params(lambda op: op.compile_samples("cpu")))
def test_compile_fullgraph(op, name, backend):
    """torch.compile(fullgraph=True) forward and backward equal eager (no graph break)."""
    torch._dynamo.reset()
    s = _sample(op.compile_samples(FUSED[backend]), name)
    inplace = s.kwargs.get("inplace_backward", False)

    def step(*args):
        if inplace:  # logits produced by an op: in-place on a leaf is refused
            args = (args[0] * 1.0,) + args[1:]
        return op.fused(*args, **{**s.kwargs, "backend": backend})

    graphs = []

    def capture(gm, example_inputs):  # dynamo's graph, then aot_eager as before
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(step, fullgraph=True, backend=capture)
    got, g_got = loss_and_grads(compiled, s.args, {}, s.grad_args)
    # The fused op is in the graph: not the reference's plain torch ops (dynamo's tracing once
    # looked like a torch.func transform and sent every compiled loss to the reference).
    assert any("fusedloss" in str(node.target) for g in graphs for m in g.modules()
               if isinstance(m, torch.fx.GraphModule) for node in m.graph.nodes), \
        "the compiled graph does not call a fusedloss op"
    want, g_want = loss_and_grads(step, s.args, {}, s.grad_args)
    assert_close(got, want, torch.float32, "compiled loss")
    for a, b in zip(g_got, g_want):
        assert_close(a, b, torch.float32, "compiled grad")


@pytest.mark.parametrize("op, name, backend", _params(lambda op: op.bad_inputs("cpu")))
def test_bad_input(op, name, backend):
    (bad,) = [b for b in op.bad_inputs(FUSED[backend]) if b.name == name]
    kwargs = {"backend": backend, **bad.kwargs}
    with pytest.raises(bad.exc, match=bad.match):
        op.fused(*bad.args, **kwargs)
    if "backend" not in bad.kwargs:  # the spec raises the same error
        with pytest.raises(bad.exc, match=bad.match):
            op.reference(*bad.args, **bad.kwargs)


@pytest.mark.parametrize("op, name, backend", _params(lambda op: op.samples("cpu")))
def test_deterministic(op, name, backend):
    """The same inputs (and thread count) give bitwise-equal losses and gradients twice: block
    partitions and summation orders depend on the shape only."""
    s = _sample(op.samples(FUSED[backend]), name)
    kw = {**s.kwargs, "backend": backend}
    a, ga = loss_and_grads(op.fused, s.args, kw, s.grad_args)
    b, gb = loss_and_grads(op.fused, s.args, kw, s.grad_args)
    assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(
        a.nan_to_num(), b.nan_to_num()), f"{name}: loss differs between two calls"
    for x, y in zip(ga, gb):
        if x is not None:
            assert torch.equal(x.nan_to_num(), y.nan_to_num()), f"{name}: gradient differs"
