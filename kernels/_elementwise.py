"""The Triton elementwise skeleton: per-element losses (BCE-with-logits, sigmoid focal) over an
input of any shape and strides, with every other operand (target, weight, pos_weight) read BY
STRIDE (a broadcast operand has stride 0 where it is broadcast: never materialised).

Host side (``ew_layout``): the input's dimensions of size 1 are dropped and neighbours that every
operand walks as one are merged (a contiguous input with a contiguous target becomes one flat
dimension), then padded to 4 dimensions. An operand whose strides are the contiguous strides of
that shape is FLAT: its offsets are the flat element index itself (128-bit loads on the GPU);
otherwise the kernel splits the index into 4 coordinates once per tile (64-bit) and each operand
takes the dot product with its strides. More than 4 dimensions left after merging (rare: a
5-d input whose operands have unrelated strides) are made contiguous first (``.contiguous()``,
a broadcast operand expanded: the one case where one is materialised).

Kernel side: a capped 1-D grid (``max_programs``), each program looping over every
num_programs-th tile of BLOCK_SIZE consecutive elements; loss ('none': contiguous, input's
dtype) and gradient (contiguous, input's dtype, times the 'mean' factor) stored at the flat index;
'mean'/'sum' accumulate a per-program partial sum (one float32 vector, summed once at the end)
into ``partial[pid]``, and the launcher adds the partials in program order (deterministic for a
given grid). ``_logistic`` gives the pieces of a logit both losses use (see
csrc/include/fusedloss/logistic.h: everything from e = exp(-|x|), never overflowing).
"""

import functools

import torch
import triton
import triton.language as tl

from ._common import _INTERPRETED, _check_grid

# At most this many programs per launch (None: 8 per SM, 1024 without a device). Tests set it to a
# handful so that every program walks several tiles.
MAX_PROGRAMS = None
GPU_BLOCK_SIZE = 1024  # 8 elements per thread at 4 warps: 2048 took 255 registers (fp64 spilled)
INTERPRETER_BLOCK_SIZE = 1024
EW_DIMS = 4


@triton.jit
def _ew_index(idx, size1, size2, size3, NEED_INDEX: tl.constexpr):
    """The 4 coordinates of flat indices idx (int64) in (size0, size1, size2, size3)."""
    if NEED_INDEX:
        i3 = idx % size3
        r = idx // size3
        i2 = r % size2
        r = r // size2
        i1 = r % size1
        i0 = r // size1
    else:
        i0, i1, i2, i3 = idx, idx, idx, idx
    return i0, i1, i2, i3


@triton.jit
def _ew_load(ptr, idx, i0, i1, i2, i3, s0, s1, s2, s3, mask, FLAT: tl.constexpr,
             ACC_DTYPE: tl.constexpr):
    """One operand's values at flat indices idx, by its strides (FLAT: at idx itself)."""
    if FLAT:
        off = idx
    else:
        off = i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3
    return tl.load(ptr + off, mask=mask, other=0.0).to(ACC_DTYPE)


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1], accurate for tiny e without libdevice (the interpreter has
    none): log(u) * e / (u - 1) with u = 1 + e rounded, e itself where u rounds to 1."""
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))


@triton.jit
def _max0(v):
    """max(v, 0) with NaN propagating."""
    return tl.where((v > 0.0) | (v != v), v, 0.0)


@triton.jit
def _logistic(x):
    """(|x|, e = exp(-|x|), log1p(e), r = 1/(1+e), sigmoid(x), sigmoid(-x), softplus(x),
    softplus(-x)), as logistic.h's Logistic."""
    ax = tl.abs(x)
    e = tl.exp(-ax)
    l1p = _log1p_unit(e)
    r = 1.0 / (1.0 + e)
    er = e * r
    pos = x >= 0.0
    sig_pos = tl.where(pos, r, er)
    sig_neg = tl.where(pos, er, r)
    sp_pos = _max0(x) + l1p
    sp_neg = _max0(-x) + l1p
    return ax, e, l1p, r, sig_pos, sig_neg, sp_pos, sp_neg


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_programs(device):
    """The grid cap: MAX_PROGRAMS, else 8 programs per SM, 1024 without a CUDA device."""
    if MAX_PROGRAMS:
        return MAX_PROGRAMS
    if device.type == "cuda":
        return 8 * _sm_count(device.index if device.index is not None else
                             torch.cuda.current_device())
    return 1024


def block_size():
    return INTERPRETER_BLOCK_SIZE if _INTERPRETED else GPU_BLOCK_SIZE


def _coalesce(shape, strides):
    """(sizes, [strides per operand]) with size-1 dims dropped and mergeable neighbours merged."""
    sizes, out = [], [[] for _ in strides]
    for k, n in enumerate(shape):
        if n == 1:
            continue
        if sizes and all(o[-1] == st[k] * n for o, st in zip(out, strides)):
            sizes[-1] *= n
            for o, st in zip(out, strides):
                o[-1] = st[k]
        else:
            sizes.append(n)
            for o, st in zip(out, strides):
                o.append(st[k])
    return sizes, out


def _flat(sizes, strides):
    expected = 1
    for n, st in zip(reversed(sizes), reversed(strides)):
        if n == 1:
            continue
        if st != expected:
            return False
        expected *= n
    return True


def ew_layout(input, operands):
    """The kernel's view of ``input`` and ``operands`` (each None or broadcastable to input):
    (tensors: input first, then each operand expanded to input's shape (a view) or None;
    sizes (4,); strides (4,) per tensor (zeros for None); FLAT per tensor; whether the kernel
    needs the coordinates)."""
    shape = tuple(input.shape)
    tensors = [input] + [None if o is None else o.expand(shape) for o in operands]
    sizes, strides = _coalesce(shape, [t.stride() for t in tensors if t is not None])
    if len(sizes) > EW_DIMS:
        tensors = [None if t is None else t.contiguous() for t in tensors]
        sizes, strides = _coalesce(shape, [t.stride() for t in tensors if t is not None])
    pad = EW_DIMS - len(sizes)
    sizes = [1] * pad + sizes
    it = iter([[0] * pad + st for st in strides])
    out_strides = [[0] * EW_DIMS if t is None else next(it) for t in tensors]
    flat = [t is None or _flat(sizes, st) for t, st in zip(tensors, out_strides)]
    return tensors, sizes, out_strides, flat, not all(flat)


def ew_outputs(input, reduction, compute_grad, grid):
    """(loss or None, grad, partial or None): 'none' loss and the gradient contiguous in input's
    dtype (the gradient an empty tensor without compute_grad); the per-program partial sums in
    the accumulation dtype for 'mean' / 'sum'."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    loss = torch.empty(input.shape, dtype=input.dtype, device=input.device) \
        if reduction == 0 else None
    grad = torch.empty(input.shape if compute_grad else (0,), dtype=input.dtype,
                       device=input.device)
    partial = torch.empty(grid[0], dtype=acc, device=input.device) if reduction else None
    return loss, grad, partial


def ew_grid(numel, device, op):
    """(grid, num_tiles, BLOCK_SIZE) of a launch over numel elements."""
    block = block_size()
    num_tiles = triton.cdiv(numel, block)
    return _check_grid((max(1, min(num_tiles, max_programs(device))),), op), num_tiles, block


def ew_result(input, loss, grad, partial, loss_scale):
    """The op's (loss, grad): 'mean' / 'sum' add the partials in program order (float64), times
    loss_scale, as a 0-d tensor of the accumulation dtype."""
    if partial is not None:
        acc = partial.dtype
        loss = (partial.sum(dtype=torch.float64) * loss_scale).to(acc)
    return loss, grad
