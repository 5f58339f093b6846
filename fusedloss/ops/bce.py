"""``fusedloss::bce_fwd``: torch's binary_cross_entropy_with_logits, one pass per element.

The op takes the input in any shape and strides, the target of its shape, ``weight`` and
``pos_weight`` broadcastable to it (read by stride on every backend, never expanded into memory)
and returns (loss, grad) (docs/KERNELS.md): 'none' gives the per-element loss in the input's
dtype, 'mean' and 'sum' a 0-d float32 (float64) sum times ``loss_scale``, with no per-element
tensor. The gradient is computed in the forward when asked; the backward only scales it by the
upstream gradient (nothing for the scalar 1 of ``loss.backward()``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _ext
from ._common import elementwise_loss_autograd, elementwise_loss_fake


@torch.library.custom_op("fusedloss::bce_fwd", mutates_args=())
def bce_fwd(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
            loss_scale: float, reduction: int, compute_grad: bool,
            backend: str) -> tuple[Tensor, Tensor]:
    return _backend.kernels("bce", backend).bce_fwd(
        input, target, weight, pos_weight, loss_scale, reduction, compute_grad)


def _fake(input, target, weight, pos_weight, loss_scale, reduction, compute_grad, backend=None):
    return elementwise_loss_fake(input, reduction, compute_grad)


bce_fwd.register_fake(_fake)
elementwise_loss_autograd(bce_fwd, "binary_cross_entropy_with_logits", 8)

if _ext.available() and hasattr(torch.ops.fusedloss_C, "bce_fwd"):
    torch.library.register_fake("fusedloss_C::bce_fwd", _fake)
