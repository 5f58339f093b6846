"""torch.library custom ops for the Dice family (Dice, Tversky, Dice+CE): schema, fake kernels,
autograd, routing (docs/KERNELS.md, "dice").

The device ops compute only the per-(n, c) sums of csrc/include/fusedloss/dice.h, ``(N, C, 5)``:
I, P, G, NLL, SM. The loss is plain torch on those small tensors (``fusedloss.functional``), so
its autograd gives the upstream gradient of every sum, ``grad_sums``, and the backward op turns
that into the logits' gradient in one pass, recomputing p from the saved per-position logsumexp
(softmax) or from the logit (sigmoid). Unlike the per-row losses, the forward cannot write the
gradient: it depends on the global sums.

``fusedloss::dice_sums``           -> fusedloss_C.dice_fwd / kernels.dice.dice_fwd
``fusedloss::dice_sums_backward``  -> fusedloss_C.dice_bwd / kernels.dice.dice_bwd
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _ext
from ._common import acc_dtype, check_first_order

N_SUMS = 5  # I, P, G, NLL, SM: dice.h's DiceSum


@torch.library.custom_op("fusedloss::dice_sums", mutates_args=())
def dice_sums(
    input: Tensor,
    target: Tensor,
    ignore_index: int,
    sigmoid: bool,
    squared_pred: bool,
    with_ce: bool,
    with_smoothing: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(sums (N, C, 5), lse (N, D) or (0,)) of the canonical (N, C, D) logits, in the
    accumulation dtype."""
    k = _backend.kernels("dice", backend)
    return k.dice_fwd(input, target, ignore_index, sigmoid, squared_pred, with_ce, with_smoothing)


def _fwd_fake(input, target, ignore_index, sigmoid, squared_pred, with_ce, with_smoothing,
              backend=None):
    n, c, d = input.shape
    acc = acc_dtype(input.dtype)
    sums = input.new_empty((n, c, N_SUMS), dtype=acc)
    lse = input.new_empty((0,) if sigmoid else (n, d), dtype=acc)
    return sums, lse


dice_sums.register_fake(_fwd_fake)


@torch.library.custom_op("fusedloss::dice_sums_backward", mutates_args=())
def dice_sums_backward(
    grad_sums: Tensor,
    input: Tensor,
    target: Tensor,
    lse: Tensor,
    ignore_index: int,
    sigmoid: bool,
    squared_pred: bool,
    with_ce: bool,
    with_smoothing: bool,
    backend: str,
) -> Tensor:
    """d(sum(grad_sums * sums))/d(input): input's shape and dtype, input's strides when it is
    non-overlapping and dense (``torch.empty_like``), ignored positions exactly 0."""
    k = _backend.kernels("dice", backend)
    return k.dice_bwd(grad_sums, input, target, lse, ignore_index, sigmoid, squared_pred,
                      with_ce, with_smoothing)


def _bwd_fake(grad_sums, input, target, lse, ignore_index, sigmoid, squared_pred, with_ce,
              with_smoothing, backend=None):
    return torch.empty_like(input)


dice_sums_backward.register_fake(_bwd_fake)


def _no_lse(input: Tensor) -> Tensor:
    """The backward recomputes each position's logsumexp from the logits it reads anyway (every
    class of a position is in registers or a tile), so the forward's (N, D) lse is not kept:
    in bf16 with 14 classes it would be 14% of the logits, past the 10% budget for everything
    beyond the logits and their gradient (docs/KERNELS.md, "dice")."""
    return input.new_empty(0, dtype=acc_dtype(input.dtype))


def _setup_context(ctx, inputs, output):
    input, target, ignore_index, sigmoid, squared_pred, with_ce, with_smoothing, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.flags = (ignore_index, sigmoid, squared_pred, with_ce, with_smoothing, backend)
    ctx.save_for_backward(input, target)  # not the lse: see _no_lse


def _backward(ctx, grad_sums, grad_lse):
    if grad_sums is None or not ctx.needs_input_grad[0]:
        return (None,) * 8
    check_first_order("dice_loss")
    input, target = ctx.saved_tensors
    if not grad_sums.is_contiguous():  # e.g. expanded by the epilogue's autograd
        grad_sums = grad_sums.contiguous()
    grad = dice_sums_backward(grad_sums, input, target, _no_lse(input), *ctx.flags)
    return (grad,) + (None,) * 7


dice_sums.register_autograd(_backward, setup_context=_setup_context)


class DiceSumsEager(torch.autograd.Function):
    """:func:`dice_sums` and its autograd for eager calls, without the custom op's per-call
    dispatch (two custom ops cost more than the small shapes' kernels); under torch.compile the
    custom ops are traced instead. Same kernels, same backward."""

    @staticmethod
    def forward(ctx, input, target, ignore_index, sigmoid, squared_pred, with_ce, with_smoothing,
                backend):
        k = _backend.kernels("dice", backend)
        sums, lse = k.dice_fwd(input, target, ignore_index, sigmoid, squared_pred, with_ce,
                               with_smoothing)
        ctx.kernels = k
        ctx.flags = (ignore_index, sigmoid, squared_pred, with_ce, with_smoothing)
        ctx.save_for_backward(input, target)  # not the lse: see _no_lse
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        check_first_order("dice_loss")
        input, target = ctx.saved_tensors
        if not grad_sums.is_contiguous():
            grad_sums = grad_sums.contiguous()
        grad = ctx.kernels.dice_bwd(grad_sums, input, target, _no_lse(input), *ctx.flags)
        return (grad,) + (None,) * 7


if _ext.available() and hasattr(torch.ops.fusedloss_C, "dice_fwd"):
    torch.library.register_fake("fusedloss_C::dice_fwd", _fwd_fake)
if _ext.available() and hasattr(torch.ops.fusedloss_C, "dice_bwd"):
    torch.library.register_fake("fusedloss_C::dice_bwd", _bwd_fake)
