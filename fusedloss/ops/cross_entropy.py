"""torch.library custom ops for cross-entropy: schema, fake kernels, autograd, device routing.

The ops work on the canonical (N, C, D) view prepared by ``fusedloss.functional.cross_entropy`` and
return per-row results (docs/KERNELS.md). The gradient is computed in the forward kernel while the
row is hot in cache, so the backward is only a scale by the upstream gradient, which the kernel
skips when that is the scalar 1 (the usual ``loss.backward()`` of a 'mean' or 'sum' loss).

Two entry points:
- ``cross_entropy_fwd``: functional; returns a fresh gradient buffer, saved for backward.
- ``cross_entropy_fwd_inplace``: writes the gradient into ``input`` (declared mutation), wrapped in
  an autograd.Function since torch.library cannot attach autograd to a mutating op. A producer that
  saved the logits for its own backward then fails autograd's version check loudly instead of
  reading gradients as logits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _ext
from ._common import acc_dtype, check_first_order, is_uniform, times_upstream


def _row_shape(input: Tensor) -> tuple[int, int]:
    return (input.shape[0], input.shape[2])


@torch.library.custom_op("fusedloss::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    loss_scale: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    k = _backend.kernels("cross_entropy", backend)
    return k.cross_entropy_fwd(input, target, weight, loss_scale, ignore_index, label_smoothing,
                               z_loss, softcap, compute_grad)


def _fwd_fake(input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss, softcap,
              compute_grad, backend=None):
    acc = acc_dtype(input.dtype)
    loss = input.new_empty(_row_shape(input), dtype=acc)
    lse = input.new_empty(_row_shape(input), dtype=acc)
    grad = input.new_empty(input.shape if compute_grad else (0,))
    return loss, lse, grad


cross_entropy_fwd.register_fake(_fwd_fake)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    _save(ctx, output[2], inputs[1], inputs[4], inputs[-1], inputs[-2])


def _save(ctx, grad, target, ignore_index, backend, computed_grad):
    """What the backward needs: the gradient the forward computed, and (class-index targets) the
    target, to keep ignored rows at exactly 0 under a per-row upstream gradient."""
    ctx.backend = backend
    ctx.computed_grad = computed_grad
    ctx.ignore_index = ignore_index
    # Outputs without a gradient arrive as None, not as zeros of their size (the grad output is
    # as large as the logits: materialising its zero gradient cost more than the kernel).
    ctx.set_materialize_grads(False)
    index = not target.is_floating_point()
    ctx.index_target = index
    ctx.save_for_backward(grad, target if index else None)


def _grad_input(ctx, grad_loss: Tensor, *, inplace: bool) -> Tensor:
    """d(loss)/d(input) from the saved gradient and the upstream gradient of the per-row loss."""
    if grad_loss is None:
        return None
    check_first_order("cross_entropy")
    grad, target = ctx.saved_tensors
    if ctx.index_target and not is_uniform(grad_loss):
        # Per-row upstream ('none'): ignored rows get exactly 0, whatever their upstream value.
        grad_loss = torch.where(target == ctx.ignore_index, 0, grad_loss)
    return times_upstream(grad, grad_loss, ctx.backend, inplace=inplace)


def _backward(ctx, grad_loss, grad_lse, grad_grad):
    if grad_loss is None:
        return (None,) * 10
    if not ctx.computed_grad and ctx.needs_input_grad[0]:
        raise RuntimeError("fusedloss.cross_entropy: input needs a gradient but the forward ran "
                           "without compute_grad")
    return (_grad_input(ctx, grad_loss, inplace=False),) + (None,) * 9


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fusedloss::cross_entropy_fwd_inplace", mutates_args=("input",))
def cross_entropy_fwd_inplace(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    loss_scale: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    k = _backend.kernels("cross_entropy", backend)
    return k.cross_entropy_fwd_inplace(input, target, weight, loss_scale, ignore_index,
                                       label_smoothing, z_loss, softcap)


def _fwd_inplace_fake(input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss,
                      softcap, backend=None):
    acc = acc_dtype(input.dtype)
    return (input.new_empty(_row_shape(input), dtype=acc),
            input.new_empty(_row_shape(input), dtype=acc))


cross_entropy_fwd_inplace.register_fake(_fwd_inplace_fake)


class CrossEntropyEager(torch.autograd.Function):
    """``cross_entropy_fwd`` with compute_grad and its autograd, calling the backend's kernel
    directly: the same kernels and backward as the custom op, without torch.library's per-call
    Python cost (tens of microseconds: it decides small shapes). Eager only; under torch.compile
    the custom op is traced instead."""

    @staticmethod
    def forward(ctx, input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss,
                softcap, backend):
        loss, lse, grad = _backend.kernels("cross_entropy", backend).cross_entropy_fwd(
            input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss, softcap,
            True)
        ctx.mark_non_differentiable(lse)
        _save(ctx, grad, target, ignore_index, backend, True)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        return (_grad_input(ctx, grad_loss, inplace=False),) + (None,) * 8


class CrossEntropyInplace(torch.autograd.Function):
    """Forward writes d(loss)/d(input) into input's memory; backward scales it there."""

    @staticmethod
    def forward(ctx, input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss,
                softcap, backend):
        if torch.compiler.is_compiling():
            loss, lse = cross_entropy_fwd_inplace(input, target, weight, loss_scale, ignore_index,
                                                  label_smoothing, z_loss, softcap, backend)
        else:  # the kernel directly (see CrossEntropyEager), declaring the write to autograd
            loss, lse = _backend.kernels("cross_entropy", backend).cross_entropy_fwd_inplace(
                input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss, softcap)
            torch.autograd.graph.increment_version(input)
        ctx.mark_non_differentiable(lse)
        # Saved after the mutation: it holds the gradient now.
        _save(ctx, input, target, ignore_index, backend, True)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        return (_grad_input(ctx, grad_loss, inplace=True),) + (None,) * 8


# Fake kernels of fusedloss._C's ops (the device kernels, and the eager one-call ops of
# csrc/autograd/cross_entropy.cpp built on them), so that opcheck and tracers see their shapes.
# fusedloss.functional only calls the one-call ops outside torch.compile.
if _ext.available():
    torch.library.register_fake("fusedloss_C::cross_entropy_fwd", _fwd_fake)
    torch.library.register_fake("fusedloss_C::cross_entropy_fwd_inplace", _fwd_inplace_fake)

    def _loss_fake(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                   softcap, dtype):
        out_shape = () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])
        loss = input.new_empty(out_shape if reduction == 0 else (), dtype=dtype)
        return loss, input.new_empty(out_shape, dtype=acc_dtype(input.dtype))

    torch.library.register_fake("fusedloss_C::cross_entropy_loss", _loss_fake)
    torch.library.register_fake("fusedloss_C::cross_entropy_loss_inplace", _loss_fake)

    @torch.library.register_fake("fusedloss_C::cross_entropy_mean_factor")
    def _(target, weight, ignore_index, dtype):
        return target.new_empty((), dtype=dtype)
