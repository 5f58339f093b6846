"""Triton softmax focal loss kernel and launcher (the contract is docs/KERNELS.md).

``softmax_focal_fwd`` takes the arguments of the ``torch.ops.fusedloss_C.softmax_focal_fwd`` schema
(csrc/registration.cpp); the per-row math mirrors csrc/include/fusedloss/softmax_focal.h.

The softmax-row skeleton (_softmax_row.py) plus the focal epilogue. Per row (one (n, d) position
of the (N, C, D) input, any strides), with y the validated class index and w_y its weight:
d = lse - x_y = (m - x_y) + log s, em1 = expm1(-d) = p_y - 1, q = -em1 (no cancellation when p_y
is near 1), loss = w_y q^gamma d, and the gradient A (p_j - [j = y]) with
A = w_y q^gamma (1 + gamma p_y d / q) (d / q -> 1 as q -> 0, taken as 1 at q == 0 so that a
gamma < 1 gives 0, never inf * 0), the target column A * em1. gamma = 0 is cross-entropy.

A program owns one tile of BLOCK_ROWS rows inside one block of the reduced output's fixed blocks
of rows (row_blocks.h: K rows of one n along d, or along n when D == 1; ``loss_block_rows`` is
their Python copy; K is a multiple of BLOCK_ROWS, both powers of two), one tile per program as in
cross-entropy (a loop over a block's tiles kept state live across the target assertion's call:
spills). With REDUCE it stores its tile's sum of the rows' losses, and the launcher adds each
block's tiles in order (a small (blocks, K / BLOCK_ROWS) tensor: a 'mean' or 'sum' keeps no
per-row tensor; the same blocks on every backend, the sum deterministic); else every row's loss.
Target values are validated before they are used as an address (tl.device_assert on the GPU, the
error buffer under the interpreter).
"""

import torch
import triton
import triton.language as tl

from ._common import (
    _INTERPRETED,
    _acc_dtype,
    _aligned_like,
    _check_device,
    _check_grid,
    _error_buffer,
    _expm1,
    _expm1_terms,
    _quiet,
    _raise_if_error,
    _rebase,
    _row_view,
    _row_walk,
    _tiles,
    _tl_acc,
)
from ._softmax_row import (
    _class_target,
    _softmax_row_grad,
    _softmax_row_stats,
    _target_logit,
    loss_block_rows,
)

__all__ = ["softmax_focal_fwd"]


@triton.jit
def _focal_pow(q, gamma, GAMMA_INT: tl.constexpr):
    """q^gamma for q in [0, 1]: GAMMA_INT 1..4 by multiplication, -1 any other gamma > 0
    (0^gamma = 0)."""
    if GAMMA_INT == 1:
        r = q
    elif GAMMA_INT == 2:
        r = q * q
    elif GAMMA_INT == 3:
        r = q * q * q
    elif GAMMA_INT == 4:
        r = (q * q) * (q * q)
    else:
        r = tl.where(q > 0.0, tl.exp(gamma * tl.log(tl.where(q > 0.0, q, 1.0))), 0.0)
    return r


@triton.jit(debug=True)  # debug=True: tl.device_assert is compiled in (it is dropped otherwise)
def _softmax_focal_fwd_kernel(
    x_ptr, x_offset, x_stride_n, x_stride_c, x_stride_d,
    target_ptr, target_stride_n, target_stride_d,
    weight_ptr,
    loss_scale_ptr,
    loss_ptr,
    grad_ptr, grad_offset, grad_stride_n, grad_stride_c, grad_stride_d,
    err_ptr,
    C, D, blocks_per_n, tiles_per_block, block_rows,
    ignore_index,
    gamma: tl.float64,
    ACC_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    VEC: tl.constexpr,
    G_VEC: tl.constexpr,
    EXPM1_TERMS: tl.constexpr,
    GAMMA_INT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    REDUCE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    REPORT_ERRORS: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    # This program's tile: tile t of block b, one n, BLOCK_ROWS consecutive d. Offsets are int64.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // tiles_per_block
    n = b // blocks_per_n
    d = (b % blocks_per_n) * block_rows + (pid % tiles_per_block) * BLOCK_ROWS + \
        tl.arange(0, BLOCK_ROWS)
    row_mask = d < D
    # Targets first (see _class_target: nothing live across the assertion's call).
    y, ignored, y_ok = _class_target(target_ptr, n * target_stride_n + d * target_stride_d,
                                     row_mask, ignore_index, C, err_ptr, REPORT_ERRORS)
    g_ = tl.full([], gamma, ACC_DTYPE)
    if HAS_SCALE:
        scale = tl.load(loss_scale_ptr).to(ACC_DTYPE)
    else:
        scale = tl.full([], 1.0, ACC_DTYPE)
    x_row = x_offset + n * x_stride_n + d * x_stride_d
    x_y = _target_logit(x_ptr, x_row, x_stride_c, y, y_ok, 0.0, ACC_DTYPE, False,
                        EXPM1_TERMS)
    if HAS_WEIGHT:  # only after the check: weight[y] of a valid y
        w_y = tl.load(weight_ptr + tl.where(y_ok, y, 0), mask=y_ok, other=0.0).to(ACC_DTYPE)
    else:
        w_y = tl.full([BLOCK_ROWS], 1.0, ACC_DTYPE)

    # ---- pass 1: the skeleton's row statistics (no column weights) ----
    m, s, _, _ = _softmax_row_stats(
        x_ptr, x_row, x_stride_c, C, row_mask, 0.0,
        x_ptr, x_ptr, x_row, x_stride_c, 0.0, 0.0,
        ACC_DTYPE, BLOCK_SIZE, VEC, 1, EXPM1_TERMS, False, False, False, False, False)
    log_s = tl.log(s)

    # ---- the focal epilogue (softmax_focal.h: focal_row) ----
    dist = (m - x_y) + log_s  # lse - x_y = -log p_y, without the rounding of lse
    em1 = _expm1(-dist, EXPM1_TERMS)  # p_y - 1
    if GAMMA_INT == 0:
        A = w_y
        loss = w_y * dist
    else:
        q = -em1
        qg = _focal_pow(q, g_, GAMMA_INT)
        ratio = tl.where(q > 0.0, dist / tl.where(q > 0.0, q, 1.0), 1.0)
        A = w_y * qg * (1.0 + g_ * (1.0 + em1) * ratio)
        loss = w_y * qg * dist
    loss = tl.where(ignored, 0.0, loss) * scale  # ignored: 0 * scale (NaN if scale is inf)
    if REDUCE:
        tl.store(loss_ptr + pid, tl.sum(tl.where(row_mask, loss, 0.0), axis=0))
    else:
        tl.store(loss_ptr + n * D + d, loss, mask=row_mask)

    # ---- pass 2: the skeleton's gradient loop ----
    if COMPUTE_GRAD:
        g_row = grad_offset + n * grad_stride_n + d * grad_stride_d
        _softmax_row_grad(
            x_ptr, x_row, x_stride_c, grad_ptr, g_row, grad_stride_c, C, row_mask, 0.0,
            m, log_s, A, 0.0, y, A * em1, ignored == 0, scale,
            x_ptr, x_ptr, x_row, x_stride_c, 0.0, 0.0,
            ACC_DTYPE, BLOCK_SIZE, VEC, 1, G_VEC, EXPM1_TERMS, False,
            False, False, False, False, True, True, EMULATE_RTNE)


def _bad_target_error(target, ignore_index, C):
    bad = target[(target != ignore_index) & ((target < 0) | (target >= C))]
    value = f" {int(bad.flatten()[0])}" if bad.numel() else ""
    return IndexError(f"softmax_focal_loss: target{value} is out of bounds for {C} classes "
                      f"(expected 0 <= target < {C}, or target == ignore_index = {ignore_index})")


def _gamma_int(gamma):
    """GAMMA_INT: 0..4 for those exact gammas (no pow), else -1."""
    return int(gamma) if gamma in (0.0, 1.0, 2.0, 3.0, 4.0) else -1


def softmax_focal_fwd(input, target, weight, loss_scale, gamma: float, ignore_index: int,
                      reduce: bool, compute_grad: bool):
    """(loss, grad): loss (N, D), or with reduce the block sums (loss_blocks(N, C, D),), in the
    accumulation dtype, times loss_scale; grad d(sum of loss)/d(input) as a new contiguous
    (N, C, D) tensor of input's dtype with compute_grad (else an empty tensor)."""
    if input.dim() != 3:
        raise ValueError(f"softmax_focal_loss: input must be (N, C, D), got shape "
                         f"{tuple(input.shape)}")
    N, C, D = input.shape
    if target.dtype != torch.int64 or target.shape != (N, D):
        raise ValueError(f"softmax_focal_loss: target must be int64 of shape {(N, D)}, got "
                         f"{target.dtype} {tuple(target.shape)}")
    if weight is not None and weight.shape != (C,):
        raise ValueError(f"softmax_focal_loss: weight must have shape {(C,)}, got "
                         f"{tuple(weight.shape)}")
    if not gamma >= 0.0:
        raise ValueError(f"softmax_focal_loss: gamma must be >= 0, got {gamma}")
    _check_device(input, "softmax_focal_loss")

    acc = _acc_dtype(input.dtype)
    rows_n, rows_d = (1, N) if D == 1 else (N, D)
    k = loss_block_rows(C, D)
    blocks_per_n = triton.cdiv(rows_d, k)
    loss = torch.empty((rows_n * blocks_per_n,) if reduce else (N, D), dtype=acc,
                       device=input.device)
    grad = torch.empty(input.shape if compute_grad else (0,), dtype=input.dtype,
                       device=input.device)
    if N * D == 0:
        return loss, grad

    xs = _row_view(N, D, input.stride(0), input.stride(2))
    x, x_off, vec = _row_walk(input, C, xs, input.stride(1))
    block, block_rows, num_warps = _tiles(C, rows_d, 4096 if input.dtype == torch.float64
                                          else 8192)
    # Half cross-entropy's row tile (the focal epilogue's values are live through pass 2: the
    # full tile spilled a few bytes on sm_90 for bfloat16 segmentation; .ci/check_triton.py).
    block_rows = min(max(1, block_rows // 2), k)
    tiles_per_block = k // block_rows
    if blocks_per_n == 1:  # one block per n, of rows_d <= k rows: launch only its real tiles
        tiles_per_block = min(tiles_per_block, triton.cdiv(rows_d, block_rows))
    grid = _check_grid((rows_n * blocks_per_n * tiles_per_block,), "softmax_focal_loss")
    # REDUCE: one sum per tile, added per block below (in tile order: deterministic).
    out = torch.empty((grid[0],), dtype=acc, device=input.device) if reduce else loss
    ts = _row_view(N, D, target.stride(0), target.stride(1))
    if compute_grad:
        gs = _row_view(N, D, grad.stride(0), grad.stride(2))
        g, g_off = _rebase(grad, vec)
        g_vec = vec if grad.stride(1) == 1 and _aligned_like(g_off, gs, x_off, xs, vec) else 1
        gs_c = grad.stride(1)
    else:
        g, g_off, gs, gs_c, g_vec = loss, 0, (0, 0), 0, 1  # unused pointer
    if weight is not None:
        weight = weight.contiguous()
    report = _INTERPRETED
    err = _error_buffer(input.device, report)
    with _quiet():
        _softmax_focal_fwd_kernel[grid](
            x, x_off, xs[0], input.stride(1), xs[1],
            target, ts[0], ts[1],
            weight,
            loss_scale,
            out,
            g, g_off, gs[0], gs_c, gs[1],
            err,
            C, rows_d, blocks_per_n, tiles_per_block, k,
            int(ignore_index),
            float(gamma),
            ACC_DTYPE=_tl_acc(input.dtype),
            BLOCK_SIZE=block,
            BLOCK_ROWS=block_rows,
            VEC=vec,
            G_VEC=g_vec,
            EXPM1_TERMS=_expm1_terms(input.dtype),
            GAMMA_INT=_gamma_int(float(gamma)),
            HAS_WEIGHT=weight is not None,
            HAS_SCALE=loss_scale is not None,
            REDUCE=bool(reduce),
            COMPUTE_GRAD=bool(compute_grad),
            REPORT_ERRORS=report,
            EMULATE_RTNE=_INTERPRETED,
            num_warps=num_warps,
            sanitize_overflow=False,
        )
    _raise_if_error(err, lambda: _bad_target_error(target, ignore_index, C))
    if reduce:
        torch.sum(out.view(-1, tiles_per_block), dim=1, out=loss)
    return loss, grad
