"""Triton Dice / Tversky / Dice+CE kernels and launchers (docs/KERNELS_dice_contract.md).

``dice_fwd`` and ``dice_bwd`` take the arguments of the ``torch.ops.fusedloss_C.dice_fwd`` /
``dice_bwd`` schemas; the per-position math mirrors csrc/include/fusedloss/dice.h. The kernels
compute only the per-(n, c) sums (I, P, G, NLL, SM) and the logits' gradient from the sums'
upstream gradient; the loss is plain torch on the sums (fusedloss/ops/dice.py).

Dice reduces over positions, not over classes, so it does not fit the softmax-row skeleton's row
loop (_softmax_row.py: per-row results, a class loop per row); this file is written beside it and
reuses its shared pieces (``logsumexp_fwd`` for the many-class pre-pass, ``_class_target`` for the
backward's target check, ``_common``'s launch helpers, rounding and error buffer).

Tiles. The input is (N, C, D) with any strides; a tile is BLOCK_ROWS consecutive positions d of
one n times BLOCK_C classes (C padded to a power of two), loaded once in any layout: in NCHW the
positions are contiguous (stride 1, so triton makes them the fast axis and loads them 128 bits
at a time), in channels-last the classes are.

Forward (``_dice_fwd_kernel``). The positions of each n are split into blocks of
``block_positions(C, D)`` positions (fixed by (C, D) only); a program owns one block and one
chunk of BLOCK_C classes, walks the block's tiles adding each tile's terms into five per-element
accumulators (plain adds, no cross-thread work per tile), reduces them over the positions once
(a fixed tree: the same order on every call) and stores the five per-class sums into a
workspace (N, blocks_per_n, C, 5) that the launcher reduces over the blocks with one torch sum
(deterministic: the same order on every call; no float atomics). The workspace is
C * 5 * 4 bytes per block of positions: about 1% of bfloat16 logits.
  Softmax mode, C <= MAX_BLOCK_C (one chunk): the tile's softmax in registers (max and exp-sum
  over the classes), lse = m + log s stored per position, p = exp((x - m) - log s), one read of
  the logits. C > MAX_BLOCK_C: the class chunks are programs of their own, so a pre-pass computes
  the lse (``logsumexp_fwd``, the skeleton's online softmax) and every chunk reads it (LSE_IN):
  two reads of the logits instead of one.
  Sigmoid mode: p = sigmoid(z) elementwise with float targets of the input's shape, any strides;
  classes are independent, so chunks are programs of their own too.
Backward (``_dice_bwd_kernel``). One tile of positions per program. Softmax: p recomputed from
the saved lse, the per-class upstream gradients of row n loaded once per program, then per
position s = sum_c p_c u_c and gNLL[y] as reductions over the class axis (C > MAX_BLOCK_C: a
first loop over the chunks for them, a second writing the gradient), and dz of dice.h stored
through the gradient's strides (input's when input is dense: ``torch.empty_like``). Ignored
positions get exactly 0. Sigmoid: elementwise, chunks as programs.

Targets. A class index y is never used as an address here: it is only compared with the class
numbers of the tile (the one-hot is that comparison, in registers). It is still validated, as the
contract asks: y outside [0, C) and != ignore_index traps on the GPU (tl.device_assert; the
kernels are compiled with debug=True) and is reported through the error buffer under the
interpreter, where the launcher raises an IndexError naming it. The forward asserts once after
its last store (an assertion is a function call: values live across it are saved to local
memory, and the five accumulators would be); the backward first thing, before anything is live.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    _INTERPRETED,
    _acc_dtype,
    _check_device,
    _check_grid,
    _error_buffer,
    _quiet,
    _raise_if_error,
    _report_error,
    _store_rounded,
    _tl_acc,
)
from ._softmax_row import _class_target
from .logsumexp import logsumexp_fwd

__all__ = ["dice_fwd", "dice_bwd", "block_positions"]

# Launch knobs, read at every launch (tests make them small so that every path runs on small
# shapes): the most classes of one tile (softmax: beyond it, chunks and the lse pre-pass), the
# classes of a sigmoid tile, the elements of a forward and of a backward tile (float32; half for
# float64), and the positions of one forward block. The forward keeps five per-element
# accumulators of its tile: 2048 elements needed 150-230 registers on sm_80, 1024 stay <= 128
# with no spill (.ci/check_triton.py); the backward's 2048 stay <= 148.
MAX_BLOCK_C = 128
SIGMOID_BLOCK_C = 16
FWD_TILE_ELEMS = 1024
BWD_TILE_ELEMS = 2048
BLOCK_POSITIONS = 1024
NUM_SUMS = 5  # I, P, G, NLL, SM (dice.h: DiceSum)


# ----------------------------------------------------------------------------------------------
# Shared tile pieces
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, n, d, cols, stride_n, stride_c, stride_d, mask, other, ACC_DTYPE):
    """The (BLOCK_ROWS, BLOCK_C) tile of an (N, C, D) operand at positions d of n, classes cols,
    in ACC_DTYPE (64-bit offsets: n, d and cols are int64)."""
    offs = n * stride_n + d[:, None] * stride_d + cols[None, :] * stride_c
    return tl.load(ptr + offs, mask=mask, other=other).to(ACC_DTYPE)


@triton.jit
def _class_targets(t_ptr, n, d, t_stride_n, t_stride_d, row_mask, ignore_index, C):
    """(y, keep, bad) of the tile's positions: y int64, keep = the position exists and is not
    ignored, bad = the position exists and y is neither ignore_index nor in [0, C)."""
    y = tl.load(t_ptr + n * t_stride_n + d * t_stride_d, mask=row_mask, other=ignore_index)
    ignored = y == ignore_index
    ok = (y >= 0) & (y < C)
    return y, row_mask & (ignored == 0), row_mask & (ignored == 0) & (ok == 0)


@triton.jit
def _sigmoid_pair(x):
    """(sigmoid(x), sigmoid(-x)) without cancellation: 1 / (1 + exp(-x)) and 1 / (1 + exp(x))
    (exp overflows to inf where the value is 0: exact)."""
    return 1.0 / (1.0 + tl.exp(-x)), 1.0 / (1.0 + tl.exp(x))


# ----------------------------------------------------------------------------------------------
# Forward: per-(n, c) partial sums of one block of positions
# ----------------------------------------------------------------------------------------------


@triton.jit(debug=True)  # debug=True: tl.device_assert is compiled in (it is dropped otherwise)
def _dice_fwd_kernel(
    x_ptr, x_stride_n, x_stride_c, x_stride_d,
    t_ptr, t_stride_n, t_stride_c, t_stride_d,
    lse_ptr,
    ws_ptr,
    err_ptr,
    C, D, blocks_per_n, num_chunks, tiles_per_block,
    ignore_index,
    ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SIGMOID: tl.constexpr,
    SQUARED_PRED: tl.constexpr,
    WITH_CE: tl.constexpr,
    WITH_SMOOTHING: tl.constexpr,
    LSE_IN: tl.constexpr,
    REPORT_ERRORS: tl.constexpr,
):
    # This program: class chunk `chunk` of block `blk` of row n (positions
    # [blk * tiles_per_block * BLOCK_ROWS, ...) of n). All offsets are int64.
    pid = tl.program_id(0).to(tl.int64)
    chunk = pid % num_chunks
    b = pid // num_chunks
    n = b // blocks_per_n
    blk = b % blocks_per_n
    cols = chunk * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    col_mask = cols < C
    rows = tl.arange(0, BLOCK_ROWS).to(tl.int64)
    d0 = blk * tiles_per_block * BLOCK_ROWS

    # Per-element accumulators, reduced over the positions once after the loop (elementwise adds
    # per tile instead of five cross-thread reductions).
    s_i = tl.zeros([BLOCK_ROWS, BLOCK_C], ACC_DTYPE)
    s_p = tl.zeros([BLOCK_ROWS, BLOCK_C], ACC_DTYPE)
    s_g = tl.zeros([BLOCK_ROWS, BLOCK_C], ACC_DTYPE)
    s_nll = tl.zeros([BLOCK_ROWS, BLOCK_C], ACC_DTYPE)
    s_sm = tl.zeros([BLOCK_ROWS, BLOCK_C], ACC_DTYPE)
    any_bad = tl.zeros([BLOCK_ROWS], tl.int32)
    for k in range(0, tiles_per_block):
        d = d0 + k * BLOCK_ROWS + rows
        row_mask = d < D
        mask = row_mask[:, None] & col_mask[None, :]
        x = _load_tile(x_ptr, n, d, cols, x_stride_n, x_stride_c, x_stride_d, mask,
                       float("-inf"), ACC_DTYPE)
        if SIGMOID:
            g = _load_tile(t_ptr, n, d, cols, t_stride_n, t_stride_c, t_stride_d, mask, 0.0,
                           ACC_DTYPE)
            p, _ = _sigmoid_pair(x)
            p = tl.where(mask, p, 0.0)
            s_i += p * g
            if SQUARED_PRED:
                s_p += p * p
                s_g += g * g
            else:
                s_p += p
                s_g += g
        else:
            y, keep, bad = _class_targets(t_ptr, n, d, t_stride_n, t_stride_d, row_mask,
                                          ignore_index, C)
            _report_error(err_ptr, bad, y, REPORT_ERRORS)
            any_bad = any_bad | bad.to(tl.int32)
            if LSE_IN:  # the lse of all C classes, from the pre-pass
                lse = tl.load(lse_ptr + n * D + d, mask=row_mask, other=0.0).to(ACC_DTYPE)
                dist = lse[:, None] - x  # lse - z_c = -log p_c
            else:  # every class in this tile: its softmax in registers
                m = tl.max(x, axis=1)
                # a NaN logit reaches s through exp(NaN - m) even where tl.max dropped it
                m_safe = tl.where(m == float("-inf"), 0.0, m)  # all -inf: s = 0, lse = -inf
                s = tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
                log_s = tl.log(s)
                tl.store(lse_ptr + n * D + d, m + log_s, mask=row_mask)
                dist = (m[:, None] - x) + log_s[:, None]  # without the rounding of lse
            p = tl.exp(-dist)
            sel = keep[:, None] & col_mask[None, :]
            hit = sel & (cols[None, :] == y[:, None])  # the one-hot, in registers
            pm = tl.where(sel, p, 0.0)
            s_i += tl.where(hit, p, 0.0)
            if SQUARED_PRED:
                s_p += pm * pm
            else:
                s_p += pm
            s_g += hit.to(ACC_DTYPE)  # g is 0/1: g^2 = g
            if WITH_CE:
                s_nll += tl.where(hit, dist, 0.0)
            if WITH_SMOOTHING:
                s_sm += tl.where(sel, dist, 0.0)

    ws = ws_ptr + ((n * blocks_per_n + blk) * C + cols) * 5
    tl.store(ws + 0, tl.sum(s_i, axis=0), mask=col_mask)
    tl.store(ws + 1, tl.sum(s_p, axis=0), mask=col_mask)
    tl.store(ws + 2, tl.sum(s_g, axis=0), mask=col_mask)
    tl.store(ws + 3, tl.sum(s_nll, axis=0), mask=col_mask)
    tl.store(ws + 4, tl.sum(s_sm, axis=0), mask=col_mask)
    if not SIGMOID:  # last, with nothing live (see the module doc); y was never an address.
        # One scalar: a per-element assertion keeps the other elements live across its call.
        tl.device_assert(tl.max(any_bad, axis=0) == 0, "fusedloss: dice target out of bounds "
                                                       "(0 <= target < C or ignore_index)")


# ----------------------------------------------------------------------------------------------
# Backward: the gradient of sum(grad_sums * sums) with respect to the logits
# ----------------------------------------------------------------------------------------------


@triton.jit
def _softmax_chunk(x_ptr, n, d, cols, x_stride_n, x_stride_c, x_stride_d, row_mask, C, lse, y,
                   gs_row, ACC_DTYPE: tl.constexpr, SQUARED_PRED: tl.constexpr,
                   OWN_LSE: tl.constexpr = False):
    """One class chunk of a softmax tile: (x's p, u, hit, mask, the chunk's s = sum_c p_c u_c
    and gNLL[y] per position). gs_row: grad_sums of row n (int64-offset pointer)."""
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    x = _load_tile(x_ptr, n, d, cols, x_stride_n, x_stride_c, x_stride_d, mask, float("-inf"),
                   ACC_DTYPE)
    if OWN_LSE:  # every class in this tile: the logsumexp from the registers, none saved
        m = tl.max(x, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        lse = m_safe + tl.log(tl.sum(tl.exp(x - m_safe[:, None]), axis=1))
    p = tl.exp(x - lse[:, None])
    g_i = tl.load(gs_row + cols * 5 + 0, mask=col_mask, other=0.0).to(ACC_DTYPE)
    g_p = tl.load(gs_row + cols * 5 + 1, mask=col_mask, other=0.0).to(ACC_DTYPE)
    hit = cols[None, :] == y[:, None]
    if SQUARED_PRED:
        u = g_p[None, :] * (2.0 * p)
    else:
        u = g_p[None, :] + tl.zeros_like(p)
    u = tl.where(hit, u + g_i[None, :], u)
    s = tl.sum(tl.where(mask, p * u, 0.0), axis=1)
    return p, u, hit, mask, s


@triton.jit
def _chunk_grad(p, u, hit, s, g_nll_y, sum_gsm, gs_row, cols, col_mask, ACC_DTYPE: tl.constexpr,
                WITH_CE: tl.constexpr, WITH_SMOOTHING: tl.constexpr):
    """dz of dice.h's softmax_grad on a chunk."""
    dz = p * (u - s[:, None])
    if WITH_CE:
        dz += g_nll_y[:, None] * (p - hit.to(ACC_DTYPE))
    if WITH_SMOOTHING:
        g_sm = tl.load(gs_row + cols * 5 + 4, mask=col_mask, other=0.0).to(ACC_DTYPE)
        dz += p * sum_gsm - g_sm[None, :]
    return dz


@triton.jit(debug=True)
def _dice_bwd_kernel(
    gs_ptr,
    x_ptr, x_stride_n, x_stride_c, x_stride_d,
    t_ptr, t_stride_n, t_stride_c, t_stride_d,
    lse_ptr,
    grad_ptr, grad_stride_n, grad_stride_c, grad_stride_d,
    err_ptr,
    C, D, tiles_per_n, num_chunks,
    ignore_index,
    ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    SIGMOID: tl.constexpr,
    SQUARED_PRED: tl.constexpr,
    WITH_CE: tl.constexpr,
    WITH_SMOOTHING: tl.constexpr,
    REPORT_ERRORS: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    LSE_SAVED: tl.constexpr = True,
):
    pid = tl.program_id(0).to(tl.int64)
    chunk = pid % num_chunks  # sigmoid: class chunks are programs; softmax: num_chunks == 1
    b = pid // num_chunks
    n = b // tiles_per_n
    d = (b % tiles_per_n) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    row_mask = d < D
    gs_row = gs_ptr + n * C * 5
    if SIGMOID:
        cols = chunk * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        x = _load_tile(x_ptr, n, d, cols, x_stride_n, x_stride_c, x_stride_d, mask, 0.0,
                       ACC_DTYPE)
        g = _load_tile(t_ptr, n, d, cols, t_stride_n, t_stride_c, t_stride_d, mask, 0.0,
                       ACC_DTYPE)
        g_i = tl.load(gs_row + cols * 5 + 0, mask=col_mask, other=0.0).to(ACC_DTYPE)
        g_p = tl.load(gs_row + cols * 5 + 1, mask=col_mask, other=0.0).to(ACC_DTYPE)
        p, q = _sigmoid_pair(x)
        if SQUARED_PRED:
            up = g_p[None, :] * (2.0 * p)
        else:
            up = g_p[None, :]
        dz = p * q * (g_i[None, :] * g + up)
        _store_rounded(grad_ptr + n * grad_stride_n + d[:, None] * grad_stride_d +
                       cols[None, :] * grad_stride_c, dz, mask, EMULATE_RTNE)
    else:
        # Targets first: the skeleton's check, its assertion before anything else is live.
        y, ignored, y_ok = _class_target(t_ptr, n * t_stride_n + d * t_stride_d, row_mask,
                                         ignore_index, C, err_ptr, REPORT_ERRORS)
        keep = row_mask & (ignored == 0)
        if LSE_SAVED:
            lse = tl.load(lse_ptr + n * D + d, mask=row_mask, other=0.0).to(ACC_DTYPE)
        else:  # ONE_CHUNK: _softmax_chunk takes it from the tile
            lse = tl.zeros([BLOCK_ROWS], ACC_DTYPE)
        g_row = grad_ptr + n * grad_stride_n + d * grad_stride_d
        cols0 = tl.arange(0, BLOCK_C).to(tl.int64)
        sum_gsm = tl.zeros([], ACC_DTYPE)
        if WITH_SMOOTHING:  # sum_c gSM[n, c]
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + cols0
                sum_gsm += tl.sum(tl.load(gs_row + cols * 5 + 4, mask=cols < C,
                                          other=0.0).to(ACC_DTYPE), axis=0)
        if ONE_CHUNK:  # all classes in registers: one read of the logits
            cols = cols0
            col_mask = cols < C
            p, u, hit, mask, s = _softmax_chunk(
                x_ptr, n, d, cols, x_stride_n, x_stride_c, x_stride_d, row_mask, C, lse, y,
                gs_row, ACC_DTYPE, SQUARED_PRED, not LSE_SAVED)
            g_nll_y = tl.zeros([BLOCK_ROWS], ACC_DTYPE)
            if WITH_CE:
                g_nll = tl.load(gs_row + cols * 5 + 3, mask=col_mask, other=0.0).to(ACC_DTYPE)
                g_nll_y = tl.sum(tl.where(hit, g_nll[None, :], 0.0), axis=1)
            dz = _chunk_grad(p, u, hit, s, g_nll_y, sum_gsm, gs_row, cols, col_mask, ACC_DTYPE,
                             WITH_CE, WITH_SMOOTHING)
            dz = tl.where(keep[:, None], dz, 0.0)
            _store_rounded(g_row[:, None] + cols[None, :] * grad_stride_c, dz, mask,
                           EMULATE_RTNE)
        else:  # chunks: s and gNLL[y] over all classes first, then the gradient
            s = tl.zeros([BLOCK_ROWS], ACC_DTYPE)
            g_nll_y = tl.zeros([BLOCK_ROWS], ACC_DTYPE)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + cols0
                p, u, hit, mask, s_c = _softmax_chunk(
                    x_ptr, n, d, cols, x_stride_n, x_stride_c, x_stride_d, row_mask, C, lse, y,
                    gs_row, ACC_DTYPE, SQUARED_PRED)
                s += s_c
                if WITH_CE:
                    g_nll = tl.load(gs_row + cols * 5 + 3, mask=cols < C,
                                    other=0.0).to(ACC_DTYPE)
                    g_nll_y += tl.sum(tl.where(hit, g_nll[None, :], 0.0), axis=1)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + cols0
                col_mask = cols < C
                p, u, hit, mask, _ = _softmax_chunk(
                    x_ptr, n, d, cols, x_stride_n, x_stride_c, x_stride_d, row_mask, C, lse, y,
                    gs_row, ACC_DTYPE, SQUARED_PRED)
                dz = _chunk_grad(p, u, hit, s, g_nll_y, sum_gsm, gs_row, cols, col_mask,
                                 ACC_DTYPE, WITH_CE, WITH_SMOOTHING)
                dz = tl.where(keep[:, None], dz, 0.0)
                _store_rounded(g_row[:, None] + cols[None, :] * grad_stride_c, dz, mask,
                               EMULATE_RTNE)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _tiles(C, D, dtype, sigmoid, forward=True):
    """(BLOCK_C, num_chunks, BLOCK_ROWS, num_warps) of a tile of C classes and D positions."""
    cap = SIGMOID_BLOCK_C if sigmoid else MAX_BLOCK_C
    block_c = min(triton.next_power_of_2(C), triton.next_power_of_2(cap))
    elems = FWD_TILE_ELEMS if forward else BWD_TILE_ELEMS
    elems = elems // 2 if dtype == torch.float64 else elems
    block_rows = min(triton.next_power_of_2(max(D, 1)), max(1, elems // block_c))
    num_warps = 4 if block_c * block_rows <= 2048 else 8
    return block_c, triton.cdiv(C, block_c), block_rows, num_warps


def block_positions(C, D, dtype=torch.float32, sigmoid=False):
    """Positions of one forward block: BLOCK_POSITIONS rounded to the tile (a multiple of the
    tile's BLOCK_ROWS), no more than D needs. Fixed by (C, D) and the mode: the workspace's
    blocks, and so the order of the sums, are the same on every call."""
    _, _, block_rows, _ = _tiles(C, D, dtype, sigmoid)
    tiles = max(1, BLOCK_POSITIONS // block_rows)
    return block_rows * min(tiles, triton.cdiv(max(D, 1), block_rows))


def _bad_target_error(target, ignore_index, C):
    bad = target[(target != ignore_index) & ((target < 0) | (target >= C))]
    value = f" {int(bad.flatten()[0])}" if bad.numel() else ""
    return IndexError(f"dice: target{value} is out of bounds for {C} classes (expected "
                      f"0 <= target < {C}, or target == ignore_index = {ignore_index})")


def _check_args(input, target, sigmoid, with_ce, with_smoothing, op):
    if input.dim() != 3:
        raise ValueError(f"{op}: input must be (N, C, D), got shape {tuple(input.shape)}")
    N, C, D = input.shape
    if not input.dtype.is_floating_point:
        raise ValueError(f"{op}: input must be floating point, got {input.dtype}")
    if sigmoid:
        if target.shape != input.shape or not target.dtype.is_floating_point:
            raise ValueError(f"{op}: sigmoid mode needs a floating target of input's shape "
                             f"{tuple(input.shape)}, got {target.dtype} {tuple(target.shape)}")
        if with_ce or with_smoothing:
            raise ValueError(f"{op}: with_ce and with_smoothing need softmax mode")
    elif target.dtype != torch.int64 or target.shape != (N, D):
        raise ValueError(f"{op}: target must be int64 of shape {(N, D)}, got {target.dtype} "
                         f"{tuple(target.shape)}")
    _check_device(input, op)


def _target_strides(target, sigmoid):
    """(stride_n, stride_c, stride_d) of the target: (N, C, D), or (N, D) with stride_c 0."""
    if sigmoid:
        return target.stride(0), target.stride(1), target.stride(2)
    return target.stride(0), 0, target.stride(1)


def dice_fwd(input, target, ignore_index: int, sigmoid: bool, squared_pred: bool, with_ce: bool,
             with_smoothing: bool):
    """(sums (N, C, 5), lse (N, D), or (0,) in sigmoid mode), in the accumulation dtype."""
    _check_args(input, target, sigmoid, with_ce, with_smoothing, "dice_fwd")
    N, C, D = input.shape
    acc = _acc_dtype(input.dtype)
    lse = torch.empty((0,) if sigmoid else (N, D), dtype=acc, device=input.device)
    if N * C * D == 0:
        return torch.zeros((N, C, NUM_SUMS), dtype=acc, device=input.device), lse

    block_c, num_chunks, block_rows, num_warps = _tiles(C, D, input.dtype, sigmoid)
    positions = block_positions(C, D, input.dtype, sigmoid)
    blocks_per_n = triton.cdiv(D, positions)
    lse_in = not sigmoid and num_chunks > 1
    if lse_in:  # many classes: chunks are programs, each reads the lse of the pre-pass
        lse = logsumexp_fwd(input)
    ws = torch.empty((N, blocks_per_n, C, NUM_SUMS), dtype=acc, device=input.device)
    grid = _check_grid((N * blocks_per_n * num_chunks,), "dice_fwd")
    report = _INTERPRETED and not sigmoid
    err = _error_buffer(input.device, report)
    with _quiet():
        _dice_fwd_kernel[grid](
            input, input.stride(0), input.stride(1), input.stride(2),
            target, *_target_strides(target, sigmoid),
            lse if not sigmoid else ws,  # unused pointer in sigmoid mode
            ws,
            err,
            C, D, blocks_per_n, num_chunks, positions // block_rows,
            int(ignore_index),
            ACC_DTYPE=_tl_acc(input.dtype),
            BLOCK_ROWS=block_rows,
            BLOCK_C=block_c,
            SIGMOID=bool(sigmoid),
            SQUARED_PRED=bool(squared_pred),
            WITH_CE=bool(with_ce),
            WITH_SMOOTHING=bool(with_smoothing),
            LSE_IN=lse_in,
            REPORT_ERRORS=report,
            num_warps=num_warps,
            sanitize_overflow=False,
        )
    _raise_if_error(err, lambda: _bad_target_error(target, ignore_index, C))
    # The blocks of each n, added in one fixed order (torch's reduction: deterministic).
    sums = ws[:, 0] if blocks_per_n == 1 else ws.sum(dim=1)
    return sums.contiguous(), lse


def dice_bwd(grad_sums, input, target, lse, ignore_index: int, sigmoid: bool,
             squared_pred: bool, with_ce: bool, with_smoothing: bool):
    """d(sum(grad_sums * sums))/d(input): input's shape and dtype, input's strides when input is
    non-overlapping and dense (torch.empty_like), else contiguous. An empty ``lse`` (softmax
    mode): the logsumexp is recomputed, from the registers when one tile holds every class, else
    by the skeleton's pre-pass (a transient N*D, at most 1.6% of bf16 logits past 128 classes)."""
    _check_args(input, target, sigmoid, with_ce, with_smoothing, "dice_bwd")
    N, C, D = input.shape
    acc = _acc_dtype(input.dtype)
    if grad_sums.shape != (N, C, NUM_SUMS):
        raise ValueError(f"dice_bwd: grad_sums must have shape {(N, C, NUM_SUMS)}, got "
                         f"{tuple(grad_sums.shape)}")
    if not sigmoid and lse.numel() != 0 and lse.shape != (N, D):
        raise ValueError(f"dice_bwd: lse must have shape {(N, D)}, got {tuple(lse.shape)}")
    grad = torch.empty_like(input)
    if N * C * D == 0:
        return grad
    gs = grad_sums.to(acc).contiguous()
    block_c, num_chunks, block_rows, num_warps = _tiles(C, D, input.dtype, sigmoid, False)
    lse_saved = sigmoid or lse.numel() != 0
    if not lse_saved and num_chunks > 1:  # too many classes for one tile: the pre-pass
        lse, lse_saved = logsumexp_fwd(input), True
    lse = lse.to(acc).contiguous() if not sigmoid and lse.numel() else gs  # unused pointer
    tiles_per_n = triton.cdiv(D, block_rows)
    grid_chunks = num_chunks if sigmoid else 1
    grid = _check_grid((N * tiles_per_n * grid_chunks,), "dice_bwd")
    report = _INTERPRETED and not sigmoid
    err = _error_buffer(input.device, report)
    with _quiet():
        _dice_bwd_kernel[grid](
            gs,
            input, input.stride(0), input.stride(1), input.stride(2),
            target, *_target_strides(target, sigmoid),
            lse,
            grad, grad.stride(0), grad.stride(1), grad.stride(2),
            err,
            C, D, tiles_per_n, grid_chunks,
            int(ignore_index),
            ACC_DTYPE=_tl_acc(input.dtype),
            BLOCK_ROWS=block_rows,
            BLOCK_C=block_c,
            ONE_CHUNK=num_chunks == 1,
            SIGMOID=bool(sigmoid),
            SQUARED_PRED=bool(squared_pred),
            WITH_CE=bool(with_ce),
            WITH_SMOOTHING=bool(with_smoothing),
            REPORT_ERRORS=report,
            EMULATE_RTNE=_INTERPRETED,
            LSE_SAVED=lse_saved,
            num_warps=num_warps,
            sanitize_overflow=False,
        )
    _raise_if_error(err, lambda: _bad_target_error(target, ignore_index, C))
    return grad
