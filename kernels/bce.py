"""BCE-with-logits in Triton: ``bce_fwd``, torch's binary_cross_entropy_with_logits per element on
the elementwise skeleton (``_elementwise``), with the C++ schema's arguments and results
(docs/KERNELS.md). Per element (csrc/include/fusedloss/bce.h, the same rewriting):
loss = w [(1 - t) softplus(x) + pw t softplus(-x)], grad = w [(1 - t) sigmoid(x) - pw t sigmoid(-x)]
times the 'mean' factor; weight and pos_weight read by stride."""

import triton
import triton.language as tl

from ._common import _INTERPRETED, _check_device, _quiet, _store_rounded, _tl_acc
from ._elementwise import _ew_index, _ew_load, _logistic, ew_grid, ew_layout, ew_outputs, ew_result

__all__ = ["bce_fwd"]


@triton.jit
def _bce_fwd_kernel(
    x_ptr, t_ptr, w_ptr, pw_ptr, loss_ptr, grad_ptr, partial_ptr,
    numel, num_tiles, size1, size2, size3,
    x_stride0, x_stride1, x_stride2, x_stride3,
    t_stride0, t_stride1, t_stride2, t_stride3,
    w_stride0, w_stride1, w_stride2, w_stride3,
    pw_stride0, pw_stride1, pw_stride2, pw_stride3,
    grad_scale,
    ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_W: tl.constexpr, HAS_PW: tl.constexpr,
    X_FLAT: tl.constexpr, T_FLAT: tl.constexpr, W_FLAT: tl.constexpr, PW_FLAT: tl.constexpr,
    NEED_INDEX: tl.constexpr, WRITE_LOSS: tl.constexpr, REDUCE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_SIZE], ACC_DTYPE)
    for tile in range(pid.to(tl.int64), num_tiles, tl.num_programs(0)):
        idx = tile * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = idx < numel
        i0, i1, i2, i3 = _ew_index(idx, size1, size2, size3, NEED_INDEX)
        x = _ew_load(x_ptr, idx, i0, i1, i2, i3, x_stride0, x_stride1, x_stride2, x_stride3,
                     mask, X_FLAT, ACC_DTYPE)
        t = _ew_load(t_ptr, idx, i0, i1, i2, i3, t_stride0, t_stride1, t_stride2, t_stride3,
                     mask, T_FLAT, ACC_DTYPE)
        _, _, _, _, sig_pos, sig_neg, sp_pos, sp_neg = _logistic(x)
        a = 1.0 - t
        b = t
        if HAS_PW:
            pw = _ew_load(pw_ptr, idx, i0, i1, i2, i3, pw_stride0, pw_stride1, pw_stride2,
                          pw_stride3, mask, PW_FLAT, ACC_DTYPE)
            b = pw * t
        loss = a * sp_pos + b * sp_neg
        grad = tl.where(x != x, x, a * sig_pos - b * sig_neg) * grad_scale
        if HAS_W:
            w = _ew_load(w_ptr, idx, i0, i1, i2, i3, w_stride0, w_stride1, w_stride2, w_stride3,
                         mask, W_FLAT, ACC_DTYPE)
            loss = w * loss
            grad = w * grad
        if WRITE_LOSS:
            _store_rounded(loss_ptr + idx, loss, mask, EMULATE_RTNE)
        if COMPUTE_GRAD:
            _store_rounded(grad_ptr + idx, grad, mask, EMULATE_RTNE)
        if REDUCE:
            acc += tl.where(mask, loss, 0.0)
    if REDUCE:
        tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


def bce_fwd(input, target, weight, pos_weight, loss_scale, reduction, compute_grad):
    """(loss, grad) as csrc/registration.cpp's bce_fwd: 'none' the per-element loss (input's
    shape and dtype), 'mean'/'sum' a 0-d float32 (float64) sum times loss_scale; grad
    d(sum of loss)/d(input) times loss_scale (contiguous, input's dtype) or an empty tensor."""
    _check_device(input, "bce_fwd")
    if target.shape != input.shape:
        raise ValueError(f"bce_fwd: target must have the input's shape {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}")
    numel = input.numel()
    grid, num_tiles, block = ew_grid(numel, input.device, "bce_fwd")
    loss, grad, partial = ew_outputs(input, reduction, compute_grad, grid)
    if numel:
        (x, t, w, pw), sizes, strides, flat, need_index = ew_layout(
            input, [target, weight, pos_weight])
        with _quiet():
            _bce_fwd_kernel[grid](
                x, t, w if w is not None else x, pw if pw is not None else x,
                loss if loss is not None else x, grad, partial if partial is not None else x,
                numel, num_tiles, sizes[1], sizes[2], sizes[3],
                *strides[0], *strides[1], *strides[2], *strides[3],
                float(loss_scale),
                ACC_DTYPE=_tl_acc(input.dtype), BLOCK_SIZE=block,
                HAS_W=w is not None, HAS_PW=pw is not None,
                X_FLAT=flat[0], T_FLAT=flat[1], W_FLAT=flat[2], PW_FLAT=flat[3],
                NEED_INDEX=need_index, WRITE_LOSS=reduction == 0, REDUCE=reduction != 0,
                COMPUTE_GRAD=bool(compute_grad), EMULATE_RTNE=_INTERPRETED,
                num_warps=4,
            )
    elif partial is not None:
        partial.zero_()
    return ew_result(input, loss, grad, partial, loss_scale)
