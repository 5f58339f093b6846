"""Row logsumexp of (N, C, D) logits: the softmax-row skeleton's pass 1 alone.

``logsumexp_fwd(input, softcap=0.0)`` -> lse (N, D) in the accumulation dtype (float32; float64 for
float64 input), lse = logsumexp over C of the (softcapped) logits, one read of the input: the lse
``cross_entropy_fwd`` returns (to rounding: their block sizes may differ), without its loss and
target work. NaN in a row gives
NaN, a row of -inf (or C == 0) gives -inf; a +inf logit gives NaN (torch.logsumexp: inf; the
cross-entropy of such a row is NaN either way). The vocab-parallel cross-entropy needs exactly
this of each rank's slice (fusedloss/distributed.py).
"""

import torch
import triton
import triton.language as tl

from ._common import (
    _acc_dtype,
    _check_device,
    _check_grid,
    _expm1_terms,
    _quiet,
    _row_tile,
    _row_view,
    _row_walk,
    _tiles,
    _tl_acc,
)
from ._softmax_row import _softmax_row_stats

__all__ = ["logsumexp_fwd"]


@triton.jit
def _logsumexp_fwd_kernel(
    x_ptr, x_offset, x_stride_n, x_stride_c, x_stride_d,
    lse_ptr,
    C, D, num_row_blocks,
    softcap: tl.float64,
    ACC_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    VEC: tl.constexpr,
    EXPM1_TERMS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    n, d, row_mask = _row_tile(num_row_blocks, D, BLOCK_ROWS)
    x_row = x_offset + n * x_stride_n + d * x_stride_d
    m, s, _, _ = _softmax_row_stats(
        x_ptr, x_row, x_stride_c, C, row_mask, softcap,
        x_ptr, x_ptr, x_row, x_stride_c, 0.0, 0.0,  # no column weights
        ACC_DTYPE, BLOCK_SIZE, VEC, 1, EXPM1_TERMS, HAS_SOFTCAP, False, False, False, False)
    tl.store(lse_ptr + n * D + d, m + tl.log(s), mask=row_mask)


def logsumexp_fwd(input, softcap: float = 0.0):
    """lse (N, D) of input (N, C, D), any strides, in the accumulation dtype."""
    if input.dim() != 3:
        raise ValueError(f"logsumexp: input must be (N, C, D), got shape {tuple(input.shape)}")
    N, C, D = input.shape
    _check_device(input, "logsumexp")
    lse = torch.empty((N, D), dtype=_acc_dtype(input.dtype), device=input.device)
    if N * D == 0:
        return lse
    rows_n, rows_d = (1, N) if D == 1 else (N, D)
    xs = _row_view(N, D, input.stride(0), input.stride(2))
    x, x_off, vec = _row_walk(input, C, xs, input.stride(1))
    # 8192 (16 warps): 16384 at 32 warps spills on sm_80 (.ci/check_triton.py); 4096 for float64.
    block, block_rows, num_warps = _tiles(C, rows_d, 4096 if input.dtype == torch.float64 else 8192)
    num_row_blocks = triton.cdiv(rows_d, block_rows)
    grid = _check_grid((rows_n * num_row_blocks,), "logsumexp")
    with _quiet():
        _logsumexp_fwd_kernel[grid](
            x, x_off, xs[0], input.stride(1), xs[1],
            lse,
            C, rows_d, num_row_blocks,
            float(softcap),
            ACC_DTYPE=_tl_acc(input.dtype),
            BLOCK_SIZE=block,
            BLOCK_ROWS=block_rows,
            VEC=vec,
            EXPM1_TERMS=_expm1_terms(input.dtype),
            HAS_SOFTCAP=softcap > 0.0,
            num_warps=num_warps,
        )
    return lse
