"""What every fusedloss op shares: the accumulation dtype, the first-derivative-only rule, and the
multiplication of a gradient saved by the forward with the upstream gradient.

Every fused loss computes ``d(loss)/d(input)`` in its forward kernel, while the data is in cache;
its backward is then only :func:`times_upstream` (nothing at all for the scalar 1 of
``loss.backward()``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import acc_dtype  # noqa: F401  (re-exported: the ops' fake kernels use it)
from .scale_grad import scale_grad_

NO_DOUBLE_BACKWARD = (
    "fusedloss.{op}: the fused kernels give first derivatives only; differentiating the gradient "
    "again (create_graph=True: double backward, hessian, gradient penalties) is not supported. "
    "Use backend='reference' (plain PyTorch, every derivative) for that computation.")


def check_first_order(op: str) -> None:
    """Raise the clear error of NO_DOUBLE_BACKWARD inside a backward run with create_graph=True
    (the engine runs a backward under grad mode only then)."""
    if torch.is_grad_enabled():
        raise RuntimeError(NO_DOUBLE_BACKWARD.format(op=op))


def is_uniform(grad_out: Tensor) -> bool:
    """The upstream gradient of a 'mean' or 'sum' loss arrives expanded from one scalar."""
    return grad_out.numel() <= 1 or all(st == 0 for st in grad_out.stride())


def times_upstream(grad: Tensor, grad_out: Tensor, backend: str, *, inplace: bool) -> Tensor:
    """``grad * grad_out`` broadcast over the class dim: grad (N, C, D) is the gradient the
    forward saved, grad_out (N, D) the upstream gradient of the per-row loss. An element of grad
    that is exactly 0 stays 0 (docs/KERNELS.md: scale_grad_), so ignored rows keep torch's 0
    under a NaN or inf upstream gradient.

    A scalar upstream gradient of 1 costs nothing. Otherwise the saved gradient is left intact (so
    ``retain_graph`` and gradcheck's repeated backwards work) unless it already lives in the
    input's memory (``inplace``), or the upstream scalar sits on a GPU where reading it would be a
    host sync: then it is scaled in place, the kernel skipping a 1 on the device, and a second
    backward through the graph fails autograd's version check.
    """
    if torch.compiler.is_compiling() or type(grad_out) is not torch.Tensor:
        # Traced (dynamo, or make_fx with fake/functional tensors): a functional multiply that
        # inductor fuses into one pass.
        scaled = (grad * grad_out.unsqueeze(1)).to(grad.dtype)
        return torch.where(grad == 0, grad, scaled)
    uniform = is_uniform(grad_out)
    finite = not uniform  # a per-row upstream arrives with its ignored rows already zeroed
    if grad_out.device.type == "cpu" and uniform:
        s = grad_out.reshape(-1)[:1]  # a host read, no device to wait for
        if s.numel() == 0:
            return grad
        s = s.item()
        if s == 1.0:
            return grad
        finite = math.isfinite(s)
    if inplace or (uniform and grad_out.device.type != "cpu"):
        scale_grad_(grad, grad_out, backend)
        return grad
    if grad.dtype == grad_out.dtype and finite:  # float32/float64: one pass, nothing promoted
        return grad * grad_out.unsqueeze(1)
    # Half, or a NaN/inf scalar: a copy scaled by the kernel (float32 math rounded once, no
    # float32 temporary of the logits' size; zeros stay zero).
    out = grad.clone()
    scale_grad_(out, grad_out, backend)
    return out


# Per-element losses (sigmoid focal, BCE-with-logits) ---------------------------------------


def times_upstream_elementwise(grad: Tensor, grad_out: Tensor, backend: str) -> Tensor:
    """:func:`times_upstream` for a per-element loss: ``grad`` (the input's shape, contiguous) is
    the gradient the forward saved, ``grad_out`` one scalar (a 'mean' or 'sum' loss; a scalar 1
    costs nothing) or one value per element ('none'). The same rules: float32 math rounded once,
    exactly-zero elements stay 0, the saved gradient left intact."""
    if grad.numel() == 0:
        return grad
    if grad_out.dim() == 0:  # reduced: (1, numel, 1) times one scalar
        return times_upstream(grad.view(1, -1, 1), grad_out.reshape(1, 1), backend,
                              inplace=False).view(grad.shape)
    # 'none': (numel, 1, 1) times one value per row
    return times_upstream(grad.view(-1, 1, 1), grad_out.reshape(-1, 1), backend,
                          inplace=False).view(grad.shape)


class ElementwiseLossEager(torch.autograd.Function):
    """A per-element loss kernel called with compute_grad, and its autograd: the backward is
    :func:`times_upstream_elementwise` of the gradient the forward computed. ``kernel(input,
    *args, compute_grad)`` returns (loss, grad). Eager only (no torch.library per-call cost);
    under torch.compile the loss's custom op is traced instead."""

    @staticmethod
    def forward(ctx, input, name, kernel, backend, *args):
        loss, grad = kernel(input, *args, True)
        ctx.name = name
        ctx.backend = backend
        ctx.nargs = len(args)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        check_first_order(ctx.name)
        (grad,) = ctx.saved_tensors
        return ((times_upstream_elementwise(grad, grad_loss, ctx.backend), None, None, None)
                + (None,) * ctx.nargs)


def elementwise_loss_fake(input: Tensor, reduction: int, compute_grad: bool):
    """The outputs of a per-element loss op: (loss, grad) as csrc/registration.cpp states them."""
    if reduction == 0:
        loss = input.new_empty(input.shape)
    else:
        loss = input.new_empty((), dtype=acc_dtype(input.dtype))
    grad = input.new_empty(input.shape if compute_grad else (0,))
    return loss, grad


def elementwise_loss_autograd(op, name: str, nargs: int) -> None:
    """Registers the autograd of a per-element loss custom op (outputs (loss, grad), the
    ``compute_grad`` argument second to last, the backend last)."""

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.computed_grad = inputs[-2]
        ctx.backend = inputs[-1]
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_loss, grad_grad):
        if grad_loss is None:
            return (None,) * nargs
        if not ctx.computed_grad and ctx.needs_input_grad[0]:
            raise RuntimeError(f"fusedloss.{name}: input needs a gradient but the forward ran "
                               "without compute_grad")
        check_first_order(name)
        (grad,) = ctx.saved_tensors
        return (times_upstream_elementwise(grad, grad_loss, ctx.backend),) + (None,) * (nargs - 1)

    op.register_autograd(backward, setup_context=setup_context)
def loss_block_rows(n_classes: int, d: int) -> int:
    """Rows per block of the softmax-row skeleton's reduced output (the block sums of the rows'
    losses that 'mean' and 'sum' use instead of one loss per row): the Python copy of
    csrc/include/fusedloss/row_blocks.h, for fake kernels and backward passes (the Triton kernels
    keep their own, kernels/_softmax_row.py; tests check that all agree)."""
    k = 1024
    while k > 1 and k * n_classes > 65536:
        k >>= 1
    if d > 1 and k < 64:
        k = 64
    return k


def loss_blocks(n: int, n_classes: int, d: int) -> int:
    """The number of blocks of an (n, n_classes, d) input's reduced output (row_blocks.h): along
    n when d == 1, else per n along d."""
    k = loss_block_rows(n_classes, d)
    return -(-n // k) if d == 1 else n * -(-d // k)


def rows_from_blocks(grad_blocks: Tensor, n: int, n_classes: int, d: int) -> Tensor:
    """The (n, d) per-row upstream gradient of a block-summed loss: each row gets its block's."""
    k = loss_block_rows(n_classes, d)
    if d == 1:
        return grad_blocks.repeat_interleave(k)[:n].reshape(n, 1)
    return grad_blocks.reshape(n, -1).repeat_interleave(k, dim=1)[:, :d]
