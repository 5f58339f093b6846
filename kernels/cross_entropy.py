"""Triton cross-entropy kernels and launchers (the contract is docs/KERNELS.md).

``cross_entropy_fwd``, ``cross_entropy_fwd_inplace`` and ``scale_grad_`` take the arguments of the
``torch.ops.fusedloss_C`` schemas in csrc/registration.cpp; the per-row math mirrors
csrc/include/fusedloss/cross_entropy.h.

Design. The input is (N, C, D) with any strides; a row is one (n, d) position. A program owns a
tile of BLOCK_ROWS rows of one n (consecutive d) and walks the classes in BLOCK_SIZE chunks, so a
row never has to fit in one block:

* pass 1: online max / sum of exp over the chunks, plus the target logit (class-index targets:
  one gathered load per row, target validated first) and, for label smoothing (v = w) or
  probability targets (v = w t'), omega = sum_c v_c and a = sum_c v_c (m - xs_c) relative to the
  running max m, moved to a new max by a += omega (m' - m): non-negative terms, so the row's
  sum_c v_c (lse - xs_c) = a + omega log(s) does not cancel (cross_entropy.h: dev_rebase);
* pass 2 (COMPUTE_GRAD): reload the chunks and write the gradient through the gradient's strides.
  In place, those are the input's own strides; every element is read before it is overwritten.

Large vocabularies get BLOCK_ROWS = 1 and BLOCK_SIZE up to MAX_BLOCK_SIZE (the Liger / quack
layout); small class counts get many rows per program (segmentation, classification heads). When
D == 1 the rows of the tile run along n (the input is viewed as (1, C, N)); when D > 1 they run
along d, which is the contiguous axis of (N, C, H*W) segmentation logits, so loads coalesce in
both layouts. Row offsets are int64; class offsets are widened to int64 before the stride multiply.

Feature switches are constexpr flags so the plain case compiles to the lean kernel. All math is in
float32 (float64 for float64 input). lse = m + log(s) is stored, but losses and probabilities are
evaluated as (x - m) - log(s), like torch's log_softmax: going through the rounded lse would cost an
absolute error of ulp(lse) (2e-6 at lse ~ 20 in float32), all of 1 - p_y for a confident
prediction. NaN propagates through the exp-sum (tl.max drops NaN, both compiled and interpreted).
tanh and expm1 are written with tl.exp only (triton's interpreter has no libdevice) and keep full
relative accuracy near 0.

GPU tiles: BLOCK_SIZE <= 16384 classes (32 warps, ~46-64 registers, no spills on sm_90; a 32768
block spills with every feature on); about ROW_TILE = 4096 elements per program when C is small.
Loads and stores compile to 128-bit vectors when C (and the row stride) is a multiple of 16.

Target values are checked in the kernel: on the GPU with tl.device_assert (the kernel is compiled
with debug=True so the assertion is live, as torch's nll_loss asserts); under the interpreter, where
tl.device_assert is a no-op in triton 3.9, the kernel records the bad value in a small error buffer
and the launcher raises IndexError. A bad target is never used as an address.

Interpreter only: triton 3.9's interpreter truncates float32 -> bfloat16 where the GPU rounds to
nearest even, so under the interpreter (EMULATE_RTNE) bfloat16 outputs are rounded on the bits
first.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["cross_entropy_fwd", "cross_entropy_fwd_inplace", "scale_grad_"]

# Tile-size knobs, read at every launch (tests set MAX_BLOCK_SIZE = 64 so the class loop runs many
# times). MAX_BLOCK_SIZE caps the classes per chunk; ROW_TILE is the element budget that decides how
# many rows share a program when C is small. FUSEDLOSS_TRITON_MAX_BLOCK overrides the default cap.
MAX_BLOCK_SIZE = int(os.environ.get("FUSEDLOSS_TRITON_MAX_BLOCK", "0")) or None
ROW_TILE = 4096
_GPU_MAX_BLOCK_SIZE = 16384
_INTERPRETER_MAX_BLOCK_SIZE = 1024

# ----------------------------------------------------------------------------------------------
# Portable math helpers (no libdevice: triton's interpreter cannot run extern functions).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _expm1(u, NUM_TERMS: tl.constexpr):
    """exp(u) - 1 with full relative accuracy: Taylor series (Horner) for |u| < 0.5, else exp - 1.

    NUM_TERMS = 8 is below float32 rounding at |u| = 0.5 (truncation 1e-8), 14 below float64's.
    Above 0.5, exp(u) - 1 loses at most a factor 1.6 of exp's relative error. NaN and +-inf pass
    through (expm1(-inf) = -1).
    """
    small = tl.abs(u) < 0.5
    us = tl.where(small, u, 0.0)
    r = 1.0
    # u (1 + u/2 (1 + u/3 (1 + ... (1 + u/NUM_TERMS)))); coefficients rounded once from float64.
    for i in tl.static_range(NUM_TERMS - 1):
        r = 1.0 + us * r * tl.full([], 1.0 / (NUM_TERMS - i), tl.float64).to(us.dtype)
    return tl.where(small, us * r, tl.exp(u) - 1.0)


@triton.jit
def _tanh(u, NUM_TERMS: tl.constexpr):
    """tanh(u) = sign(u) * -expm1(-2|u|) / (2 + expm1(-2|u|)): accurate for small |u| (no 1 - e^-2u
    cancellation), and exp never overflows (its argument is <= 0). tanh(+-inf) = +-1, NaN -> NaN."""
    em = _expm1(-2.0 * tl.abs(u), NUM_TERMS)
    t = -em / (2.0 + em)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), still as float32, so that the
    conversion that follows is exact. Only for the interpreter: triton 3.9's interpreter truncates
    float32 -> bfloat16, the GPU rounds to nearest even. NaN stays NaN, overflow goes to inf."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_tile(num_row_blocks, D, BLOCK_ROWS: tl.constexpr):
    """This program's rows: one n and BLOCK_ROWS consecutive d (int64), and which d exist."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // num_row_blocks
    d = (pid % num_row_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    return n, d, d < D


@triton.jit
def _logits_block(x_ptr, x_row, x_stride_c, start, C, row_mask, softcap,
                  ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, EXPM1_TERMS: tl.constexpr):
    """The (BLOCK_ROWS, BLOCK_SIZE) tile of (softcapped) logits at columns start.. in ACC_DTYPE,
    with its column indices, int64 column offsets and mask; masked entries are -inf (they add
    nothing to a softmax, and their gradient is never stored)."""
    cols = start + tl.arange(0, BLOCK_SIZE)
    col_mask = cols < C
    col_off = cols.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + x_row[:, None] + col_off[None, :] * x_stride_c, mask=mask,
                other=float("-inf")).to(ACC_DTYPE)
    if HAS_SOFTCAP:
        sc = tl.full([], softcap, ACC_DTYPE)
        x = tl.where(mask, sc * _tanh(x / sc, EXPM1_TERMS), float("-inf"))
    return cols, col_mask, col_off, mask, x


@triton.jit(debug=True)  # debug=True: tl.device_assert is compiled in (it is dropped otherwise)
def _cross_entropy_fwd_kernel(
    x_ptr, x_stride_n, x_stride_c, x_stride_d,
    target_ptr, target_stride_n, target_stride_c, target_stride_d,
    weight_ptr,
    grad_scale_ptr,
    loss_ptr, lse_ptr,
    grad_ptr, grad_stride_n, grad_stride_c, grad_stride_d,
    err_ptr,
    C, D, num_row_blocks,
    ignore_index,
    label_smoothing: tl.float64, z_loss: tl.float64, softcap: tl.float64,
    ACC_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
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
    rows = n * D + d  # index into the contiguous (N, D) loss / lse
    x_row = n * x_stride_n + d * x_stride_d

    if HAS_SMOOTHING:
        ls = tl.full([], label_smoothing, ACC_DTYPE)
        smooth = ls / C
    if HAS_Z_LOSS:
        z = tl.full([], z_loss, ACC_DTYPE)
    if HAS_SOFTCAP:
        sc = tl.full([], softcap, ACC_DTYPE)
    if HAS_SCALE:
        scale = tl.load(grad_scale_ptr).to(ACC_DTYPE)
    else:
        scale = tl.full([], 1.0, ACC_DTYPE)

    if PROB_TARGET:
        t_row = n * target_stride_n + d * target_stride_d
        sum_wt = tl.zeros([BLOCK_ROWS], ACC_DTYPE)  # omega
        sum_wtd = tl.zeros([BLOCK_ROWS], ACC_DTYPE)  # a
    else:
        # Class-index target: validate before it is used as an address.
        y = tl.load(target_ptr + n * target_stride_n + d * target_stride_d, mask=row_mask,
                    other=ignore_index)
        ignored = y == ignore_index
        valid = (y >= 0) & (y < C)
        tl.device_assert(ignored | valid,
                         "cross_entropy: target out of bounds (0 <= target < C or ignore_index)")
        if REPORT_ERRORS:
            bad = (ignored | valid) == 0
            tl.store(err_ptr + 0 * d, tl.full([BLOCK_ROWS], 1, tl.int64), mask=bad)
            tl.store(err_ptr + 1 + 0 * d, y, mask=bad)
        y_ok = valid & row_mask
        y_safe = tl.where(y_ok, y, 0)
        x_y = tl.load(x_ptr + x_row + y_safe * x_stride_c, mask=y_ok, other=0.0).to(ACC_DTYPE)
        if HAS_SOFTCAP:
            x_y = sc * _tanh(x_y / sc, EXPM1_TERMS)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y_safe, mask=y_ok, other=0.0).to(ACC_DTYPE)
        else:
            w_y = tl.full([BLOCK_ROWS], 1.0, ACC_DTYPE)
        if HAS_SMOOTHING:
            sum_wd = tl.zeros([BLOCK_ROWS], ACC_DTYPE)  # a
            W = tl.zeros([], ACC_DTYPE)  # omega: the same for every row

    # ---- pass 1: online logsumexp and the row sums ------------------------------------------
    m = tl.full([BLOCK_ROWS], float("-inf"), ACC_DTYPE)
    s = tl.zeros([BLOCK_ROWS], ACC_DTYPE)
    for start in range(0, C, BLOCK_SIZE):
        cols, col_mask, col_off, mask, x = _logits_block(
            x_ptr, x_row, x_stride_c, start, C, row_mask, softcap, ACC_DTYPE, BLOCK_SIZE,
            HAS_SOFTCAP, EXPM1_TERMS)
        # tl.max may drop NaN; a NaN logit still reaches s through exp(NaN - m).
        m_new = tl.maximum(m, tl.max(x, axis=1), propagate_nan=tl.PropagateNan.ALL)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: s stays 0
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        if PROB_TARGET or HAS_SMOOTHING:
            # m_new - x; a -inf logit is infinitely far (m_new may be -inf too).
            dist = tl.where(x == float("-inf"), float("inf"), m_new[:, None] - x)
        if HAS_WEIGHT and (PROB_TARGET or HAS_SMOOTHING):
            w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
        if PROB_TARGET:
            t = tl.load(target_ptr + t_row[:, None] + col_off[None, :] * target_stride_c,
                        mask=mask, other=0.0).to(ACC_DTYPE)
            if HAS_SMOOTHING:
                t = tl.where(mask, (1.0 - ls) * t + smooth, 0.0)
            if HAS_WEIGHT:
                t = w[None, :] * t
            # To the new max only where there is weight and the max rose (0 * inf otherwise).
            sum_wtd = tl.where((sum_wt != 0.0) & (m_new > m), sum_wtd + sum_wt * (m_new - m),
                               sum_wtd)
            sum_wt += tl.sum(t, axis=1)
            sum_wtd += tl.sum(tl.where(mask, t * dist, 0.0), axis=1)
        else:
            if HAS_SMOOTHING:
                if not HAS_WEIGHT:
                    W = tl.zeros([], ACC_DTYPE) + start  # the columns before this chunk
                omega = tl.zeros([BLOCK_ROWS], ACC_DTYPE) + W
                sum_wd = tl.where((omega != 0.0) & (m_new > m), sum_wd + omega * (m_new - m),
                                  sum_wd)
                if HAS_WEIGHT:
                    sum_wd += tl.sum(tl.where(mask, w[None, :] * dist, 0.0), axis=1)
                    W += tl.sum(w, axis=0)
                else:
                    sum_wd += tl.sum(tl.where(mask, dist, 0.0), axis=1)
        m = m_new
    # lse = m + log(s) is only stored; the math below uses (x - m) - log(s), which keeps the
    # accuracy of torch's log_softmax instead of an absolute error of ulp(lse) (lse ~ 20 in float32:
    # 2e-6, all of 1 - p_y for a confident prediction).
    log_s = tl.log(s)
    lse = m + log_s

    # ---- row coefficients (cross_entropy.h: index_row_diff / prob_row) -----------------------
    if PROB_TARGET:
        A = sum_wt
        loss = sum_wtd + sum_wt * log_s
        if HAS_Z_LOSS:
            A += 2.0 * z * lse
            loss += z * lse * lse
        loss = loss * scale
    else:
        if HAS_SMOOTHING:
            if not HAS_WEIGHT:
                W = tl.full([], C, ACC_DTYPE)
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
            sm = sum_wd + W * log_s  # sum_c w_c (lse - xs_c)
            if HAS_WEIGHT:  # torch: inf * (lse - xs_c) > 0; here inf * 0 where that class is max
                sm = tl.where(W == float("inf"), float("inf"), sm)
            loss += smooth * sm
        loss = tl.where(ignored, 0.0, loss) * scale  # ignored: 0 * scale (NaN if scale is inf)
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)

    # ---- pass 2: gradient ---------------------------------------------------------------------
    if COMPUTE_GRAD:
        g_row = n * grad_stride_n + d * grad_stride_d
        if not PROB_TARGET:
            # Target column: A (p_y - 1) + (A - target) with p_y - 1 = expm1(xs_y - lse): no
            # cancellation when p_y is close to 1.
            em1 = _expm1((x_y - m) - log_s, EXPM1_TERMS)
            g_y = A * em1 + (A - tgt)
            if HAS_SMOOTHING:
                g_y -= smooth * w_y
                # Infinite A: inf - inf above; A p_y - target is inf like torch's.
                g_y = tl.where(tl.abs(A) == float("inf"), A * (em1 + 1.0) - (tgt + smooth * w_y),
                               g_y)
        for start in range(0, C, BLOCK_SIZE):
            cols, col_mask, col_off, mask, x = _logits_block(
                x_ptr, x_row, x_stride_c, start, C, row_mask, softcap, ACC_DTYPE, BLOCK_SIZE,
                HAS_SOFTCAP, EXPM1_TERMS)
            g = A[:, None] * tl.exp((x - m[:, None]) - log_s[:, None])
            if HAS_WEIGHT and (PROB_TARGET or HAS_SMOOTHING):
                w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
            if PROB_TARGET:
                t = tl.load(target_ptr + t_row[:, None] + col_off[None, :] * target_stride_c,
                            mask=mask, other=0.0).to(ACC_DTYPE)
                if HAS_SMOOTHING:
                    t = (1.0 - ls) * t + smooth
                if HAS_WEIGHT:
                    t = w[None, :] * t
                g = g - t
            else:
                if HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        g = g - smooth * w[None, :]
                    else:
                        g = g - smooth
                g = tl.where(col_off[None, :] == y[:, None], g_y[:, None], g)
            if HAS_SOFTCAP:
                u = x / sc
                g = g * (1.0 - u * u)
            g = g * scale
            if not PROB_TARGET:
                g = tl.where(ignored[:, None], 0.0, g)
            if EMULATE_RTNE and grad_ptr.dtype.element_ty == tl.bfloat16:
                g = _round_bf16(g)
            tl.store(grad_ptr + g_row[:, None] + col_off[None, :] * grad_stride_c,
                     g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_grad_kernel(
    grad_ptr, grad_stride_n, grad_stride_c, grad_stride_d,
    grad_loss_ptr, grad_loss_stride_n, grad_loss_stride_d,
    C, D, num_row_blocks,
    ACC_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    IS_SCALAR: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    n, d, row_mask = _row_tile(num_row_blocks, D, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = row_mask[:, None] & (cols < C)[None, :]
    ptrs = (grad_ptr + (n * grad_stride_n + d * grad_stride_d)[:, None]
            + cols.to(tl.int64)[None, :] * grad_stride_c)
    if IS_SCALAR:
        s = tl.load(grad_loss_ptr).to(ACC_DTYPE)
        if s != 1.0:  # s == 1: the gradient is left untouched, decided on the device
            g = tl.load(ptrs, mask=mask).to(ACC_DTYPE)
            g = tl.where(g == 0.0, 0.0, g * s)  # 0 stays 0 (a NaN s must not reach ignored rows)
            if EMULATE_RTNE and grad_ptr.dtype.element_ty == tl.bfloat16:
                g = _round_bf16(g)
            tl.store(ptrs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        s = tl.load(grad_loss_ptr + n * grad_loss_stride_n + d * grad_loss_stride_d, mask=row_mask,
                    other=0.0).to(ACC_DTYPE)
        g = tl.load(ptrs, mask=mask).to(ACC_DTYPE)
        g = tl.where(g == 0.0, 0.0, g * s[:, None])
        if EMULATE_RTNE and grad_ptr.dtype.element_ty == tl.bfloat16:
            g = _round_bf16(g)
        tl.store(ptrs, g.to(grad_ptr.dtype.element_ty), mask=mask)


# Decorated above, under the TRITON_INTERPRET value of import time: launches must match it.
_INTERPRETED = type(_cross_entropy_fwd_kernel).__name__ == "InterpretedFunction"

if _INTERPRETED:  # numpy runs the kernels: padding rows compute log(0) and inf - inf, harmlessly
    import warnings

    import numpy as _np

    @contextlib.contextmanager
    def _quiet():
        with _np.errstate(divide="ignore", invalid="ignore", over="ignore"), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
            yield
else:
    _quiet = contextlib.nullcontext


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_device(t):
    if t.device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError(
            "fusedloss triton kernels need CUDA tensors; CPU tensors run only under the triton "
            "interpreter (set TRITON_INTERPRET=1 before importing fusedloss.kernels)")


def _tiles(C, D):
    """(BLOCK_SIZE, BLOCK_ROWS, num_warps) for C classes and D rows along the tile axis."""
    cap = MAX_BLOCK_SIZE or (_INTERPRETER_MAX_BLOCK_SIZE if _INTERPRETED else _GPU_MAX_BLOCK_SIZE)
    block = min(triton.next_power_of_2(max(C, 1)), triton.next_power_of_2(cap))
    rows = min(triton.next_power_of_2(max(D, 1)), max(1, ROW_TILE // block))
    num_warps = min(32, max(4, block * rows // 512))
    return block, rows, num_warps


def _row_view(N, D, stride_n, stride_d):
    """Strides (stride_n, stride_d) of the (N', D') row grid: D == 1 runs the tile along n."""
    return (0, stride_n) if D == 1 else (stride_n, stride_d)


def _bad_target_error(target, ignore_index, C):
    bad = target[(target != ignore_index) & ((target < 0) | (target >= C))]
    value = f" {int(bad.flatten()[0])}" if bad.numel() else ""
    return IndexError(f"cross_entropy: target{value} is out of bounds for {C} classes "
                      f"(expected 0 <= target < {C}, or target == ignore_index = {ignore_index})")


def _launch(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
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
    _check_device(input)

    acc = _acc_dtype(input.dtype)
    loss = torch.empty((N, D), dtype=acc, device=input.device)
    lse = torch.empty((N, D), dtype=acc, device=input.device)
    if N * D == 0:
        return loss, lse

    rows_n, rows_d = (1, N) if D == 1 else (N, D)
    block, block_rows, num_warps = _tiles(C, rows_d)
    num_row_blocks = triton.cdiv(rows_d, block_rows)

    xs_n, xs_d = _row_view(N, D, input.stride(0), input.stride(2))
    if prob:
        ts_n, ts_d = _row_view(N, D, target.stride(0), target.stride(2))
        ts_c = target.stride(1)
    else:
        ts_n, ts_d = _row_view(N, D, target.stride(0), target.stride(1))
        ts_c = 0
    if compute_grad:
        gs_n, gs_d = _row_view(N, D, grad.stride(0), grad.stride(2))
        gs_c = grad.stride(1)
    else:
        grad, gs_n, gs_c, gs_d = loss, 0, 0, 0  # unused pointer
    if weight is not None:
        weight = weight.contiguous()
    report = _INTERPRETED and not prob
    err = torch.zeros(2, dtype=torch.int64, device=input.device) if report else None

    with _quiet():
        _cross_entropy_fwd_kernel[(rows_n * num_row_blocks,)](
            input, xs_n, input.stride(1), xs_d,
            target, ts_n, ts_c, ts_d,
            weight,
            grad_scale,
            loss, lse,
            grad, gs_n, gs_c, gs_d,
            err,
            C, rows_d, num_row_blocks,
            int(ignore_index),
            float(label_smoothing), float(z_loss), float(softcap),
            ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
            BLOCK_SIZE=block,
            BLOCK_ROWS=block_rows,
            EXPM1_TERMS=14 if acc == torch.float64 else 8,
            PROB_TARGET=prob,
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=label_smoothing > 0.0,
            HAS_Z_LOSS=z_loss != 0.0,
            HAS_SOFTCAP=softcap > 0.0,
            HAS_SCALE=grad_scale is not None,
            COMPUTE_GRAD=compute_grad,
            REPORT_ERRORS=report,
            EMULATE_RTNE=_INTERPRETED,
            num_warps=num_warps,
            sanitize_overflow=False,  # debug=True would also add int32 overflow checks; not wanted
        )
    if report and err[0].item():  # interpreter only: CPU tensors, no device sync
        raise _bad_target_error(target, ignore_index, C)
    return loss, lse


def cross_entropy_fwd(input, target, weight, grad_scale, ignore_index: int, label_smoothing: float,
                      z_loss: float, softcap: float, compute_grad: bool):
    """Per-row loss and lse (N, D) in the accumulation dtype and, with compute_grad, the gradient
    of their sum as a new contiguous (N, C, D) tensor of input's dtype (else an empty tensor)."""
    if compute_grad:
        grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    else:
        grad = torch.empty((0,), dtype=input.dtype, device=input.device)
    loss, lse = _launch(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
                        softcap, grad, compute_grad)
    return loss, lse, grad


def cross_entropy_fwd_inplace(input, target, weight, grad_scale, ignore_index: int,
                              label_smoothing: float, z_loss: float, softcap: float):
    """cross_entropy_fwd with compute_grad, but the gradient overwrites input (its own strides)."""
    return _launch(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
                   softcap, input, True)


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
    _check_device(grad)
    if grad.numel() == 0:
        return None
    is_scalar = grad_loss.numel() == 1 or all(st == 0 for st in grad_loss.stride())
    rows_n, rows_d = (1, N) if D == 1 else (N, D)
    block, block_rows, num_warps = _tiles(C, rows_d)
    num_row_blocks = triton.cdiv(rows_d, block_rows)
    gs_n, gs_d = _row_view(N, D, grad.stride(0), grad.stride(2))
    ls_n, ls_d = _row_view(N, D, grad_loss.stride(0), grad_loss.stride(1))
    acc = _acc_dtype(grad.dtype)
    with _quiet():
        _scale_grad_kernel[(rows_n * num_row_blocks, triton.cdiv(C, block))](
            grad, gs_n, grad.stride(1), gs_d,
            grad_loss, ls_n, ls_d,
            C, rows_d, num_row_blocks,
            ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
            BLOCK_SIZE=block,
            BLOCK_ROWS=block_rows,
            IS_SCALAR=is_scalar,
            EMULATE_RTNE=_INTERPRETED,
            num_warps=num_warps,
        )
    return None
