"""torch.library custom op for total variation: schema, fake kernel, autograd, device routing.

``fusedloss::tv_fwd`` takes the images as the user passed them, ``(..., H, W)`` with any strides,
and a weight broadcastable to them (never expanded into memory), and returns the per-image loss
``input.shape[:-2]`` in the accumulation dtype and, with ``compute_grad``, the gradient of the
summed loss as a contiguous tensor of the input's shape and dtype. Inside, the leading dimensions
are viewed as the device kernels' canonical ``(P, Q, H, W)`` (docs/KERNELS.md, "Total variation").

The forward kernel computes the gradient while the image is in cache, so the backward only scales
it by the upstream gradient: nothing at all for the scalar 1 of ``loss.backward()``, one value per
image for ``reduction='none'``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _ext
from ._common import acc_dtype, check_first_order, times_upstream

NORMS = {"l1": 0, "l2_squared": 1, "isotropic": 2}  # csrc/include/fusedloss/tv.h's tv::Norm


def _leading_dims(shape, strides_list):
    """The leading dims (all but the last two) of tensors of one shape, with size-1 dims dropped
    and neighbours merged where every tensor walks them as one: [(size, [stride per tensor])]."""
    out = []
    for k in range(len(shape) - 2):
        n = shape[k]
        if n == 1:
            continue
        st = [s[k] for s in strides_list]
        if out and all(prev == cur * n for prev, cur in zip(out[-1][1], st)):
            out[-1] = (out[-1][0] * n, st)
        else:
            out.append((n, st))
    return out


def canonical(input: Tensor, weight: Optional[Tensor]):
    """``(input, weight)`` viewed as ``(P, Q, H, W)`` without copying (weight expanded by stride 0,
    never materialised): the leading dims coalesced into at most two. Only when more than two
    stay apart (a broadcast weight over three or more leading dims that cannot merge) are the
    input, then the weight, made contiguous."""
    h, w = input.shape[-2], input.shape[-1]
    wt = None if weight is None else weight.expand(input.shape)
    tensors = [input] if wt is None else [input, wt]
    dims = _leading_dims(input.shape, [t.stride() for t in tensors])
    if len(dims) > 2:
        tensors[0] = input = input.contiguous()
        dims = _leading_dims(input.shape, [t.stride() for t in tensors])
        if len(dims) > 2:
            tensors[1] = wt = wt.contiguous()
            dims = _leading_dims(input.shape, [t.stride() for t in tensors])
    dims = [(1, [0] * len(tensors))] * (2 - len(dims)) + dims
    sizes = (dims[0][0], dims[1][0], h, w)
    out = []
    for j, t in enumerate(tensors):
        strides = (dims[0][1][j], dims[1][1][j], t.stride(-2), t.stride(-1))
        out.append(t.as_strided(sizes, strides, t.storage_offset()))
    return out[0], (out[1] if wt is not None else None)


@torch.library.custom_op("fusedloss::tv_fwd", mutates_args=())
def tv_fwd(input: Tensor, weight: Optional[Tensor], norm: int, eps: float, loss_scale: float,
           compute_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    x, w = canonical(input, weight)
    loss, grad = _backend.kernels("tv", backend).tv_fwd(x, w, norm, eps, loss_scale,
                                                         compute_grad)
    loss = loss.reshape(input.shape[:-2])
    if compute_grad:
        grad = grad.view(input.shape)
    return loss, grad


@tv_fwd.register_fake
def _(input, weight, norm, eps, loss_scale, compute_grad, backend):
    loss = input.new_empty(input.shape[:-2], dtype=acc_dtype(input.dtype))
    grad = input.new_empty(input.shape if compute_grad else (0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.backend = inputs[-1]
    ctx.computed_grad = inputs[-2]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, grad_grad):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) * 7
    if not ctx.computed_grad:
        raise RuntimeError("fusedloss.total_variation: input needs a gradient but the forward "
                           "ran without compute_grad")
    check_first_order("total_variation")
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0:
        return (grad,) + (None,) * 6
    hw = grad.shape[-2] * grad.shape[-1]
    images = grad.numel() // hw
    # times_upstream's (N, C, D) x (N, D) form: the images are the rows, their pixels the classes.
    g = times_upstream(grad.view(images, hw, 1), grad_loss.reshape(images, 1), ctx.backend,
                       inplace=False)
    return (g.view(grad.shape),) + (None,) * 6


tv_fwd.register_autograd(_backward, setup_context=_setup_context)


if _ext.available() and hasattr(torch.ops.fusedloss_C, "tv_fwd"):
    def _c_fake(input, weight, norm, eps, loss_scale, compute_grad):
        p, q, h, w = input.shape
        loss = input.new_empty((p, q), dtype=acc_dtype(input.dtype))
        grad = input.new_empty((p, q, h, w) if compute_grad else (0,))
        return loss, grad

    torch.library.register_fake("fusedloss_C::tv_fwd", _c_fake)
