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
