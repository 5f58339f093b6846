"""``scale_grad_``: the upstream-gradient scaling every loss's backward uses (docs/KERNELS.md).

grad (N, C, D) with any strides is multiplied in place by grad_loss (N, D) broadcast over C, in
float32 (float64 for float64 grad) and rounded once; an element that is exactly 0 stays 0 whatever
the factor (ignored rows keep torch's 0 under a NaN or inf upstream gradient). An expanded
grad_loss (all strides 0) is one scalar s, read on the device by every program: s == 1 (the
``loss.backward()`` of a 'mean' or 'sum' loss) returns before grad is touched, without a host sync.

Grid-stride launch. The work is cut into tiles of BLOCK_ROWS rows x BLOCK_SIZE columns; at most
``_max_programs`` programs (a few per SM) each loop over every num_programs-th tile. So the grid
is 1-D and small whatever the shape (linear cross-entropy scales its weight gradient viewed as
(1, V*H, 1): V*H beyond 2^30 would need more than 65535 programs along a second axis), and the
no-op of s == 1 costs a few hundred programs reading one scalar, not one per tile. A scalar s on a
dense grad (any order of dimensions, no gaps) is one flat row of grad.numel() elements. Rows with
class stride 1 are walked head/body/tail (``_common``), so the body uses 128-bit accesses.
"""

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    _INTERPRETED,
    _body_chunk,
    _body_offsets,
    _check_device,
    _check_grid,
    _edge_chunk,
    _quiet,
    _row_split,
    _row_view,
    _row_walk,
    _rows_of,
    _store_rounded,
    _tiles,
    _tl_acc,
)

__all__ = ["scale_grad_"]

# At most this many programs per launch (None: 8 per SM of the device, 1024 without one). Tests set
# it to a handful so that every program walks several tiles.
MAX_PROGRAMS = None
_BLOCK_CAP = 4096  # elements of a tile: 16 per thread at 8 warps (two or four 128-bit vectors)
_MAX_WARPS = 8


@triton.jit
def _scale_chunk(ptrs, mask, f, ACC_DTYPE: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    g = tl.load(ptrs, mask=mask).to(ACC_DTYPE)
    g = tl.where(g == 0.0, 0.0, g * f)  # 0 stays 0 (a NaN f must not reach ignored rows)
    _store_rounded(ptrs, g, mask, EMULATE_RTNE)


@triton.jit
def _scale_tiles(
    grad_ptr, grad_offset, grad_stride_n, grad_stride_c, grad_stride_d,
    grad_loss_ptr, grad_loss_stride_n, grad_loss_stride_d, s,
    C, D, num_row_blocks, num_col_blocks, num_tiles,
    ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    VEC: tl.constexpr, IS_SCALAR: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    """This program's tiles: pid, pid + num_programs, ... (int64: there may be 2^31 of them)."""
    for tile in range(tl.program_id(0).to(tl.int64), num_tiles, tl.num_programs(0)):
        n, d, row_mask = _rows_of(tile // num_col_blocks, num_row_blocks, D, BLOCK_ROWS)
        k = (tile % num_col_blocks) * BLOCK_SIZE
        g_row = grad_offset + n * grad_stride_n + d * grad_stride_d
        if IS_SCALAR:
            f = s
        else:
            f = tl.load(grad_loss_ptr + n * grad_loss_stride_n + d * grad_loss_stride_d,
                        mask=row_mask, other=0.0).to(ACC_DTYPE)[:, None]
        head, body = _row_split(g_row, C, VEC)
        cols, j, col_mask, mask = _body_chunk(k, head, body, C, row_mask, BLOCK_SIZE, VEC)
        _scale_chunk(grad_ptr + _body_offsets(g_row, head, j, cols, grad_stride_c, VEC), mask, f,
                     ACC_DTYPE, EMULATE_RTNE)
        if VEC > 1:
            if k == 0:  # the row's head and tail go with its first chunk
                edge_cols, edge_mask = _edge_chunk(head, body, C, row_mask, VEC)
                _scale_chunk(grad_ptr + g_row[:, None] + edge_cols, edge_mask, f, ACC_DTYPE,
                             EMULATE_RTNE)


@triton.jit
def _scale_grad_kernel(
    grad_ptr, grad_offset, grad_stride_n, grad_stride_c, grad_stride_d,
    grad_loss_ptr, grad_loss_stride_n, grad_loss_stride_d,
    C, D, num_row_blocks, num_col_blocks, num_tiles,
    ACC_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    VEC: tl.constexpr,
    IS_SCALAR: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    if IS_SCALAR:
        s = tl.load(grad_loss_ptr).to(ACC_DTYPE)
        if s != 1.0:  # s == 1: the gradient is left untouched, decided on the device
            _scale_tiles(grad_ptr, grad_offset, grad_stride_n, grad_stride_c, grad_stride_d,
                         grad_loss_ptr, grad_loss_stride_n, grad_loss_stride_d, s,
                         C, D, num_row_blocks, num_col_blocks, num_tiles,
                         ACC_DTYPE, BLOCK_SIZE, BLOCK_ROWS, VEC, IS_SCALAR, EMULATE_RTNE)
    else:
        _scale_tiles(grad_ptr, grad_offset, grad_stride_n, grad_stride_c, grad_stride_d,
                     grad_loss_ptr, grad_loss_stride_n, grad_loss_stride_d, 1.0,
                     C, D, num_row_blocks, num_col_blocks, num_tiles,
                     ACC_DTYPE, BLOCK_SIZE, BLOCK_ROWS, VEC, IS_SCALAR, EMULATE_RTNE)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _max_programs(device):
    """The grid cap: MAX_PROGRAMS, else 8 programs per SM (each of 8 warps: a full SM's worth of
    resident threads on sm_80 / sm_90), 1024 without a CUDA device (interpreter, meta tensors)."""
    if MAX_PROGRAMS:
        return MAX_PROGRAMS
    if device.type == "cuda":
        return 8 * _sm_count(device.index if device.index is not None else
                             torch.cuda.current_device())
    return 1024


def _is_dense(t):
    """Every element of t's memory span is one of t's elements, once (any order of dimensions)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def scale_grad_(grad, grad_loss) -> None:
    """grad (N, C, D) *= grad_loss (N, D) broadcast over C, in place, multiplying in float32
    (float64 for float64 grad); an element that is 0 stays 0 whatever the factor (NaN, inf). An
    expanded grad_loss (all strides 0) is one scalar s, read on the device: s == 1 leaves grad
    untouched."""
    if grad.dim() != 3:
        raise ValueError(f"scale_grad_: grad must be (N, C, D), got shape {tuple(grad.shape)}")
    N, C, D = grad.shape
    if grad_loss.shape != (N, D):
        raise ValueError(f"scale_grad_: grad_loss must have shape {(N, D)}, "
                         f"got {tuple(grad_loss.shape)}")
    _check_device(grad, "scale_grad_")
    if grad.numel() == 0:
        return None
    is_scalar = grad_loss.numel() == 1 or all(st == 0 for st in grad_loss.stride())
    if is_scalar and _is_dense(grad):  # one flat row: (1, numel, 1)
        N, C, D = 1, grad.numel(), 1
        gs_n, gs_c, gs_d = 0, 1, 0
        grad_view_strides = (0, 0)
    else:
        gs_n, gs_d = _row_view(N, D, grad.stride(0), grad.stride(2))
        gs_c = grad.stride(1)
        grad_view_strides = (gs_n, gs_d)
    rows_n, rows_d = (1, N) if D == 1 else (N, D)
    ls_n, ls_d = _row_view(N, D, grad_loss.stride(0), grad_loss.stride(1))
    block, block_rows, num_warps = _tiles(C, rows_d, _BLOCK_CAP, _MAX_WARPS)
    num_row_blocks = triton.cdiv(rows_d, block_rows)
    num_col_blocks = triton.cdiv(C, block)
    num_tiles = rows_n * num_row_blocks * num_col_blocks
    grid = _check_grid((min(num_tiles, _max_programs(grad.device)),), "scale_grad_")
    g, g_off, vec = _row_walk(grad, C, grad_view_strides, gs_c)
    with _quiet():
        _scale_grad_kernel[grid](
            g, g_off, gs_n, gs_c, gs_d,
            grad_loss, ls_n, ls_d,
            C, rows_d, num_row_blocks, num_col_blocks, num_tiles,
            ACC_DTYPE=_tl_acc(grad.dtype),
            BLOCK_SIZE=block,
            BLOCK_ROWS=block_rows,
            VEC=vec,
            IS_SCALAR=is_scalar,
            EMULATE_RTNE=_INTERPRETED,
            num_warps=num_warps,
        )
    return None
