"""Triton cross-entropy kernels and launchers (the contract is docs/KERNELS.md).

``cross_entropy_fwd`` and ``cross_entropy_fwd_inplace`` take the arguments of the
``torch.ops.fusedloss_C`` schemas in csrc/registration.cpp; the per-row math mirrors
csrc/include/fusedloss/cross_entropy.h. The upstream-gradient op ``scale_grad_`` is loss-agnostic:
scale_grad.py.

Design: the softmax-row skeleton (_softmax_row.py) plus the cross-entropy epilogue. The input is
(N, C, D) with any strides; a row is one (n, d) position. A program owns a tile of BLOCK_ROWS rows
of one n and walks the classes in BLOCK_SIZE chunks, so a row never has to fit in one block:

* the target (class-index targets: one load per row, validated first, then one gathered load of
  the target logit and of its weight);
* pass 1 (``_softmax_row_stats``): online max / sum of exp and, for label smoothing (column
  weights v = w) or probability targets (v = w ((1 - ls) t + ls / C)), omega = sum_c v_c and
  a = sum_c v_c (m - xs_c), non-negative terms, so sum_c v_c (lse - xs_c) = a + omega log(s) does
  not cancel (cross_entropy.h: dev_rebase);
* the epilogue: loss, lse and the row coefficients of the gradient g_c = A p_c - cv v_c (index
  targets: A = (1 - ls) w_y + ls/C sum w + 2 z w_y lse, cv = ls / C, and the target column
  A (p_y - 1) + (A - (1 - ls) w_y) - ls/C w_y with p_y - 1 = expm1(xs_y - lse); probability
  targets: A = omega + 2 z lse, cv = 1);
* pass 2 (``_softmax_row_grad``, COMPUTE_GRAD): reload the chunks and write the gradient through
  the gradient's strides. In place, those are the input's own strides; every element is read
  before it is overwritten.

Large vocabularies get BLOCK_ROWS = 1 and BLOCK_SIZE up to 16384 (the Liger / quack layout); small
class counts get many rows per program (segmentation, classification heads). When D == 1 the rows
of the tile run along n (the input is viewed as (1, C, N)); when D > 1 they run along d, which is
the contiguous axis of (N, C, H*W) segmentation logits, so loads coalesce in both layouts. Row
offsets are int64; class offsets are widened to int64 before the stride multiply.

Feature switches are constexpr flags so the plain case compiles to the lean kernel. All math is in
float32 (float64 for float64 input). lse = m + log(s) is stored, but losses and probabilities are
evaluated as (x - m) - log(s), like torch's log_softmax: going through the rounded lse would cost an
absolute error of ulp(lse) (2e-6 at lse ~ 20 in float32), all of 1 - p_y for a confident
prediction. NaN propagates through the exp-sum (tl.max drops NaN, both compiled and interpreted).

GPU code generation, checked for sm_80 and sm_90 by .ci/check_triton.py at the launchers' real
configurations: no register spills (``_block_cap`` picks the block per feature set: 16384 classes
and 32 warps, 8192 and 16 warps for the heaviest sets, 4096 for float64), 128-bit loads and stores
of every row whose class axis is contiguous: rows that triton proves 16-byte aligned (pointer, row
strides and C multiples of 16) as they are; any other (C = 50257, a view with a storage offset)
through the head/body/tail walk of _common.py (VEC > 1), the target and gradient rows hinted too
when they are aligned like the input's (T_VEC, G_VEC).

Target values are checked in the kernel: on the GPU with tl.device_assert (the kernel is compiled
with debug=True so the assertion is live, as torch's nll_loss asserts); under the interpreter, where
tl.device_assert is a no-op in triton 3.9, the kernel records the bad value in a small error buffer
and the launcher raises IndexError. A bad target is never used as an address.
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
    _row_tile,
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
)

__all__ = ["cross_entropy_fwd", "cross_entropy_fwd_inplace"]


@triton.jit(debug=True)  # debug=True: tl.device_assert is compiled in (it is dropped otherwise)
def _cross_entropy_fwd_kernel(
    x_ptr, x_offset, x_stride_n, x_stride_c, x_stride_d,
    target_ptr, target_offset, target_stride_n, target_stride_c, target_stride_d,
    weight_ptr,
    loss_scale_ptr,
    loss_ptr, lse_ptr,
    grad_ptr, grad_offset, grad_stride_n, grad_stride_c, grad_stride_d,
    err_ptr,
    C, D, num_row_blocks,
    ignore_index,
    label_smoothing: tl.float64, z_loss: tl.float64, softcap: tl.float64,
    ACC_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    VEC: tl.constexpr,
    T_VEC: tl.constexpr,
    G_VEC: tl.constexpr,
    EXPM1_TERMS: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    REPORT_ERRORS: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    # Rows of this program: one n, BLOCK_ROWS consecutive d. Offsets are int64 from here on.
    n, d, row_mask = _row_tile(num_row_blocks, D, BLOCK_ROWS)
    if not PROB_TARGET:  # class indices, validated first (see _class_target)
        y, ignored, y_ok = _class_target(target_ptr, n * target_stride_n + d * target_stride_d,
                                         row_mask, ignore_index, C, err_ptr, REPORT_ERRORS)
    rows = n * D + d  # index into the contiguous (N, D) loss / lse
    x_row = x_offset + n * x_stride_n + d * x_stride_d

    one = tl.full([], 1.0, ACC_DTYPE)
    ls = tl.full([], label_smoothing, ACC_DTYPE)
    smooth = ls / C
    if HAS_Z_LOSS:
        z = tl.full([], z_loss, ACC_DTYPE)
    if HAS_SCALE:
        scale = tl.load(loss_scale_ptr).to(ACC_DTYPE)
    else:
        scale = one

    if PROB_TARGET:
        t_row = target_offset + n * target_stride_n + d * target_stride_d
        y = d * 0 - 1  # no target column
        keep = row_mask
    else:
        t_row = x_row  # unused
        keep = ignored == 0
        x_y = _target_logit(x_ptr, x_row, x_stride_c, y, y_ok, softcap, ACC_DTYPE, HAS_SOFTCAP,
                            EXPM1_TERMS)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + tl.where(y_ok, y, 0), mask=y_ok, other=0.0).to(ACC_DTYPE)
        else:
            w_y = tl.full([BLOCK_ROWS], 1.0, ACC_DTYPE)

    # ---- pass 1: the skeleton's row statistics. Column weights v: probability targets
    # v = w ((1 - ls) t + ls / C); label smoothing v = w (omega = sum w, a = sum w (m - xs)).
    m, s, omega, a = _softmax_row_stats(
        x_ptr, x_row, x_stride_c, C, row_mask, softcap,
        weight_ptr, target_ptr, t_row, target_stride_c, one - ls, smooth,
        ACC_DTYPE, BLOCK_SIZE, VEC, T_VEC, EXPM1_TERMS, HAS_SOFTCAP,
        PROB_TARGET or HAS_SMOOTHING, HAS_WEIGHT, PROB_TARGET, PROB_TARGET and HAS_SMOOTHING)
    # lse = m + log(s) is only stored; the math below uses (x - m) - log(s), which keeps the
    # accuracy of torch's log_softmax instead of an absolute error of ulp(lse) (lse ~ 20 in float32:
    # 2e-6, all of 1 - p_y for a confident prediction).
    log_s = tl.log(s)
    lse = m + log_s

    # ---- the epilogue: row coefficients (cross_entropy.h: index_row_diff / prob_row) ----------
    if PROB_TARGET:
        A = omega
        loss = a + omega * log_s
        if HAS_Z_LOSS:
            A += 2.0 * z * lse
            loss += z * lse * lse
        loss = loss * scale
        cv = one
        g_y = A  # unused
    else:
        if HAS_SMOOTHING:
            W = omega  # sum_c w_c (C without weight)
            tgt = (1.0 - ls) * w_y
            A = tgt + smooth * W  # W = inf (an inf class weight): A = inf
        else:
            tgt = w_y
            A = tgt
        loss = tgt * ((m - x_y) + log_s)
        if HAS_Z_LOSS:
            A += 2.0 * z * w_y * lse
            loss += z * w_y * lse * lse
        if HAS_SMOOTHING:
            sm = a + W * log_s  # sum_c w_c (lse - xs_c)
            if HAS_WEIGHT:  # torch: inf * (lse - xs_c) > 0; here inf * 0 where that class is max
                sm = tl.where(W == float("inf"), float("inf"), sm)
            loss += smooth * sm
        loss = tl.where(ignored, 0.0, loss) * scale  # ignored: 0 * scale (NaN if scale is inf)
        cv = smooth
        # Target column: A (p_y - 1) + (A - target) with p_y - 1 = expm1(xs_y - lse): no
        # cancellation when p_y is close to 1.
        em1 = _expm1((x_y - m) - log_s, EXPM1_TERMS)
        g_y = A * em1 + (A - tgt)
        if HAS_SMOOTHING:
            g_y -= smooth * w_y
            # Infinite A: inf - inf above; A p_y - target is inf like torch's.
            g_y = tl.where(tl.abs(A) == float("inf"), A * (em1 + 1.0) - (tgt + smooth * w_y),
                           g_y)
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)

    # ---- pass 2: the skeleton's gradient loop ---------------------------------------------------
    if COMPUTE_GRAD:
        g_row = grad_offset + n * grad_stride_n + d * grad_stride_d
        _softmax_row_grad(
            x_ptr, x_row, x_stride_c, grad_ptr, g_row, grad_stride_c, C, row_mask, softcap,
            m, log_s, A, cv, y, g_y, keep, scale,
            weight_ptr, target_ptr, t_row, target_stride_c, one - ls, smooth,
            ACC_DTYPE, BLOCK_SIZE, VEC, T_VEC, G_VEC, EXPM1_TERMS, HAS_SOFTCAP,
            PROB_TARGET or HAS_SMOOTHING, HAS_WEIGHT, PROB_TARGET, PROB_TARGET and HAS_SMOOTHING,
            not PROB_TARGET, not PROB_TARGET, EMULATE_RTNE)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _bad_target_error(target, ignore_index, C):
    bad = target[(target != ignore_index) & ((target < 0) | (target >= C))]
    value = f" {int(bad.flatten()[0])}" if bad.numel() else ""
    return IndexError(f"cross_entropy: target{value} is out of bounds for {C} classes "
                      f"(expected 0 <= target < {C}, or target == ignore_index = {ignore_index})")


def _block_cap(dtype, vec, prob, weight, smoothing, softcap):
    """The largest BLOCK_SIZE of a feature set that compiles without register spills for sm_80
    and sm_90 (num_warps = BLOCK_SIZE / 512: 32 warps leave 64 registers a thread, 16 warps 128;
    .ci/check_triton.py fails on any spill): 16384 for most; 8192 when softcap comes with weighted
    sums, and for probability targets with a class weight on the head/body/tail walk (vec > 1);
    4096 for float64. (ptxas spills a few bytes at 8192 where 16384 is clean, and the other way
    round: the table of .ci/check_triton.py is what decides.)"""
    if dtype == torch.float64:
        return 4096
    if (softcap and (prob or weight or smoothing)) or (vec > 1 and prob and weight):
        return 8192
    return 16384


def _launch(input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss, softcap,
            grad, compute_grad):
    if input.dim() != 3:
        raise ValueError(f"cross_entropy: input must be (N, C, D), got shape {tuple(input.shape)}")
    N, C, D = input.shape
    prob = target.dtype.is_floating_point
    if prob:
        if target.shape != input.shape:
            raise ValueError(f"cross_entropy: probability target must have input's shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
    elif target.dtype != torch.int64 or target.shape != (N, D):
        raise ValueError(f"cross_entropy: class-index target must be int64 of shape {(N, D)}, "
                         f"got {target.dtype} {tuple(target.shape)}")
    if weight is not None and weight.shape != (C,):
        raise ValueError(f"cross_entropy: weight must have shape {(C,)}, got {tuple(weight.shape)}")
    _check_device(input, "cross_entropy")

    acc = _acc_dtype(input.dtype)
    loss = torch.empty((N, D), dtype=acc, device=input.device)
    lse = torch.empty((N, D), dtype=acc, device=input.device)
    if N * D == 0:
        return loss, lse

    rows_n, rows_d = (1, N) if D == 1 else (N, D)
    xs = _row_view(N, D, input.stride(0), input.stride(2))
    x, x_off, vec = _row_walk(input, C, xs, input.stride(1))
    cap = _block_cap(input.dtype, vec, prob, weight is not None, label_smoothing > 0.0,
                     softcap > 0.0)
    block, block_rows, num_warps = _tiles(C, rows_d, cap)
    num_row_blocks = triton.cdiv(rows_d, block_rows)
    grid = _check_grid((rows_n * num_row_blocks,), "cross_entropy")
    if prob:
        ts = _row_view(N, D, target.stride(0), target.stride(2))
        ts_c = target.stride(1)
        t, t_off = _rebase(target, vec)
        t_vec = vec if ts_c == 1 and _aligned_like(t_off, ts, x_off, xs, vec) else 1
    else:
        ts = _row_view(N, D, target.stride(0), target.stride(1))
        t, t_off, t_vec, ts_c = target, 0, 1, 0
    if grad is input:  # in place: the input's own rows
        g, g_off, gs, gs_c, g_vec = x, x_off, xs, input.stride(1), vec
    elif compute_grad:
        gs = _row_view(N, D, grad.stride(0), grad.stride(2))
        gs_c = grad.stride(1)
        g, g_off = _rebase(grad, vec)
        g_vec = vec if gs_c == 1 and _aligned_like(g_off, gs, x_off, xs, vec) else 1
    else:
        g, g_off, gs, gs_c, g_vec = loss, 0, (0, 0), 0, 1  # unused pointer
    if weight is not None:
        weight = weight.contiguous()
    report = _INTERPRETED and not prob
    err = _error_buffer(input.device, report)

    with _quiet():
        _cross_entropy_fwd_kernel[grid](
            x, x_off, xs[0], input.stride(1), xs[1],
            t, t_off, ts[0], ts_c, ts[1],
            weight,
            loss_scale,
            loss, lse,
            g, g_off, gs[0], gs_c, gs[1],
            err,
            C, rows_d, num_row_blocks,
            int(ignore_index),
            float(label_smoothing), float(z_loss), float(softcap),
            ACC_DTYPE=_tl_acc(input.dtype),
            BLOCK_SIZE=block,
            BLOCK_ROWS=block_rows,
            VEC=vec,
            T_VEC=t_vec,
            G_VEC=g_vec,
            EXPM1_TERMS=_expm1_terms(input.dtype),
            PROB_TARGET=prob,
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=label_smoothing > 0.0,
            HAS_Z_LOSS=z_loss != 0.0,
            HAS_SOFTCAP=softcap > 0.0,
            HAS_SCALE=loss_scale is not None,
            COMPUTE_GRAD=compute_grad,
            REPORT_ERRORS=report,
            EMULATE_RTNE=_INTERPRETED,
            num_warps=num_warps,
            sanitize_overflow=False,  # debug=True would also add int32 overflow checks; not wanted
        )
    _raise_if_error(err, lambda: _bad_target_error(target, ignore_index, C))
    return loss, lse


def cross_entropy_fwd(input, target, weight, loss_scale, ignore_index: int, label_smoothing: float,
                      z_loss: float, softcap: float, compute_grad: bool):
    """Per-row loss and lse (N, D) in the accumulation dtype and, with compute_grad, the gradient
    of their sum as a new contiguous (N, C, D) tensor of input's dtype (else an empty tensor)."""
    if compute_grad:
        grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    else:
        grad = torch.empty((0,), dtype=input.dtype, device=input.device)
    loss, lse = _launch(input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss,
                        softcap, grad, compute_grad)
    return loss, lse, grad


def cross_entropy_fwd_inplace(input, target, weight, loss_scale, ignore_index: int,
                              label_smoothing: float, z_loss: float, softcap: float):
    """cross_entropy_fwd with compute_grad, but the gradient overwrites input (its own strides)."""
    return _launch(input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss,
                   softcap, input, True)
