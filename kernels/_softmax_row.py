"""The softmax-row skeleton: the two passes over a row that every softmax loss shares, as
``@triton.jit`` helpers a loss kernel calls (cross-entropy is this skeleton plus its epilogue).

A row is one (n, d) position of an (N, C, D) input with any strides (``_common._row_tile``); the
skeleton walks its C logits in BLOCK_SIZE chunks (aligned head/body/tail when VEC > 1, see
``_common``), so a row never has to fit in one block.

Pass 1, ``_softmax_row_stats`` -> (m, s, omega, a), each (BLOCK_ROWS,):
  m = max_c xs_c (NaN if any logit is NaN) and s = sum_c exp(xs_c - m), by the online rule (s is
  moved to a new max by exp(m_old - m_new)); xs = softcap * tanh(x / softcap) with HAS_SOFTCAP.
  lse = m + log(s). With WSUM, also for column weights v_c (``_column_weights``):
  omega = sum_c v_c and a = sum_c v_c (m - xs_c), summed from non-negative terms relative to the
  running max and moved to a new max by a += omega (m_new - m), so that
  sum_c v_c (lse - xs_c) = a + omega log(s) does not cancel (cross_entropy.h: dev_rebase).
  v_c = w_c * (t_a * t_rc + t_b): w (HAS_W) a per-class vector, t (HAS_T) a per-element operand
  with the input's shape and its own strides, t_a, t_b only with T_AFFINE; v_c = 1 with neither.

Pass 2, ``_softmax_row_grad``: rereads the logits and stores, through the gradient's strides,
  g_c = scale * dxs_c/dx_c * (A p_c - cv * v_c)     p_c = exp((xs_c - m) - log s)
  with the column y of each row (TARGET_COL) replaced by g_y, and rows where keep is False
  (ZERO_ROWS) exactly 0. A, g_y, keep: (BLOCK_ROWS,); cv, scale: scalars. The loss chooses A,
  cv and g_y (cross-entropy: A = w_y (1 - ls) + ls/C sum w + 2 z w_y lse, cv = ls/C or 1 for
  probability targets; softmax focal: its own A and g_y, no v). In place (g_ptr = x_ptr, same
  strides) every element is read before it is overwritten.

Exactly what a new softmax loss writes: a kernel that gets its rows from ``_row_tile``, calls
``_softmax_row_stats``, computes its per-row loss and coefficients from (m, log s, omega, a) and
whatever it gathered (the target logit), stores the loss, and calls ``_softmax_row_grad``. The
lse-only kernel of ``logsumexp.py`` is the smallest example, ``cross_entropy.py`` the largest.
"""

import triton
import triton.language as tl

from ._common import (
    _body_chunk,
    _body_offsets,
    _body_stop,
    _edge_chunk,
    _report_error,
    _row_split,
    _store_rounded,
    _tanh,
)


@triton.jit
def _class_target(target_ptr, offs, row_mask, ignore_index, C, err_ptr,
                  REPORT_ERRORS: tl.constexpr):
    """Each row's class index y (int64), validated before it is used as an address:
    (y, ignored, y_ok), y_ok = the row exists and 0 <= y < C. Anything else than ignore_index
    outside [0, C) traps on the GPU (tl.device_assert; the kernel needs debug=True) or, under the
    interpreter, is recorded in the error buffer (REPORT_ERRORS). Call it first thing: the
    assertion is a function call, and values live across it would be saved to local memory."""
    y = tl.load(target_ptr + offs, mask=row_mask, other=ignore_index)
    ignored = y == ignore_index
    valid = (y >= 0) & (y < C)
    tl.device_assert(ignored | valid, "fusedloss: target out of bounds (0 <= target < C or "
                                      "ignore_index)")
    _report_error(err_ptr, (ignored | valid) == 0, y, REPORT_ERRORS)
    return y, ignored, valid & row_mask


@triton.jit
def _target_logit(x_ptr, x_row, x_stride_c, y, y_ok, softcap, ACC_DTYPE: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, EXPM1_TERMS: tl.constexpr):
    """xs_y per row (one gathered load; 0 where not y_ok)."""
    x_y = tl.load(x_ptr + x_row + tl.where(y_ok, y, 0) * x_stride_c, mask=y_ok,
                  other=0.0).to(ACC_DTYPE)
    if HAS_SOFTCAP:
        sc = tl.full([], softcap, ACC_DTYPE)
        x_y = sc * _tanh(x_y / sc, EXPM1_TERMS)
    return x_y


@triton.jit
def _load_logits(x_ptr, offs, mask, softcap, ACC_DTYPE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 EXPM1_TERMS: tl.constexpr):
    """The (softcapped) logits at offs in ACC_DTYPE; masked entries are -inf (they add nothing to
    a softmax, and their gradient is never stored)."""
    x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(ACC_DTYPE)
    if HAS_SOFTCAP:
        sc = tl.full([], softcap, ACC_DTYPE)
        x = tl.where(mask, sc * _tanh(x / sc, EXPM1_TERMS), float("-inf"))
    return x


@triton.jit
def _column_weights(w_ptr, cols, col_mask, t_ptr, t_offs, mask, t_a, t_b,
                    ACC_DTYPE: tl.constexpr, HAS_W: tl.constexpr, HAS_T: tl.constexpr,
                    T_AFFINE: tl.constexpr):
    """v_c = w_c * (t_a * t_rc + t_b) on the chunk, 0 where mask is False (see the module doc)."""
    if HAS_T:
        v = tl.load(t_ptr + t_offs, mask=mask, other=0.0).to(ACC_DTYPE)
        if T_AFFINE:
            v = tl.where(mask, t_a * v + t_b, 0.0)
        if HAS_W:
            v = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE) * v
    elif HAS_W:
        v = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    else:
        v = tl.where(col_mask, 1.0, 0.0).to(ACC_DTYPE)
    return v


@triton.jit
def _stats_update(m, s, omega, a, x, v, mask, WSUM: tl.constexpr):
    """One chunk of pass 1: the online max / exp-sum, and the rebased weighted sums."""
    # tl.max may drop NaN; a NaN logit still reaches s through exp(NaN - m).
    m_new = tl.maximum(m, tl.max(x, axis=1), propagate_nan=tl.PropagateNan.ALL)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: s stays 0
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    if WSUM:
        # m_new - x; a -inf logit is infinitely far (m_new may be -inf too).
        dist = tl.where(x == float("-inf"), float("inf"), m_new[:, None] - x)
        # To the new max only where there is weight and the max rose (0 * inf otherwise).
        a = tl.where((omega != 0.0) & (m_new > m), a + omega * (m_new - m), a)
        omega += tl.sum(v, axis=1)
        a += tl.sum(tl.where(mask, v * dist, 0.0), axis=1)
    return m_new, s, omega, a


@triton.jit
def _softmax_row_stats(
    x_ptr, x_row, x_stride_c, C, row_mask, softcap,
    w_ptr, t_ptr, t_row, t_stride_c, t_a, t_b,
    ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, VEC: tl.constexpr, T_VEC: tl.constexpr,
    EXPM1_TERMS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WSUM: tl.constexpr, HAS_W: tl.constexpr, HAS_T: tl.constexpr, T_AFFINE: tl.constexpr,
):
    """Pass 1 over the rows x_row (int64 element offsets, (BLOCK_ROWS,)): (m, s, omega, a).

    x_stride_c: the class stride (1 when VEC > 1). t_row / t_stride_c: the rows of t (HAS_T);
    T_VEC: VEC when t's rows are aligned like x's, else 1. Unused pointers may be anything."""
    head, body = _row_split(x_row, C, VEC)
    m = tl.full(x_row.shape, float("-inf"), ACC_DTYPE)
    s = tl.zeros(x_row.shape, ACC_DTYPE)
    omega = tl.zeros(x_row.shape, ACC_DTYPE)
    a = tl.zeros(x_row.shape, ACC_DTYPE)
    if VEC > 1:  # head and tail first: after the loop, ptxas saves registers around them
        e_cols, e_mask = _edge_chunk(head, body, C, row_mask, VEC)
        e_x = _load_logits(x_ptr, x_row[:, None] + e_cols, e_mask, softcap, ACC_DTYPE,
                           HAS_SOFTCAP, EXPM1_TERMS)
        e_v = e_x
        if WSUM:
            e_v = _column_weights(w_ptr, e_cols, e_mask, t_ptr,
                                  t_row[:, None] + e_cols * t_stride_c, e_mask, t_a, t_b,
                                  ACC_DTYPE, HAS_W, HAS_T, T_AFFINE)
        m, s, omega, a = _stats_update(m, s, omega, a, e_x, e_v, e_mask, WSUM)
    for k in range(0, _body_stop(body, C, VEC), BLOCK_SIZE):
        cols, j, col_mask, mask = _body_chunk(k, head, body, C, row_mask, BLOCK_SIZE, VEC)
        x = _load_logits(x_ptr, _body_offsets(x_row, head, j, cols, x_stride_c, VEC), mask,
                         softcap, ACC_DTYPE, HAS_SOFTCAP, EXPM1_TERMS)
        v = x
        if WSUM:
            v = _column_weights(w_ptr, cols, col_mask, t_ptr,
                                _body_offsets(t_row, head, j, cols, t_stride_c, T_VEC), mask,
                                t_a, t_b, ACC_DTYPE, HAS_W, HAS_T, T_AFFINE)
        m, s, omega, a = _stats_update(m, s, omega, a, x, v, mask, WSUM)
    return m, s, omega, a


@triton.jit
def _grad_values(x, v, cols, m, log_s, A, cv, y, g_y, keep, scale, softcap,
                 ACC_DTYPE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SUB_V: tl.constexpr,
                 TARGET_COL: tl.constexpr, ZERO_ROWS: tl.constexpr):
    """The gradient of one chunk (see _softmax_row_grad)."""
    g = A[:, None] * tl.exp((x - m[:, None]) - log_s[:, None])
    if SUB_V:
        g = g - cv * v
    if TARGET_COL:
        g = tl.where(cols == y[:, None], g_y[:, None], g)
    if HAS_SOFTCAP:  # d(sc tanh(x / sc))/dx = 1 - tanh^2, and xs / sc is that tanh
        u = x / tl.full([], softcap, ACC_DTYPE)
        g = g * (1.0 - u * u)
    g = g * scale
    if ZERO_ROWS:
        g = tl.where(keep[:, None], g, 0.0)
    return g


@triton.jit
def _softmax_row_grad(
    x_ptr, x_row, x_stride_c, g_ptr, g_row, g_stride_c, C, row_mask, softcap,
    m, log_s, A, cv, y, g_y, keep, scale,
    w_ptr, t_ptr, t_row, t_stride_c, t_a, t_b,
    ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, VEC: tl.constexpr, T_VEC: tl.constexpr,
    G_VEC: tl.constexpr, EXPM1_TERMS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SUB_V: tl.constexpr, HAS_W: tl.constexpr, HAS_T: tl.constexpr, T_AFFINE: tl.constexpr,
    TARGET_COL: tl.constexpr, ZERO_ROWS: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    """Pass 2: store g_c = scale * dxs_c/dx_c * (A p_c - cv * v_c) of every column of the rows,
    g_y at column y (TARGET_COL), 0 on rows where keep is False (ZERO_ROWS), in g_ptr's dtype
    through g_row / g_stride_c (G_VEC: VEC when g's rows are aligned like x's, else 1). m, log_s
    are pass 1's; v_c as in pass 1 (only with SUB_V)."""
    head, body = _row_split(x_row, C, VEC)
    if VEC > 1:  # head and tail first, as in pass 1
        e_cols, e_mask = _edge_chunk(head, body, C, row_mask, VEC)
        e_x = _load_logits(x_ptr, x_row[:, None] + e_cols, e_mask, softcap, ACC_DTYPE,
                           HAS_SOFTCAP, EXPM1_TERMS)
        e_v = e_x
        if SUB_V:
            e_v = _column_weights(w_ptr, e_cols, e_mask, t_ptr,
                                  t_row[:, None] + e_cols * t_stride_c, e_mask, t_a, t_b,
                                  ACC_DTYPE, HAS_W, HAS_T, T_AFFINE)
        e_g = _grad_values(e_x, e_v, e_cols, m, log_s, A, cv, y, g_y, keep, scale, softcap,
                           ACC_DTYPE, HAS_SOFTCAP, SUB_V, TARGET_COL, ZERO_ROWS)
        _store_rounded(g_ptr + g_row[:, None] + e_cols * g_stride_c, e_g, e_mask, EMULATE_RTNE)
    for k in range(0, _body_stop(body, C, VEC), BLOCK_SIZE):
        cols, j, col_mask, mask = _body_chunk(k, head, body, C, row_mask, BLOCK_SIZE, VEC)
        x = _load_logits(x_ptr, _body_offsets(x_row, head, j, cols, x_stride_c, VEC), mask,
                         softcap, ACC_DTYPE, HAS_SOFTCAP, EXPM1_TERMS)
        v = x
        if SUB_V:
            v = _column_weights(w_ptr, cols, col_mask, t_ptr,
                                _body_offsets(t_row, head, j, cols, t_stride_c, T_VEC), mask,
                                t_a, t_b, ACC_DTYPE, HAS_W, HAS_T, T_AFFINE)
        g = _grad_values(x, v, cols, m, log_s, A, cv, y, g_y, keep, scale, softcap, ACC_DTYPE,
                         HAS_SOFTCAP, SUB_V, TARGET_COL, ZERO_ROWS)
        _store_rounded(g_ptr + _body_offsets(g_row, head, j, cols, g_stride_c, G_VEC), g, mask,
                       EMULATE_RTNE)


def loss_block_rows(C, D):
    """Rows per block of the reduced output ('mean' / 'sum' as block sums of the rows' losses, no
    per-row tensor): the Python copy of csrc/include/fusedloss/row_blocks.h for the launchers (a
    power of two, 1024 up to 64 classes, about 64K logits a block, at least 64 when D > 1). A
    kernel's program owns one block: D == 1, K consecutive rows along n; D > 1, K consecutive d
    of one n."""
    k = 1024
    while k > 1 and k * C > 65536:
        k >>= 1
    if D > 1 and k < 64:
        k = 64
    return k
