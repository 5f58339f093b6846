"""The Triton Dice kernels (kernels/dice.py) against the float64 oracle of the device-op contract
(tests/_dice_oracle.py, docs/KERNELS_dice_contract.md): every feature flag in softmax and sigmoid
mode, float32 / bfloat16 / float16 / float64, small odd shapes (N = 1, D = 1, D = 0, C = 2, 3, more
classes than one tile, D not a multiple of the tile), NCHW and channels-last logits, non-dense
logits and strided targets, ignore_index (in range too, and every position ignored), bad targets,
NaN and extreme logits, and bitwise determinism. Run under TRITON_INTERPRET=1 on CPU tensors
without a GPU; the launch knobs are made small so that a few dozen positions take every path
(several tiles per block, several blocks per n, class chunks with the lse pre-pass)."""

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from _dice_oracle import dice_grad_oracle, dice_sums_oracle  # noqa: E402

from fusedloss.kernels import dice as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Sums and gradients are accumulated in float32 (float64); a half-precision gradient is rounded
# once to its dtype (relative to the largest element).
TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-11, 1e-11),
       torch.bfloat16: (2e-5, 2e-5), torch.float16: (2e-5, 2e-5)}
GRAD_TOL = {torch.float32: (2e-5, 2e-6), torch.float64: (1e-11, 1e-12),
            torch.bfloat16: (8e-3, 8e-3), torch.float16: (1e-3, 1e-3)}

# (squared_pred, with_ce, with_smoothing): every combination in softmax mode; sigmoid has only
# squared_pred.
SOFTMAX_FLAGS = list(itertools.product((False, True), repeat=3))
SIGMOID_FLAGS = [(False, False, False), (True, False, False)]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 64 elements, blocks of 32 positions, 8 classes a softmax tile, 4 a sigmoid one:
    a (2, 5, 70) input has 3 blocks per n of up to 4 tiles, and C = 19 has 3 class chunks."""
    monkeypatch.setattr(K, "FWD_TILE_ELEMS", 64)
    monkeypatch.setattr(K, "BWD_TILE_ELEMS", 64)
    monkeypatch.setattr(K, "BLOCK_POSITIONS", 32)
    monkeypatch.setattr(K, "MAX_BLOCK_C", 8)
    monkeypatch.setattr(K, "SIGMOID_BLOCK_C", 4)


def logits(shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def class_targets(N, C, D, ignore_frac=0.2, ignore_index=-100):
    t = torch.randint(0, C, (N, D))
    t[torch.rand(N, D) < ignore_frac] = ignore_index
    return t.to(DEVICE)


def soft_targets(shape, dtype):
    return torch.rand(shape, dtype=torch.float64).to(dtype).to(DEVICE)


def targets_for(x, sigmoid, ignore_frac=0.2, ignore_index=-100):
    N, C, D = x.shape
    if sigmoid:
        return soft_targets((N, C, D), x.dtype)
    return class_targets(N, C, D, ignore_frac, ignore_index)


def check(x, t, sigmoid, flags, ignore_index=-100, grad_sums=None):
    """dice_fwd and dice_bwd of x against the oracle on the same (rounded) values."""
    squared_pred, with_ce, with_smoothing = flags
    args = (ignore_index, sigmoid, squared_pred, with_ce, with_smoothing)
    sums, lse = K.dice_fwd(x, t, *args)
    want, want_lse = dice_sums_oracle(x.cpu(), t.cpu(), *args)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    N, C, D = x.shape
    assert sums.dtype == acc and sums.shape == (N, C, 5) and sums.is_contiguous()
    rtol, atol = TOL[x.dtype]
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(sums.cpu().double(), want, rtol=rtol, atol=atol * scale,
                               equal_nan=True)
    if sigmoid:
        assert lse.shape == (0,) and lse.dtype == acc
    else:
        assert lse.shape == (N, D) and lse.dtype == acc and lse.is_contiguous()
        torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=rtol, atol=atol,
                                   equal_nan=True)
    if grad_sums is None:
        grad_sums = torch.randn(N, C, 5, dtype=torch.float64).to(acc).to(DEVICE)
    grad = K.dice_bwd(grad_sums, x, t, lse, *args)
    g_want = dice_grad_oracle(grad_sums.cpu(), x.cpu(), t.cpu(), *args)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    rtol, atol = GRAD_TOL[x.dtype]
    gscale = max(1.0, g_want.abs().max().item()) if g_want.numel() else 1.0
    torch.testing.assert_close(grad.cpu().double(), g_want, rtol=rtol, atol=atol * gscale,
                               equal_nan=True)
    if not sigmoid:  # no saved lse (what the Python layer passes): recomputed, the same gradient
        grad2 = K.dice_bwd(grad_sums, x, t, lse.new_empty(0), *args)
        torch.testing.assert_close(grad2.cpu().double(), g_want, rtol=rtol, atol=atol * gscale,
                                   equal_nan=True)
    return sums, lse, grad


# ------------------------------------------------------------------------------------------------
# Every flag, every dtype
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", SOFTMAX_FLAGS, ids=lambda f: "sq%d-ce%d-sm%d" % f)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_softmax_flags(flags, dtype):
    x = logits((2, 5, 70), dtype)
    check(x, targets_for(x, False), False, flags)


@pytest.mark.parametrize("flags", SIGMOID_FLAGS, ids=lambda f: "sq%d" % f[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sigmoid_flags(flags, dtype):
    x = logits((2, 5, 70), dtype)
    check(x, targets_for(x, True), True, flags)


@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_float16(sigmoid):
    x = logits((2, 3, 45), torch.float16)
    flags = (True, False, False) if sigmoid else (False, True, True)
    check(x, targets_for(x, sigmoid), sigmoid, flags)


def test_bfloat16_gradient_is_rounded_to_nearest():
    """The bfloat16 gradient is the float32 value rounded to nearest even (as on the GPU), not
    truncated: within half an ulp of the float64 gradient, plus the float32 error of the sum of
    terms (relative to the largest gradient)."""
    x = logits((1, 3, 40), torch.bfloat16)
    t = class_targets(1, 3, 40, 0.0)
    sums, lse = K.dice_fwd(x, t, -100, False, False, True, False)
    gs = torch.randn(1, 3, 5)
    g = K.dice_bwd(gs, x, t, lse, -100, False, False, True, False).double()
    want = dice_grad_oracle(gs, x, t, -100, False, False, True, False)
    ulp = torch.where(want == 0, torch.zeros_like(want),
                      2.0 ** (torch.floor(torch.log2(want.abs())) - 7))
    bad = (g - want).abs() > 0.5 * ulp + 1e-6 * want.abs().max()
    assert not bad.any(), (bad.nonzero(), g[bad], want[bad], x.transpose(1, 2)[bad.transpose(1, 2)])


# ------------------------------------------------------------------------------------------------
# Shapes and layouts
# ------------------------------------------------------------------------------------------------

SHAPES = {
    "N1": (1, 4, 33),
    "D1": (3, 5, 1),
    "C2": (2, 2, 40),
    "C3": (2, 3, 37),
    "C8-one-tile": (2, 8, 21),
    "C19-chunks": (2, 19, 23),  # 3 class chunks of 8 (softmax: lse pre-pass), 5 of 4 (sigmoid)
    "D-odd": (2, 5, 101),  # 4 blocks per n, the last one partial; tiles not a multiple either
}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_shapes(shape, sigmoid):
    x = logits(shape)
    flags = (True, False, False) if sigmoid else (False, True, True)
    check(x, targets_for(x, sigmoid), sigmoid, flags)
    if not sigmoid:
        check(x, targets_for(x, sigmoid), sigmoid, (True, True, False))


def test_sigmoid_one_class():
    """Binary segmentation: one sigmoid channel."""
    x = logits((3, 1, 45))
    check(x, targets_for(x, True), True, (False, False, False))
    check(x, targets_for(x, True), True, (True, False, False))


@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_default_knobs(monkeypatch, sigmoid):
    """The launch configuration the GPU gets (1024-element forward tiles, 1024-position blocks,
    2048-element backward tiles): two blocks for one n, the second partial."""
    monkeypatch.undo()
    x = logits((1, 19, 1100))
    flags = (True, False, False) if sigmoid else (True, True, True)
    check(x, targets_for(x, sigmoid), sigmoid, flags)


@pytest.mark.parametrize("shape", [(2, 5, 0), (0, 5, 7)], ids=["D0", "N0"])
@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_empty(shape, sigmoid):
    x = logits(shape)
    t = targets_for(x, sigmoid)
    sums, lse = K.dice_fwd(x, t, -100, sigmoid, False, False, False)
    assert sums.shape == (shape[0], shape[1], 5) and not sums.any()
    assert lse.shape == ((0,) if sigmoid else (shape[0], shape[2]))
    grad = K.dice_bwd(torch.ones(shape[0], shape[1], 5), x, t, lse, -100, sigmoid, False, False,
                      False)
    assert grad.shape == x.shape and grad.dtype == x.dtype


def channels_last_ncd(N, C, H, W, dtype=torch.float32):
    """(N, C, H*W) view of channels-last (N, C, H, W) logits: class stride 1, position stride C."""
    x = logits((N, C, H, W), dtype).contiguous(memory_format=torch.channels_last)
    return x.flatten(2)


@pytest.mark.parametrize("C", [3, 6, 19])
@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_channels_last(C, sigmoid):
    x = channels_last_ncd(2, C, 5, 7)
    assert x.stride() == (C * 35, 1, C)
    flags = (True, False, False) if sigmoid else (True, True, True)
    _, _, grad = check(x, targets_for(x, sigmoid), sigmoid, flags)
    assert grad.stride() == x.stride()  # a dense input's gradient has its strides


@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_non_dense_input_and_strided_targets(sigmoid):
    """Logits with a gap between positions, class-index targets every other column of a wider
    tensor, soft targets transposed in memory; the gradient of a non-dense input is contiguous."""
    big = logits((2, 5, 80))
    x = big[:, :, ::2]
    if sigmoid:
        t = soft_targets((2, 40, 5), torch.float32).transpose(1, 2)
    else:
        t = class_targets(2, 5, 80)[:, ::2]
    assert not t.is_contiguous()
    flags = (True, False, False) if sigmoid else (False, True, True)
    _, _, grad = check(x, t, sigmoid, flags)
    assert grad.is_contiguous()


def test_class_strided_nchw_dense():
    """NCHW logits keep their strides in the gradient; so does a permuted dense layout."""
    x = logits((2, 40, 5)).transpose(1, 2)  # (2, 5, 40), position stride 5, class stride 1
    _, _, grad = check(x, targets_for(x, False), False, (False, True, False))
    assert grad.stride() == x.stride()


# ------------------------------------------------------------------------------------------------
# ignore_index, targets, special values
# ------------------------------------------------------------------------------------------------


def test_ignore_index_in_range():
    """An ignore_index that is a class number: those positions are ignored, not class 1."""
    x = logits((2, 4, 50))
    t = class_targets(2, 4, 50, 0.0)
    sums, _, grad = check(x, t, False, (False, True, True), ignore_index=1)
    assert (sums[:, 1, 2] == 0).all()  # G of class 1: no position counts
    assert not grad.transpose(1, 2)[t == 1].any()


@pytest.mark.parametrize("C", [4, 19])
def test_all_ignored(C):
    x = logits((2, C, 30))
    t = torch.full((2, 30), -100, device=DEVICE)
    t[1, :7] = 2  # n = 1 has a few positions, n = 0 none
    sums, lse, grad = check(x, t, False, (True, True, True))
    assert not sums[0].any() and not grad[0].any()
    assert torch.isfinite(lse).all()
    t[1] = -100
    sums, lse, grad = check(x, t, False, (False, True, True))
    assert not sums.any() and not grad.any()


@pytest.mark.parametrize("bad", [4, -1, 2**40, -(2**40)])
@pytest.mark.parametrize("C", [4, 19])
def test_bad_target_raises_naming_it(bad, C):
    bad = C if bad == 4 else bad
    x = logits((2, C, 40))
    t = class_targets(2, C, 40)
    t[1, 37] = bad
    with pytest.raises(IndexError, match=f"target {bad} is out of bounds for {C} classes"):
        K.dice_fwd(x, t, -100, False, False, True, False)
    good = t.clone()
    good[1, 37] = 0
    _, lse = K.dice_fwd(x, good, -100, False, False, True, False)
    with pytest.raises(IndexError, match=f"target {bad} is out of bounds"):
        K.dice_bwd(torch.ones(2, C, 5), x, t, lse, -100, False, False, True, False)


def test_nan_propagates_to_its_row():
    x = logits((2, 5, 40))
    x[1, 2, 11] = float("nan")
    t = class_targets(2, 5, 40, 0.0)
    sums, lse = K.dice_fwd(x, t, -100, False, False, True, True)
    assert torch.isfinite(sums[0]).all() and torch.isfinite(lse[0]).all()
    assert torch.isnan(sums[1, :, 1]).all() and torch.isnan(lse[1, 11])
    xs = logits((2, 5, 40))
    xs[0, 3, 5] = float("nan")
    sums, _ = K.dice_fwd(xs, soft_targets((2, 5, 40), torch.float32), -100, True, False, False,
                         False)
    assert torch.isnan(sums[0, 3, :2]).all() and torch.isfinite(sums[1]).all()


@pytest.mark.parametrize("scale", [100.0, 1e4])
@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_extreme_logits(scale, sigmoid):
    x = logits((2, 5, 30), scale=scale)
    flags = (True, False, False) if sigmoid else (True, True, True)
    sums, lse, grad = check(x, targets_for(x, sigmoid), sigmoid, flags)
    assert torch.isfinite(sums).all() and torch.isfinite(grad).all()


def test_minus_inf_logits():
    """A class at -inf has p = 0 exactly; a position whose logits are all -inf but one is
    certain. Its cross-entropy terms are finite where its class is not the target (the oracle's
    (lse - z) * one_hot is inf * 0 = NaN there, so NLL is checked against log_softmax)."""
    x = logits((1, 4, 20))
    x[0, 3] = float("-inf")
    x[0, 1:, 5] = float("-inf")
    t = class_targets(1, 4, 20, 0.0)
    t[t == 3] = 0
    sums, lse, grad = check(x, t, False, (True, False, False))
    assert sums[0, 3, 0] == 0 and sums[0, 3, 1] == 0
    assert torch.isfinite(grad).all()
    sums, _ = K.dice_fwd(x, t, -100, False, False, True, False)
    nll = -torch.log_softmax(x.double(), 1).gather(1, t[:, None])[:, 0]  # (1, 20)
    want = torch.zeros(1, 4, dtype=torch.float64).index_add_(1, t[0], nll)
    assert torch.isfinite(sums).all()
    torch.testing.assert_close(sums[..., 3].double(), want, rtol=2e-5, atol=2e-5)


def test_grad_sums_g_has_no_effect_and_is_any_layout():
    x = logits((2, 5, 33))
    t = class_targets(2, 5, 33)
    _, lse = K.dice_fwd(x, t, -100, False, True, True, True)
    gs = torch.randn(2, 5, 5, dtype=torch.float64).float()
    g1 = K.dice_bwd(gs, x, t, lse, -100, False, True, True, True)
    gs2 = gs.clone()
    gs2[..., 2] = 1e6
    g2 = K.dice_bwd(gs2.transpose(0, 1).contiguous().transpose(0, 1), x, t, lse, -100, False,
                    True, True, True)
    assert torch.equal(g1, g2)


# ------------------------------------------------------------------------------------------------
# Determinism and the block layout
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
@pytest.mark.parametrize("C", [5, 19])
def test_bitwise_deterministic(sigmoid, C):
    x = logits((2, C, 101))
    t = targets_for(x, sigmoid)
    flags = (False, False, False) if sigmoid else (True, True, True)
    s1, l1 = K.dice_fwd(x, t, -100, sigmoid, *flags)
    s2, l2 = K.dice_fwd(x, t, -100, sigmoid, *flags)
    assert torch.equal(s1, s2) and torch.equal(l1, l2)
    gs = torch.randn(2, C, 5)
    g1 = K.dice_bwd(gs, x, t, l1, -100, sigmoid, *flags)
    g2 = K.dice_bwd(gs, x, t, l2, -100, sigmoid, *flags)
    assert torch.equal(g1, g2)


def test_blocks_are_fixed_by_the_shape():
    """block_positions: a multiple of the tile rows, at most what D needs, from (C, D) only."""
    for C, D in [(5, 101), (19, 23), (2, 1), (5, 1000)]:
        p = K.block_positions(C, D)
        _, _, rows, _ = K._tiles(C, D, torch.float32, False)
        assert p % rows == 0 and p <= max(rows, triton.next_power_of_2(D))
        assert p == K.block_positions(C, D)


def test_default_knobs_one_read_segmentation_shapes(monkeypatch):
    """With the real knobs: Cityscapes' 19 and 95 classes are one tile (one read of the logits,
    no lse pre-pass), 200 classes are chunks; the workspace is about 1% of bfloat16 logits."""
    monkeypatch.undo()
    for C in (19, 95, 128):
        assert K._tiles(C, 512 * 512, torch.bfloat16, False)[1] == 1
    assert K._tiles(200, 4096, torch.bfloat16, False)[1] == 2
    D = 512 * 512
    blocks = triton.cdiv(D, K.block_positions(19, D))
    assert blocks * 19 * 5 * 4 <= 0.02 * (19 * D * 2)
