"""Sigmoid focal loss in Triton: ``sigmoid_focal_fwd``, torchvision's sigmoid_focal_loss per
element on the elementwise skeleton (``_elementwise``), with the C++ schema's arguments and
results (docs/KERNELS.md). The math is csrc/include/fusedloss/sigmoid_focal.h's, in log space:
q^gamma = exp(gamma log q) with log q from e = exp(-|x|) (never 0 before it is raised to gamma),
gamma == 0 compiled out (the factor 1 exactly), alpha < 0 compiled out; weight read by stride."""

import triton
import triton.language as tl

from ._common import _INTERPRETED, _check_device, _quiet, _store_rounded, _tl_acc
from ._elementwise import _ew_index, _ew_load, _logistic, ew_grid, ew_layout, ew_outputs, ew_result

__all__ = ["sigmoid_focal_fwd"]


@triton.jit
def _sigmoid_focal_fwd_kernel(
    x_ptr, t_ptr, w_ptr, loss_ptr, grad_ptr, partial_ptr,
    numel, num_tiles, size1, size2, size3,
    x_stride0, x_stride1, x_stride2, x_stride3,
    t_stride0, t_stride1, t_stride2, t_stride3,
    w_stride0, w_stride1, w_stride2, w_stride3,
    alpha, gamma, grad_scale,
    ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_W: tl.constexpr, HAS_ALPHA: tl.constexpr, FOCAL: tl.constexpr,
    X_FLAT: tl.constexpr, T_FLAT: tl.constexpr, W_FLAT: tl.constexpr,
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
        ax, e, l1p, r, sig_pos, sig_neg, sp_pos, sp_neg = _logistic(x)
        a = 1.0 - t
        ce = a * sp_pos + t * sp_neg
        grad = a * sig_pos - t * sig_neg
        loss = ce
        if FOCAL:
            pos = x >= 0.0
            c_big = tl.where(pos, a, t)
            c_small = tl.where(pos, t, a)
            u = c_big + c_small * e
            hard_side = c_big == 0.0
            u_safe = tl.where(hard_side, 1.0, u)
            log_q = tl.where(hard_side, -ax, tl.log(u_safe)) - l1p
            ratio = tl.where(hard_side, r, (e * r) / u_safe)
            f = tl.exp(gamma * log_q)
            loss = f * ce
            grad = f * (grad - gamma * (t - a) * ratio * ce)
        if HAS_ALPHA:
            at = alpha * t + (1.0 - alpha) * a
            loss = at * loss
            grad = at * grad
        grad = tl.where(x != x, x, grad) * grad_scale
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


def sigmoid_focal_fwd(input, target, weight, alpha, gamma, loss_scale, reduction, compute_grad):
    """(loss, grad) as csrc/registration.cpp's sigmoid_focal_fwd: 'none' the per-element loss
    (input's shape and dtype), 'mean'/'sum' a 0-d float32 (float64) sum times loss_scale; grad
    d(sum of loss)/d(input) times loss_scale (contiguous, input's dtype) or an empty tensor."""
    _check_device(input, "sigmoid_focal_fwd")
    if target.shape != input.shape:
        raise ValueError(f"sigmoid_focal_fwd: target must have the input's shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if not gamma >= 0:
        raise ValueError(f"sigmoid_focal_fwd: gamma must be >= 0, got {gamma}")
    numel = input.numel()
    grid, num_tiles, block = ew_grid(numel, input.device, "sigmoid_focal_fwd")
    loss, grad, partial = ew_outputs(input, reduction, compute_grad, grid)
    if numel:
        (x, t, w), sizes, strides, flat, need_index = ew_layout(input, [target, weight])
        with _quiet():
            _sigmoid_focal_fwd_kernel[grid](
                x, t, w if w is not None else x,
                loss if loss is not None else x, grad, partial if partial is not None else x,
                numel, num_tiles, sizes[1], sizes[2], sizes[3],
                *strides[0], *strides[1], *strides[2],
                float(alpha), float(gamma), float(loss_scale),
                ACC_DTYPE=_tl_acc(input.dtype), BLOCK_SIZE=block,
                HAS_W=w is not None, HAS_ALPHA=alpha >= 0, FOCAL=gamma != 0,
                X_FLAT=flat[0], T_FLAT=flat[1], W_FLAT=flat[2],
                NEED_INDEX=need_index, WRITE_LOSS=reduction == 0, REDUCE=reduction != 0,
                COMPUTE_GRAD=bool(compute_grad), EMULATE_RTNE=_INTERPRETED,
                num_warps=4,
            )
    elif partial is not None:
        partial.zero_()
    return ew_result(input, loss, grad, partial, loss_scale)
