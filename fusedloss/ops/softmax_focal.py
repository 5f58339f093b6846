"""torch.library custom op for the softmax focal loss: schema, fake kernel, autograd, routing.

The op works on the canonical (N, C, D) view prepared by ``fusedloss.functional.softmax_focal_loss``
and returns the per-row loss (``reduce=False``) or the sums of fixed blocks of rows
(``reduce=True``: 'mean' and 'sum', without a per-row tensor; the blocks are those of
csrc/include/fusedloss/row_blocks.h, ``_common.loss_blocks``), each row's loss times
``loss_scale``. As for cross-entropy, the gradient is computed in the forward (no saved softmax,
no one-hot), so the backward is ``times_upstream``: nothing at all for the scalar 1 of
``loss.backward()``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _ext
from ._common import (
    acc_dtype,
    check_first_order,
    is_uniform,
    loss_blocks,
    rows_from_blocks,
    times_upstream,
)


@torch.library.custom_op("fusedloss::softmax_focal_fwd", mutates_args=())
def softmax_focal_fwd(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    loss_scale: Optional[Tensor],
    gamma: float,
    ignore_index: int,
    reduce: bool,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    k = _backend.kernels("softmax_focal", backend)
    return k.softmax_focal_fwd(input, target, weight, loss_scale, gamma, ignore_index, reduce,
                               compute_grad)


def _fwd_fake(input, target, weight, loss_scale, gamma, ignore_index, reduce, compute_grad,
              backend=None):
    n, c, d = input.shape
    shape = (loss_blocks(n, c, d),) if reduce else (n, d)
    loss = input.new_empty(shape, dtype=acc_dtype(input.dtype))
    grad = input.new_empty(input.shape if compute_grad else (0,))
    return loss, grad


softmax_focal_fwd.register_fake(_fwd_fake)


def _setup_context(ctx, inputs, output):
    input, target, _, _, _, ignore_index, reduce, compute_grad, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.shape = tuple(input.shape)
    ctx.ignore_index = ignore_index
    ctx.reduce = reduce
    ctx.computed_grad = compute_grad
    ctx.backend = backend
    ctx.save_for_backward(output[1], target)


def _backward(ctx, grad_loss, grad_grad):
    if grad_loss is None:
        return (None,) * 9
    if not ctx.computed_grad and ctx.needs_input_grad[0]:
        raise RuntimeError("fusedloss.softmax_focal_loss: input needs a gradient but the forward "
                           "ran without compute_grad")
    check_first_order("softmax_focal_loss")
    grad, target = ctx.saved_tensors
    n, c, d = ctx.shape
    if ctx.reduce:
        if grad_loss.numel() == 0:
            return (grad,) + (None,) * 8
        if is_uniform(grad_loss):  # loss.backward() of the block sums' sum: one scalar
            grad_loss = grad_loss.reshape(-1)[:1].reshape(1, 1).expand(n, d)
        else:
            grad_loss = rows_from_blocks(grad_loss, n, c, d)
    if not is_uniform(grad_loss):
        # Per-row upstream: ignored rows get exactly 0, whatever their upstream value.
        grad_loss = torch.where(target == ctx.ignore_index, 0, grad_loss)
    return (times_upstream(grad, grad_loss, ctx.backend, inplace=False),) + (None,) * 8


softmax_focal_fwd.register_autograd(_backward, setup_context=_setup_context)


if _ext.available() and hasattr(torch.ops.fusedloss_C, "softmax_focal_fwd"):
    torch.library.register_fake("fusedloss_C::softmax_focal_fwd", _fwd_fake)
