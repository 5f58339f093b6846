"""The Triton scale_grad_ (kernels/scale_grad.py): a capped 1-D grid-stride launch whatever the
shape, the scalar-1 no-op decided on the device, zeros kept, per-row factors, any strides. Without
CUDA the kernel runs under triton's interpreter on CPU tensors (TRITON_INTERPRET is set before the
kernels are imported)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from fusedloss.kernels import _common  # noqa: E402
from fusedloss.kernels import scale_grad as S  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class LaunchSpy:
    """Stands in for the kernel: records each launch's grid and kwargs, then launches (or not)."""

    def __init__(self, kernel, run=True):
        self.kernel, self.run, self.launches = kernel, run, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((tuple(grid), kwargs))
            if self.run:
                return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def spy(monkeypatch):
    s = LaunchSpy(S._scale_grad_kernel)
    monkeypatch.setattr(S, "_scale_grad_kernel", s)
    return s


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """64-element tiles and 3 programs: every program walks many tiles."""
    monkeypatch.setattr(_common, "MAX_BLOCK_SIZE", 64)
    monkeypatch.setattr(S, "MAX_PROGRAMS", 3)


def expected(g, factor):
    """The contract: float32 (float64) multiply rounded once, an exact 0 stays 0."""
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    prod = (g.to(acc) * factor).to(g.dtype)
    return torch.where(g == 0, torch.zeros_like(g), prod)


def rand(shape, dtype, seed=0, zeros=True):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if zeros:
        g.view(-1)[::7] = 0.0  # ignored rows' exact zeros
    return g.to(dtype).to(DEVICE)


def bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16, torch.float64: torch.int64}[t.dtype]).clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_flat_view_grid_stride(spy, dtype, offset):
    """Linear CE's grad_weight seen as (1, V*H, 1): one flat row, a few programs, many tiles; the
    start is moved off the 16-byte boundary by `offset` elements (head / body / tail)."""
    VH = 3 * 4096 + 37
    base = rand((VH + offset + 5,), dtype)
    g = base[offset:offset + VH].view(1, VH, 1)
    before = base.clone()
    s = torch.tensor(2.5, device=DEVICE).expand(1, 1)
    S.scale_grad_(g, s)
    assert torch.equal(g, expected(before[offset:offset + VH].view(1, VH, 1), 2.5))
    assert torch.equal(base[:offset], before[:offset]) and torch.equal(
        base[offset + VH:], before[offset + VH:])  # nothing outside the view is written
    (grid, kw), = spy.launches
    assert grid == (3,), "capped 1-D grid"
    assert kw["IS_SCALAR"] and kw["BLOCK_SIZE"] == 64
    if offset % (16 // g.element_size()):
        assert kw["VEC"] == 16 // g.element_size(), "misaligned: the head/body/tail walk"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "odd_rows", "transposed", "seg", "sliced_d"])
def test_per_row_any_strides(spy, dtype, layout):
    N, C, D = 5, 203, 1
    if layout == "contiguous":
        g = rand((N, C, 1), dtype)
    elif layout == "odd_rows":  # rows of an odd-width buffer, misaligned start
        g = rand((N, C + 6), dtype)[:, 1:C + 1].unsqueeze(-1)
    elif layout == "transposed":  # class stride N
        g = rand((C, N), dtype).t().unsqueeze(-1)
    elif layout == "seg":  # (N, C, H*W)
        N, C, D = 2, 19, 37
        g = rand((N, C, D), dtype)
    else:  # d strided
        N, C, D = 3, 70, 5
        g = rand((N, C, 2 * D), dtype)[:, :, ::2]
    gl = torch.rand(N, D, generator=torch.Generator().manual_seed(1)).to(DEVICE) + 0.5
    gl_t = gl.t().contiguous().t()  # non-contiguous upstream gradient too
    want = expected(g, gl[:, None, :])
    S.scale_grad_(g, gl_t)
    assert torch.equal(g, want)
    (grid, kw), = spy.launches
    assert len(grid) == 1 and grid[0] <= 3 and not kw["IS_SCALAR"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape_of", ["flat", "odd_rows", "strided"])
def test_scalar_one_leaves_memory_untouched(spy, dtype, shape_of):
    g = {"flat": lambda: rand((4, 173, 1), dtype),
         "odd_rows": lambda: rand((4, 180), dtype)[:, 3:176].unsqueeze(-1),
         "strided": lambda: rand((4, 173, 6), dtype)[:, :, 1::2]}[shape_of]()
    if dtype == torch.float32:
        b = g.view(torch.int32) if g.is_contiguous() else None
        if b is not None:
            b.view(-1)[1] = 0x7F800001  # a signalling NaN: any multiply would quiet it
    before = bits(g)
    S.scale_grad_(g, torch.ones((), device=DEVICE).expand(g.shape[0], g.shape[2]))
    assert torch.equal(bits(g), before)
    assert len(spy.launches) == 1  # the 1 is read on the device, not on the host


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 0.0])
@pytest.mark.parametrize("per_row", [False, True])
def test_nonfinite_and_zero_factor_keep_zeros(value, per_row):
    g0 = rand((3, 301, 1), torch.float32, zeros=True)
    g = g0.clone()
    if per_row:
        gl = torch.tensor([[1.5], [value], [2.0]], device=DEVICE)
        factor = gl[:, None, :]
    else:
        gl = torch.tensor(value, device=DEVICE).expand(3, 1)
        factor = value
    S.scale_grad_(g, gl)
    want = expected(g0, factor)
    assert torch.equal(g.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(want))
    assert (g[g0 == 0] == 0).all()


def test_grid_for_huge_views_is_capped(monkeypatch):
    """The shapes that crashed: (1, V*H, 1) with V*H > 2^30 and rows N*V = 2^34, on meta tensors
    (nothing runs): one axis, at most the cap of programs, whatever the size."""
    monkeypatch.setattr(S, "MAX_PROGRAMS", None)
    monkeypatch.setattr(_common, "MAX_BLOCK_SIZE", None)
    spy = LaunchSpy(S._scale_grad_kernel, run=False)
    monkeypatch.setattr(S, "_scale_grad_kernel", spy)
    one = torch.empty((), device="meta").expand(1, 1)
    for V, H in ((152064, 8192), (256000, 4608), (128256, 16384), (2**20, 2**13)):
        S.scale_grad_(torch.empty(1, V * H, 1, dtype=torch.bfloat16, device="meta"), one)
    n = 2**34 // 50257
    S.scale_grad_(torch.empty(n, 50257, 1, dtype=torch.bfloat16, device="meta"),
                  torch.empty(n, 1, device="meta"))
    for grid, _ in spy.launches:
        assert len(grid) == 1 and 1 <= grid[0] <= 1024


def test_check_grid_names_the_limit():
    assert _common._check_grid((2**31 - 1,), "op") == (2**31 - 1,)
    with pytest.raises(RuntimeError, match="exceeds CUDA's limit of 65535 programs along axis y"):
        _common._check_grid((4, 65536), "op")


def test_shape_errors():
    with pytest.raises(ValueError, match="grad must be"):
        S.scale_grad_(torch.zeros(3, 4, device=DEVICE), torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="grad_loss must have shape"):
        S.scale_grad_(torch.zeros(3, 4, 1, device=DEVICE), torch.ones(4, 1, device=DEVICE))
