"""torch.library custom op for linear cross-entropy: CE(input @ W.T + b) without the full logits.

Tokens are processed in chunks. Per chunk: logits by torch's matmul, then the backend's fused CE
kernel in place (``cross_entropy_fwd_inplace``) turns them into d(loss)/d(logits), then
``grad_input[chunk] = g @ W`` and ``grad_W += g.T @ input[chunk]`` (and ``grad_b``). At most
``chunk_size x V`` logits exist at a time. Ignored tokens are dropped before the matmul.

For 'mean' and 'sum' the gradients are produced in the forward, so the backward is only a scale by
the scalar upstream gradient (skipped when it is 1). For 'none' the upstream gradient differs per
token and the weight gradient cannot be rescaled afterwards: the backward recomputes the chunks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ._common import acc_dtype, check_first_order, times_upstream
from .scale_grad import scale_grad_


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _kept_rows(target: Tensor, ignore_index: int) -> Tensor:
    # Data-dependent (a host sync on CUDA), but inside an opaque op: compile sees one node.
    return (target != ignore_index).nonzero().squeeze(1)


def _run(input, linear_weight, linear_bias, target, weight, loss_scale, upstream, ignore_index,
         label_smoothing, z_loss, softcap, chunk_size, compute_grad, backend):
    """Loss and lse per token and, with compute_grad, the three gradients. upstream: None, or the
    per-token upstream gradient (backward of 'none'), applied to the gradients only."""
    n, h = input.shape
    acc = acc_dtype(input.dtype)
    kernels = _backend.kernels("cross_entropy", backend)
    rows = _kept_rows(target, ignore_index)
    all_kept = rows.numel() == n  # no padding: chunks are plain slices, nothing to gather
    grad_input = grad_weight = grad_bias = None
    if compute_grad:
        # Every kept row of grad_input is written by a chunk; ignored rows stay 0.
        # Contiguous whatever input's layout (a column-major input is fine): the scaling in
        # backward views it flat.
        alloc = torch.empty if all_kept else torch.zeros
        grad_input = alloc(input.shape, dtype=input.dtype, device=input.device)
        grad_weight = torch.zeros(linear_weight.shape, dtype=acc, device=input.device)
        if linear_bias is not None:
            grad_bias = torch.zeros(linear_bias.shape, dtype=acc, device=input.device)
    xs = input if all_kept else input.index_select(0, rows)
    ts = target if all_kept else target.index_select(0, rows)
    scales = None
    if upstream is not None:
        scales = upstream if all_kept else upstream.index_select(0, rows)
    loss_k = torch.empty(rows.numel(), dtype=acc, device=input.device)
    lse_k = torch.empty(rows.numel(), dtype=acc, device=input.device)
    grad_k = None
    if compute_grad:
        grad_k = grad_input if all_kept else input.new_empty(xs.shape)
    # One logits buffer for every chunk: a fresh one per chunk would be allocated while the
    # previous one is still referenced (two chunks of logits at the peak) and page-faulted anew.
    buf = input.new_empty(min(chunk_size, rows.numel()), linear_weight.shape[0])
    for start, stop in _chunks(rows.numel(), chunk_size):
        x = xs[start:stop]
        t = ts[start:stop].unsqueeze(1)
        logits = buf[: stop - start]
        if linear_bias is None:
            torch.mm(x, linear_weight.T, out=logits)
        else:
            torch.addmm(linear_bias, x, linear_weight.T, out=logits)
        view = logits.unsqueeze(2)  # (rows, V, 1): the CE kernels' (N, C, D) layout
        args = (t, weight, loss_scale, ignore_index, label_smoothing, z_loss, softcap)
        if compute_grad:
            l_c, lse_c = kernels.cross_entropy_fwd_inplace(view, *args)
            if scales is not None:
                scale_grad_(view, scales[start:stop].unsqueeze(1), backend)
            g = logits  # now d(loss)/d(logits)
            torch.mm(g, linear_weight, out=grad_k[start:stop])
            if g.dtype == acc:
                grad_weight.addmm_(g.T, x)
            else:  # half: each chunk's product is rounded once, the sum over chunks is fp32
                grad_weight += (g.T @ x).to(acc)
            if grad_bias is not None:
                grad_bias += g.sum(0, dtype=acc)
        else:
            l_c, lse_c, _ = kernels.cross_entropy_fwd(view, *args, False)
        loss_k[start:stop] = l_c.squeeze(1)
        lse_k[start:stop] = lse_c.squeeze(1)
    if all_kept:
        loss, lse = loss_k, lse_k
    else:
        loss = torch.zeros(n, dtype=acc, device=input.device)
        if loss_scale is not None:
            loss = loss * loss_scale  # ignored tokens give 0 * scale: NaN for an all-ignored 'mean'
        lse = torch.zeros(n, dtype=acc, device=input.device)
        loss.index_copy_(0, rows, loss_k)
        lse.index_copy_(0, rows, lse_k)
        if compute_grad:
            grad_input.index_copy_(0, rows, grad_k)
    if compute_grad:
        grad_weight = grad_weight.to(linear_weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(linear_bias.dtype)
    return loss, lse, grad_input, grad_weight, grad_bias


@torch.library.custom_op("fusedloss::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    loss_scale: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    chunk_size: int,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """input (N, H), linear_weight (V, H), target (N,). Returns per-token loss and lse and, with
    compute_grad, the gradients of input, linear_weight and linear_bias (else empty tensors)."""
    loss, lse, gi, gw, gb = _run(input, linear_weight, linear_bias, target, weight, loss_scale,
                                 None, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
                                 compute_grad, backend)
    # Each absent gradient is its own empty tensor: outputs may not alias each other.
    return (loss, lse, _or_empty(gi, input), _or_empty(gw, input), _or_empty(gb, input))


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


@linear_cross_entropy_fwd.register_fake
def _(input, linear_weight, linear_bias, target, weight, loss_scale, ignore_index,
      label_smoothing, z_loss, softcap, chunk_size, compute_grad, backend):
    acc = acc_dtype(input.dtype)
    n = input.shape[0]
    gi = torch.empty_like(input) if compute_grad else input.new_empty(0)
    gw = torch.empty_like(linear_weight) if compute_grad else input.new_empty(0)
    has_gb = compute_grad and linear_bias is not None
    gb = torch.empty_like(linear_bias) if has_gb else input.new_empty(0)
    return input.new_empty(n, dtype=acc), input.new_empty(n, dtype=acc), gi, gw, gb


@torch.library.custom_op("fusedloss::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    loss_scale: Optional[Tensor],
    upstream: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of reduction='none' (per-token upstream gradient): the forward recomputed
    chunk by chunk with the gradients. An op of its own so that torch.compile sees one node, not
    the data-dependent gather of the kept rows."""
    _, _, gi, gw, gb = _run(input, linear_weight, linear_bias, target, weight, loss_scale,
                            upstream, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
                            True, backend)
    return gi, gw, _or_empty(gb, input)


@linear_cross_entropy_bwd.register_fake
def _(input, linear_weight, linear_bias, target, weight, loss_scale, upstream, ignore_index,
      label_smoothing, z_loss, softcap, chunk_size, backend):
    gb = torch.empty_like(linear_bias) if linear_bias is not None else input.new_empty(0)
    return torch.empty_like(input), torch.empty_like(linear_weight), gb


def _setup_context(ctx, inputs, output):
    (input, linear_weight, linear_bias, target, weight, loss_scale, ignore_index, label_smoothing,
     z_loss, softcap, chunk_size, compute_grad, backend) = inputs
    # No zero gradients materialised for the non-differentiable outputs: those of the gradient
    # outputs would be as large as the gradients themselves.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    ctx.precomputed = compute_grad
    ctx.has_bias = linear_bias is not None
    ctx.args = (ignore_index, label_smoothing, z_loss, softcap, chunk_size, backend)
    if compute_grad:
        ctx.save_for_backward(*output[2:])
    else:  # 'none': recompute in backward
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, loss_scale)


def _scale_(t: Tensor, g: Tensor, backend: str) -> Tensor:
    """t times the scalar upstream gradient g (expanded over tokens), as in cross-entropy."""
    return times_upstream(t.view(1, -1, 1), g.as_strided((1, 1), (0, 0)), backend,
                        inplace=False).view(t.shape)


def _backward(ctx, grad_loss, grad_lse, gi, gw, gb):
    if grad_loss is None:
        return (None,) * 13
    check_first_order("linear_cross_entropy")
    ignore_index, label_smoothing, z_loss, softcap, chunk_size, backend = ctx.args
    if ctx.precomputed:
        grad_input, grad_weight, grad_bias = ctx.saved_tensors
        # 'mean'/'sum': the op's losses are summed, so the upstream gradient is one scalar.
        grad_input = _scale_(grad_input, grad_loss, backend)
        grad_weight = _scale_(grad_weight, grad_loss, backend)
        grad_bias = _scale_(grad_bias, grad_loss, backend) if ctx.has_bias else None
    else:
        input, linear_weight, linear_bias, target, weight, loss_scale = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = linear_cross_entropy_bwd(
            input, linear_weight, linear_bias, target, weight, loss_scale,
            grad_loss.to(acc_dtype(input.dtype)).contiguous(), ignore_index, label_smoothing,
            z_loss, softcap, chunk_size, backend)
        grad_bias = grad_bias if ctx.has_bias else None
    return (grad_input, grad_weight, grad_bias) + (None,) * 10


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)
