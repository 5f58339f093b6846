"""fusedloss.nn modules as drop-ins for torch.nn's, and the acceptance test: a tiny causal LM
trained with torch.nn.CrossEntropyLoss and with the fusedloss modules follows the same loss curve.

The modules run on the default backend ("auto": the CPU kernels when fusedloss._C is built, else
the reference with a warning), as user code would.
"""

from __future__ import annotations

import copy
import io
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedloss

pytestmark = pytest.mark.filterwarnings("ignore:fusedloss. using the slow reference")


def _close(a, b, tol=2e-5, what=""):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _loss_and_grad(module, x, t, upstream=None):
    x = x.detach().clone().requires_grad_(True)
    out = module(x, t)
    out.backward(torch.ones_like(out) if upstream is None else upstream)
    return out.detach(), x.grad


# --------------------------------------------------------------------------------------------
# CrossEntropyLoss: constructor, attributes, state, dtype, values
# --------------------------------------------------------------------------------------------


def test_defaults_match_torch():
    ours, theirs = fusedloss.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
    for name in ("ignore_index", "reduction", "label_smoothing", "weight"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.training == theirs.training
    assert list(ours.parameters()) == [] and list(ours.buffers()) == []
    assert ours.state_dict() == theirs.state_dict() == {}


def test_positional_arguments_match_torch():
    """torch's order: weight, size_average, ignore_index, reduce, reduction, label_smoothing."""
    w = torch.rand(7) + 0.5
    ours = fusedloss.nn.CrossEntropyLoss(w, None, 3, None, "sum", 0.1)
    theirs = torch.nn.CrossEntropyLoss(w, None, 3, None, "sum", 0.1)
    assert ours.ignore_index == theirs.ignore_index == 3
    assert ours.reduction == theirs.reduction == "sum"
    assert ours.label_smoothing == theirs.label_smoothing == 0.1
    assert torch.equal(ours.weight, theirs.weight)


@pytest.mark.parametrize("size_average,reduce", list(itertools.product([None, True, False],
                                                                        repeat=2)))
def test_legacy_size_average_reduce(size_average, reduce):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fusedloss.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce,
                                             reduction="sum")
        theirs = torch.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce,
                                           reduction="sum")
    assert ours.reduction == theirs.reduction
    x, t = torch.randn(6, 5), torch.randint(0, 5, (6,))
    _close(ours(x, t), theirs(x, t), what=f"{size_average}, {reduce}")


def test_weight_is_a_buffer_in_state_dict():
    w = torch.rand(5) + 0.1
    ours, theirs = fusedloss.nn.CrossEntropyLoss(weight=w), torch.nn.CrossEntropyLoss(weight=w)
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert list(ours.parameters()) == []
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys() == {"weight"}
    assert torch.equal(sd_ours["weight"], sd_theirs["weight"])

    # state dicts move between the two classes, both ways
    w2 = torch.rand(5) + 0.1
    a = fusedloss.nn.CrossEntropyLoss(weight=torch.ones(5))
    a.load_state_dict(torch.nn.CrossEntropyLoss(weight=w2).state_dict())
    assert torch.equal(a.weight, w2)
    b = torch.nn.CrossEntropyLoss(weight=torch.ones(5))
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.weight, w2)

    # serialisation of the whole module, and deepcopy
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
    _close(loaded(x, t), theirs(x, t), what="reloaded")
    _close(copy.deepcopy(ours)(x, t), theirs(x, t), what="deepcopy")


def test_to_dtype_moves_the_weight():
    w = torch.rand(6) + 0.1
    ours = fusedloss.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1).to(torch.float64)
    theirs = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1).to(torch.float64)
    assert ours.weight.dtype == theirs.weight.dtype == torch.float64
    x = torch.randn(9, 6, dtype=torch.float64)
    t = torch.randint(0, 6, (9,))
    got, want = ours(x, t), theirs(x, t)
    assert got.dtype == want.dtype == torch.float64
    _close(got, want, tol=1e-10)
    ours.half()
    assert ours.weight.dtype == torch.float16
    ours.to(torch.float32)
    assert ours.weight.dtype == torch.float32
    # .to() never touches the configuration
    assert ours.label_smoothing == 0.1 and ours.reduction == "mean"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(weight=True),
    dict(ignore_index=2),
    dict(label_smoothing=0.15),
    dict(weight=True, ignore_index=1, label_smoothing=0.1),
], ids=["plain", "weight", "ignore", "smoothing", "all"])
@pytest.mark.parametrize("shape", [(12, 10), (3, 10, 4, 5), (10,)], ids=["2d", "4d", "unbatched"])
def test_values_and_gradients_match_torch(reduction, kwargs, shape):
    kwargs = dict(kwargs)
    if kwargs.get("weight"):
        kwargs["weight"] = torch.rand(10) + 0.1
    c = shape[0] if len(shape) == 1 else shape[1]
    t_shape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    x = torch.randn(shape) * 3
    t = torch.randint(0, c, t_shape)
    if "ignore_index" in kwargs and len(shape) > 1:
        t.view(-1)[::3] = kwargs["ignore_index"]
    up = torch.rand(t_shape) if reduction == "none" else None
    ours = fusedloss.nn.CrossEntropyLoss(reduction=reduction, **kwargs)
    theirs = torch.nn.CrossEntropyLoss(reduction=reduction, **kwargs)
    got, g_got = _loss_and_grad(ours, x, t, up)
    want, g_want = _loss_and_grad(theirs, x, t, up)
    assert got.shape == want.shape and got.dtype == want.dtype
    _close(got, want, what="loss")
    _close(g_got, g_want, what="grad")


def test_probability_targets_match_torch():
    x = torch.randn(8, 6)
    p = torch.softmax(torch.randn(8, 6), dim=1)
    ours = fusedloss.nn.CrossEntropyLoss(label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    got, g_got = _loss_and_grad(ours, x, p)
    want, g_want = _loss_and_grad(theirs, x, p)
    _close(got, want, what="loss")
    _close(g_got, g_want, what="grad")


def test_all_ignored_mean_is_nan_like_torch():
    x, t = torch.randn(4, 5), torch.full((4,), -100)
    got, g = _loss_and_grad(fusedloss.nn.CrossEntropyLoss(), x, t)
    want, g_want = _loss_and_grad(torch.nn.CrossEntropyLoss(), x, t)
    assert torch.isnan(got) and torch.isnan(want)
    _close(g, g_want, what="grad")


def test_extras_and_repr():
    m = fusedloss.nn.CrossEntropyLoss(ignore_index=2, z_loss=1e-3, return_lse=True)
    x, t = torch.randn(5, 7), torch.randint(0, 7, (5,))
    loss, lse = m(x, t)
    assert lse.shape == (5,)
    _close(lse, torch.logsumexp(x, 1), what="lse")
    _close(loss, fusedloss.reference.cross_entropy(x, t, ignore_index=2, z_loss=1e-3),
           what="z_loss")
    r = repr(m)
    assert "ignore_index=2" in r and "z_loss" in r


def test_bad_reduction_raises_at_call():
    m = fusedloss.nn.CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        m(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64))


def test_linear_cross_entropy_loss_module():
    w = torch.rand(11) + 0.1
    m = fusedloss.nn.LinearCrossEntropyLoss(weight=w, ignore_index=0, label_smoothing=0.05,
                                            chunk_size=4)
    assert [n for n, _ in m.named_buffers()] == ["weight"]
    assert m.state_dict().keys() == {"weight"}
    assert "ignore_index=0" in repr(m) and "chunk_size=4" in repr(m)
    m = m.to(torch.float64)
    assert m.weight.dtype == torch.float64
    h = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    lw = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (2, 5))
    loss = m(h, lw, t)
    want = F.cross_entropy((h @ lw.T).reshape(-1, 11), t.reshape(-1), weight=m.weight,
                           ignore_index=0, label_smoothing=0.05)
    _close(loss, want, tol=1e-10, what="loss")
    g = torch.autograd.grad(loss, (h, lw))
    gw = torch.autograd.grad(want, (h, lw))
    _close(g[0], gw[0], tol=1e-10, what="d hidden")
    _close(g[1], gw[1], tol=1e-10, what="d weight")


# --------------------------------------------------------------------------------------------
# Acceptance: the same tiny causal LM trained with torch's loss and with fusedloss's
# --------------------------------------------------------------------------------------------

VOCAB, DIM, SEQ, BATCH, STEPS = 8192, 64, 32, 8, 50
LR = 2e-3  # fast enough to learn in 50 steps, gentle enough that AdamW does not amplify
# last-ulp differences between the losses (3e-3 grows them to ~4e-5 after step 30)


class TinyLM(torch.nn.Module):
    """Token + position embeddings, 2 pre-norm causal transformer blocks, lm_head (no bias)."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, DIM)
        self.pos = torch.nn.Embedding(SEQ, DIM)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(DIM, nhead=4, dim_feedforward=2 * DIM, dropout=0.0,
                                             batch_first=True, norm_first=True)
            for _ in range(2))
        self.norm = torch.nn.LayerNorm(DIM)
        self.lm_head = torch.nn.Linear(DIM, VOCAB, bias=False)
        self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(SEQ),
                             persistent=False)

    def hidden(self, tokens):
        h = self.tok(tokens) + self.pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h, src_mask=self.causal, is_causal=True)
        return self.norm(h)


def _batches():
    """A few fixed batches with learnable structure (a noisy affine next-token rule) and some
    padding, whose label is ignore_index."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(4):
        start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
        steps = torch.arange(SEQ)
        tokens = (start * 31 + steps * 17) % VOCAB
        noise = torch.rand(BATCH, SEQ, generator=g) < 0.1
        tokens = torch.where(noise, torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), tokens)
        labels = tokens[:, 1:].clone()
        labels[:, -3:][torch.rand(BATCH, 3, generator=g) < 0.5] = -100  # padding at the end
        out.append((tokens[:, :-1], labels))
    return out


def _train(kind):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    if kind == "torch":
        loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    elif kind == "fused":
        loss_fn = fusedloss.nn.CrossEntropyLoss(ignore_index=-100)
    elif kind == "fused_inplace":
        loss_fn = fusedloss.nn.CrossEntropyLoss(ignore_index=-100, inplace_backward=True)
    else:
        loss_fn = fusedloss.nn.LinearCrossEntropyLoss(ignore_index=-100)
    batches = _batches()
    curve = []
    for step in range(STEPS):
        tokens, labels = batches[step % len(batches)]
        h = model.hidden(tokens)
        if kind == "linear":
            loss = loss_fn(h, model.lm_head.weight, labels)
        else:
            logits = model.lm_head(h)  # (B, T, V), contiguous: the in-place run writes here
            loss = loss_fn(logits.reshape(-1, VOCAB), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return torch.tensor(curve, dtype=torch.float64)


@pytest.fixture
def deterministic():
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # one thread: the same sums every run, and no OpenMP spinning
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def test_tiny_lm_training_curves_match_torch(deterministic):
    curves = {kind: _train(kind) for kind in ("torch", "fused", "fused_inplace", "linear")}
    ref = curves["torch"]
    assert torch.isfinite(ref).all()
    assert ref[-4:].mean() < ref[:4].mean() - 2.0, f"the model did not learn: {ref.tolist()}"
    for kind, curve in curves.items():
        diff = (curve - ref).abs()
        assert diff.max() <= 1e-4, (
            f"{kind}: loss curve differs from torch.nn.CrossEntropyLoss by {diff.max():.2e} at "
            f"step {int(diff.argmax())}\n{kind}: {curve.tolist()}\ntorch: {ref.tolist()}")


def test_help_shows_fusedloss_docstrings():
    """help(fusedloss.nn.X) must not show torch.nn.Module's generic __init__/forward docstrings."""
    import inspect

    import fusedloss.nn as fnn

    module_docs = {inspect.getdoc(torch.nn.Module.__init__),
                   inspect.getdoc(torch.nn.Module.forward)}
    assert set(fnn.__all__) == set(fnn._CALLS)
    for name in fnn.__all__:
        cls = getattr(fnn, name)
        for meth in (cls.__init__, cls.forward):
            doc = inspect.getdoc(meth)
            assert doc and doc not in module_docs, (name, meth.__name__, doc)
            assert "fusedloss." in doc, (name, meth.__name__, doc)
