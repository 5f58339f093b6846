"""Total variation (docs/KERNELS.md, "Stencil" and "Total variation"): the Triton stencil.

Images (P, Q, H, W) with any strides, a weight of the same shape read by stride (0 where it is
broadcast). A program owns a BLOCK_H x BLOCK_W tile of one image; the terms that start at each
pixel of the tile read the pixel, its lower and its right neighbour (the one-pixel halo below and
right), and, for the gradient, the terms that start at the upper and left neighbours are
recomputed (the halo above and left), so every program writes its tile of the gradient on its own:

    g[i, j] = scale * (fv[i-1, j] + fh[i, j-1] - fv[i, j] - fh[i, j])

with the fluxes fv, fh of csrc/include/fusedloss/tv.h (l1: w sgn(d), sgn(0) = 0; l2_squared:
2 w d; isotropic: w d / n, 0 where n = 0). Each program sums its tile's terms (times scale) into
its own slot of a partial buffer; the launcher adds an image's tiles in tile order (a fixed-shape
torch sum), so the loss is reproducible without float atomics. Offsets are 64-bit; all math in
float32 (float64 for float64 images). The grid is 1-D: (P * Q * tiles) programs, checked against
CUDA's limit.
"""

import torch
import triton
import triton.language as tl

from ._common import _INTERPRETED, _check_device, _check_grid, _quiet, _store_rounded, _tl_acc

__all__ = ["tv_fwd"]

_TILE = 2048        # pixels per program (BLOCK_H x BLOCK_W); half that for float64 (no spills)
_MAX_BLOCK_W = 256  # columns per program: 128-bit rows of float32 for 64 threads
_NUM_WARPS = 4


@triton.jit
def _tv_terms(x_ptr, x_base, x_stride_h, x_stride_w, w_ptr, w_base, w_stride_h, w_stride_w,
              r, c, H, W, eps,
              NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(loss, fv, fh) of the terms that start at pixels (r, c) (int64 tiles); 0 outside."""
    inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
    has_down = inside & (r + 1 < H)
    has_right = inside & (c + 1 < W)
    off = x_base + r * x_stride_h + c * x_stride_w
    x0 = tl.load(x_ptr + off, mask=inside, other=0.0).to(ACC_DTYPE)
    xd = tl.load(x_ptr + off + x_stride_h, mask=has_down, other=0.0).to(ACC_DTYPE)
    xr = tl.load(x_ptr + off + x_stride_w, mask=has_right, other=0.0).to(ACC_DTYPE)
    dv = tl.where(has_down, xd - x0, 0.0)
    dh = tl.where(has_right, xr - x0, 0.0)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + w_base + r * w_stride_h + c * w_stride_w, mask=inside,
                    other=0.0).to(ACC_DTYPE)
    else:
        w = tl.where(inside, 1.0, 0.0).to(ACC_DTYPE)
    if NORM == 0:  # l1: fluxes w sgn(d), sgn(0) = 0, NaN kept
        loss = w * (tl.abs(dv) + tl.abs(dh))
        fv = w * tl.where(dv > 0, 1.0, tl.where(dv < 0, -1.0, dv))
        fh = w * tl.where(dh > 0, 1.0, tl.where(dh < 0, -1.0, dh))
    elif NORM == 1:  # l2_squared
        loss = w * (dv * dv + dh * dh)
        fv = 2.0 * w * dv
        fh = 2.0 * w * dh
    else:  # isotropic
        n = tl.sqrt(dv * dv + dh * dh + eps)
        loss = w * n
        coef = tl.where(n == 0.0, 0.0, w / tl.where(n == 0.0, 1.0, n))
        fv = coef * dv
        fh = coef * dh
    return loss, fv, fh


@triton.jit
def _tv_fwd_kernel(
    x_ptr, x_stride_p, x_stride_q, x_stride_h, x_stride_w,
    w_ptr, w_stride_p, w_stride_q, w_stride_h, w_stride_w,
    grad_ptr, grad_stride_p, grad_stride_q, grad_stride_h, grad_stride_w,
    partial_ptr,
    Q, H, W, tiles_h, tiles_w, eps, scale,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tiles = tiles_h * tiles_w
    b = pid // tiles
    t = pid % tiles
    p = b // Q
    q = b % Q
    r = (t // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)[:, None]
    c = (t % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)[None, :]
    x_base = p * x_stride_p + q * x_stride_q
    w_base = p * w_stride_p + q * w_stride_q
    loss, fv, fh = _tv_terms(x_ptr, x_base, x_stride_h, x_stride_w, w_ptr, w_base, w_stride_h,
                             w_stride_w, r, c, H, W, eps, NORM, HAS_WEIGHT, ACC_DTYPE)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(loss, axis=1), axis=0) * scale)
    if COMPUTE_GRAD:
        _, fv_up, _ = _tv_terms(x_ptr, x_base, x_stride_h, x_stride_w, w_ptr, w_base,
                                w_stride_h, w_stride_w, r - 1, c, H, W, eps, NORM, HAS_WEIGHT,
                                ACC_DTYPE)
        _, _, fh_left = _tv_terms(x_ptr, x_base, x_stride_h, x_stride_w, w_ptr, w_base,
                                  w_stride_h, w_stride_w, r, c - 1, H, W, eps, NORM, HAS_WEIGHT,
                                  ACC_DTYPE)
        g = ((fv_up - fv) + (fh_left - fh)) * scale
        g_off = (p * grad_stride_p + q * grad_stride_q + r * grad_stride_h + c * grad_stride_w)
        _store_rounded(grad_ptr + g_off, g, (r < H) & (c < W), EMULATE_RTNE)


def _blocks(H, W, dtype):
    """(BLOCK_H, BLOCK_W): up to _MAX_BLOCK_W columns, _TILE pixels (float64: half), no wider or
    taller than the image needs (powers of two)."""
    tile = _TILE // 2 if dtype == torch.float64 else _TILE
    block_w = min(triton.next_power_of_2(max(W, 1)), _MAX_BLOCK_W)
    block_h = min(triton.next_power_of_2(max(H, 1)), max(1, tile // block_w))
    return block_h, block_w


def tv_fwd(input, weight, norm, eps, loss_scale, compute_grad):
    """The device op of docs/KERNELS.md: input (P, Q, H, W), any strides; weight None or of the
    input's shape (stride 0 where broadcast), any floating dtype; returns the per-image loss
    (P, Q) in the accumulation dtype, times loss_scale, and the gradient of its sum (contiguous,
    input's dtype) or an empty tensor."""
    if input.dim() != 4:
        raise ValueError(f"tv_fwd: input must be (P, Q, H, W), got shape {tuple(input.shape)}")
    if weight is not None and weight.shape != input.shape:
        raise ValueError(f"tv_fwd: weight must have input's shape {tuple(input.shape)} "
                         f"(expanded), got {tuple(weight.shape)}")
    if norm not in (0, 1, 2):
        raise ValueError(f"tv_fwd: norm must be 0, 1 or 2, got {norm}")
    _check_device(input, "tv_fwd")
    P, Q, H, W = input.shape
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    grad = (torch.empty((P, Q, H, W), dtype=input.dtype, device=input.device) if compute_grad
            else input.new_empty((0,)))
    if P * Q == 0 or H * W == 0:
        return torch.zeros((P, Q), dtype=acc, device=input.device), grad
    block_h, block_w = _blocks(H, W, input.dtype)
    tiles_h, tiles_w = triton.cdiv(H, block_h), triton.cdiv(W, block_w)
    grid = _check_grid((P * Q * tiles_h * tiles_w,), "tv_fwd")
    partial = torch.empty(grid[0], dtype=acc, device=input.device)
    w = input if weight is None else weight
    gs = grad.stride() if compute_grad else (0, 0, 0, 0)
    with _quiet():
        _tv_fwd_kernel[grid](
            input, *input.stride(),
            w, *(w.stride() if weight is not None else (0, 0, 0, 0)),
            grad, *gs,
            partial,
            Q, H, W, tiles_h, tiles_w, float(eps), float(loss_scale),
            NORM=norm,
            HAS_WEIGHT=weight is not None,
            COMPUTE_GRAD=compute_grad,
            ACC_DTYPE=_tl_acc(input.dtype),
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            EMULATE_RTNE=_INTERPRETED,
            num_warps=_NUM_WARPS,
        )
    return partial.view(P, Q, tiles_h * tiles_w).sum(-1), grad
