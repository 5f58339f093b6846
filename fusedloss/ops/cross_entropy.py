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

from .. import _backend


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_shape(input: Tensor) -> tuple[int, int]:
    return (input.shape[0], input.shape[2])


@torch.library.custom_op("fusedloss::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    grad_scale: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    k = _backend.kernels("cross_entropy", backend)
    return k.cross_entropy_fwd(input, target, weight, grad_scale, ignore_index, label_smoothing,
                               z_loss, softcap, compute_grad)


@cross_entropy_fwd.register_fake
def _(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
      compute_grad, backend):
    acc = _acc_dtype(input.dtype)
    loss = input.new_empty(_row_shape(input), dtype=acc)
    lse = input.new_empty(_row_shape(input), dtype=acc)
    grad = input.new_empty(input.shape if compute_grad else (0,))
    return loss, lse, grad


def _setup_context(ctx, inputs, output):
    ctx.backend = inputs[-1]
    ctx.computed_grad = inputs[-2]
    # Outputs without a gradient arrive as None, not as zeros of their size (the grad output is
    # as large as the logits: materialising its zero gradient cost more than the kernel).
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[2])


def _is_uniform(grad_loss: Tensor) -> bool:
    """The upstream gradient of a 'mean' or 'sum' loss arrives expanded from one scalar."""
    return grad_loss.numel() <= 1 or all(st == 0 for st in grad_loss.stride())


def _scaled_grad(grad: Tensor, grad_loss: Tensor, backend: str, *, inplace: bool) -> Tensor:
    """grad * grad_loss broadcast over the class dim (grad: the gradient saved by the forward).

    A scalar upstream gradient of 1 (``loss.backward()``) costs nothing. Otherwise the saved
    gradient is left intact (so ``retain_graph`` and gradcheck's repeated backwards work) unless
    it already lives in the input's memory (``inplace``), or the upstream scalar sits on a GPU
    where reading it would be a host sync: then it is scaled in place, the kernel skipping a 1 on
    the device, and a second backward through the graph fails autograd's version check.
    """
    if torch.compiler.is_compiling() or type(grad_loss) is not torch.Tensor:
        # Traced (dynamo, or make_fx with fake/functional tensors): a functional multiply that
        # inductor fuses into one pass.
        return (grad * grad_loss.unsqueeze(1)).to(grad.dtype)
    uniform = _is_uniform(grad_loss)
    if grad_loss.device.type == "cpu" and uniform:
        s = grad_loss.reshape(-1)[:1]  # a host read, no device to wait for
        if s.numel() == 0 or s.item() == 1.0:
            return grad
    if inplace or (uniform and grad_loss.device.type != "cpu"):
        scale_grad_(grad, grad_loss, backend)
        return grad
    if grad.dtype == grad_loss.dtype:  # float32/float64: one pass, nothing promoted
        return grad * grad_loss.unsqueeze(1)
    # Half: a copy scaled by the kernel, float32 math rounded once, without the float32 temporary
    # of the size of the logits that a promoting `grad * grad_loss` would make.
    out = grad.clone()
    scale_grad_(out, grad_loss, backend)
    return out


def _backward(ctx, grad_loss, grad_lse, grad_grad):
    (grad,) = ctx.saved_tensors
    if not ctx.computed_grad and grad_loss is not None and ctx.needs_input_grad[0]:
        raise RuntimeError("fusedloss.cross_entropy: input needs a gradient but the forward ran "
                           "without compute_grad")
    dinput = (None if grad_loss is None
              else _scaled_grad(grad, grad_loss, ctx.backend, inplace=False))
    return dinput, None, None, None, None, None, None, None, None, None


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fusedloss::cross_entropy_fwd_inplace", mutates_args=("input",))
def cross_entropy_fwd_inplace(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    grad_scale: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    k = _backend.kernels("cross_entropy", backend)
    return k.cross_entropy_fwd_inplace(input, target, weight, grad_scale, ignore_index,
                                       label_smoothing, z_loss, softcap)


@cross_entropy_fwd_inplace.register_fake
def _(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap, backend):
    acc = _acc_dtype(input.dtype)
    return (input.new_empty(_row_shape(input), dtype=acc),
            input.new_empty(_row_shape(input), dtype=acc))


class CrossEntropyInplace(torch.autograd.Function):
    """Forward writes d(loss)/d(input) into input's memory; backward scales it there."""

    @staticmethod
    def forward(ctx, input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
                softcap, backend):
        loss, lse = cross_entropy_fwd_inplace(input, target, weight, grad_scale, ignore_index,
                                              label_smoothing, z_loss, softcap, backend)
        ctx.backend = backend
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(input)  # saved after the mutation: it holds the gradient now
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        (grad,) = ctx.saved_tensors
        return (_scaled_grad(grad, grad_loss, ctx.backend, inplace=True),) + (None,) * 8


@torch.library.custom_op("fusedloss::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: Tensor, grad_loss: Tensor, backend: str) -> None:
    _backend.kernels("cross_entropy", backend).scale_grad_(grad, grad_loss)


@scale_grad_.register_fake
def _(grad, grad_loss, backend):
    return None
