"""fusedloss.linear_cross_entropy against the reference, torch's F.linear_cross_entropy and the
plain matmul + cross_entropy: values and all three gradients, on every fused backend."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import reference


def make_problem(n, h, v, device, dtype=torch.float32, ignore_frac=0.25, bias=True, batch=None):
    shape = (n,) if batch is None else batch
    x = torch.randn(*shape, h, dtype=torch.float64).to(dtype).to(device)
    w = (torch.randn(v, h, dtype=torch.float64) / h**0.5).to(dtype).to(device)
    b = (torch.randn(v, dtype=torch.float64) * 0.1).to(dtype).to(device) if bias else None
    t = torch.randint(0, v, shape)
    t[torch.rand(shape) < ignore_frac] = -100
    return x, w, b, t.to(device)


def grads(fn, x, w, b, t, upstream=None, **kw):
    leaves = [a.detach().clone().requires_grad_(True) for a in (x, w) + ((b,) if b is not None
                                                                          else ())]
    lb = leaves[2] if b is not None else None
    loss = fn(leaves[0], leaves[1], t, linear_bias=lb, **kw)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss, [leaf.grad for leaf in leaves]


def assert_same(got, want, tol, what):
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def compare(backend, device, x, w, b, t, tol=1e-4, upstream=None, **kw):
    loss, g = grads(fusedloss.linear_cross_entropy, x, w, b, t, upstream, backend=backend, **kw)
    kw.pop("chunk_size", None)
    want, gw = grads(reference.linear_cross_entropy, x, w, b, t, upstream, **kw)
    assert loss.shape == want.shape and loss.dtype == want.dtype
    assert_same(loss, want, tol, "loss")
    for a, e, name in zip(g, gw, ["input", "linear_weight", "linear_bias"]):
        assert_same(a, e, tol, f"grad {name}")
    return loss, g


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(backend, device, chunk_size, reduction):
    x, w, b, t = make_problem(37, 16, 300, device)
    up = torch.rand(37, device=device) if reduction == "none" else None
    compare(backend, device, x, w, b, t, chunk_size=chunk_size, reduction=reduction, upstream=up)


def test_matches_torch(backend, device):
    x, w, b, t = make_problem(29, 8, 101, device, dtype=torch.float64)
    for reduction in ["mean", "sum", "none"]:
        for kw in [{}, {"label_smoothing": 0.1}, {"weight": torch.rand(101, dtype=torch.float64,
                                                                      device=device)}]:
            got, g = grads(fusedloss.linear_cross_entropy, x, w, b, t, backend=backend,
                           reduction=reduction, chunk_size=8, **kw)
            want, gw = grads(F.linear_cross_entropy, x, w, b, t, reduction=reduction,
                             ignore_index=-100, **kw)
            assert_same(got, want, 1e-10, "loss vs F.linear_cross_entropy")
            for a, e in zip(g, gw):
                assert_same(a, e, 1e-10, "grad vs F.linear_cross_entropy")
    opts = torch.nn.LinearCrossEntropyOptions()
    got = fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, backend=backend)
    want = F.linear_cross_entropy(x, w, t, linear_bias=b, ignore_index=-100, options=opts)
    assert_same(got, want, 1e-10, "loss vs chunked F.linear_cross_entropy")


def test_extras_and_batch_dims(backend, device):
    x, w, b, t = make_problem(None, 12, 64, device, batch=(3, 5))
    wt = torch.rand(64, device=device) + 0.1
    for kw in [{"z_loss": 1e-2, "softcap": 3.0}, {"weight": wt, "label_smoothing": 0.2}]:
        for reduction in ["mean", "none"]:
            loss, _ = compare(backend, device, x, w, b, t, chunk_size=4, reduction=reduction, **kw)
            if reduction == "none":
                assert loss.shape == (3, 5)
    compare(backend, device, x, w, None, t, chunk_size=6)


def test_all_ignored(backend, device):
    """Liger #177: an all-ignored batch must not raise; torch gives NaN for 'mean'."""
    x, w, b, t = make_problem(9, 8, 50, device)
    t[:] = -100
    loss, g = compare(backend, device, x, w, b, t, chunk_size=4)
    assert torch.isnan(loss)
    assert all((gr == 0).all() for gr in g)
    compare(backend, device, x, w, b, t, chunk_size=4, reduction="sum")


def test_ignored_chunks_and_empty_batch(backend, device):
    x, w, b, t = make_problem(20, 8, 40, device, ignore_frac=0.0)
    t[:10] = -100  # the first chunks are entirely padding
    compare(backend, device, x, w, b, t, chunk_size=3)
    x, w, b, t = make_problem(0, 8, 40, device)
    loss = fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, backend=backend)
    assert torch.isnan(loss)
    loss = fusedloss.linear_cross_entropy(x, w, t, reduction="none", backend=backend)
    assert loss.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, device, dtype):
    """Loss in fp32, weight gradient accumulated in fp32: error vs float64 at most 2x that of
    torch's own half-precision computation."""
    x, w, b, t = make_problem(64, 32, 257, device, dtype=dtype, bias=False)
    ref, gref = grads(F.linear_cross_entropy, x.double(), w.double(), None, t, ignore_index=-100)
    th, gth = grads(F.linear_cross_entropy, x, w, None, t, ignore_index=-100)
    got, gg = grads(fusedloss.linear_cross_entropy, x, w, None, t, backend=backend, chunk_size=8)
    assert got.dtype == dtype
    err = lambda a, e: (a.double() - e).abs().max().item()
    assert err(got, ref) <= 2 * err(th, ref) + 1e-6
    for a, e, th_g in zip(gg, gref, gth):
        assert err(a, e) <= 2 * err(th_g, e) + 1e-6


def test_torch_compile(backend, device):
    torch._dynamo.reset()
    x, w, b, t = make_problem(10, 8, 40, device)
    f = lambda x, w, b, t: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=4,
                                                          backend=backend)
    got, g = grads(lambda x, w, t, linear_bias: torch.compile(f, fullgraph=True)(x, w,
                                                                                linear_bias, t),
                   x, w, b, t)
    want, gw = grads(reference.linear_cross_entropy, x, w, b, t)
    assert_same(got, want, 1e-4, "compiled loss")
    for a, e in zip(g, gw):
        assert_same(a, e, 1e-4, "compiled grad")


def test_module_with_tied_weight(backend, device):
    """LinearCrossEntropyLoss takes the weight at call time, so a tied embedding works."""
    emb = torch.nn.Embedding(50, 8).to(device)
    loss_fn = fusedloss.nn.LinearCrossEntropyLoss(chunk_size=5, backend=backend)
    tokens = torch.randint(0, 50, (2, 6), device=device)
    hidden = emb(tokens) * 2.0
    loss = loss_fn(hidden[:, :-1], emb.weight, tokens[:, 1:])
    loss.backward()
    ref = F.cross_entropy((hidden[:, :-1] @ emb.weight.T).reshape(-1, 50),
                          tokens[:, 1:].reshape(-1))
    assert_same(loss, ref, 1e-5, "module")
    assert emb.weight.grad is not None


def test_bad_arguments(backend, device):
    """What the fused path refuses beyond the shared checks (tests/test_ops.py has those)."""
    x, w, b, t = make_problem(6, 4, 10, device)
    lce = lambda *a, **k: fusedloss.linear_cross_entropy(*a, backend=backend, **k)
    with pytest.raises(ValueError, match="target"):
        lce(x, w, t.float())
    with pytest.raises(NotImplementedError, match="probability"):
        lce(x, w, torch.rand(6, 10, device=device))
    t[0] = 10
    with pytest.raises((IndexError, RuntimeError, AssertionError), match=r"(?i)target|bound"):
        lce(x, w, t)
