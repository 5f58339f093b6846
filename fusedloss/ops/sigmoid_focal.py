"""``fusedloss::sigmoid_focal_fwd``: torchvision's sigmoid focal loss, one pass per element.

The op takes the input in any shape and strides, the target of its shape, a ``weight``
broadcastable to it (read by stride on every backend, never expanded into memory) and returns
(loss, grad) (docs/KERNELS.md): 'none' gives the per-element loss in the input's dtype, 'mean'
and 'sum' a 0-d float32 (float64) sum times ``loss_scale``, with no per-element tensor. The
gradient is computed in the forward when asked; the backward only scales it by the upstream
gradient (nothing for the scalar 1 of ``loss.backward()``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _ext
from ._common import elementwise_loss_autograd, elementwise_loss_fake


@torch.library.custom_op("fusedloss::sigmoid_focal_fwd", mutates_args=())
def sigmoid_focal_fwd(input: Tensor, target: Tensor, weight: Optional[Tensor], alpha: float,
                      gamma: float, loss_scale: float, reduction: int, compute_grad: bool,
                      backend: str) -> tuple[Tensor, Tensor]:
    return _backend.kernels("sigmoid_focal", backend).sigmoid_focal_fwd(
        input, target, weight, alpha, gamma, loss_scale, reduction, compute_grad)


def _fake(input, target, weight, alpha, gamma, loss_scale, reduction, compute_grad, backend=None):
    return elementwise_loss_fake(input, reduction, compute_grad)


sigmoid_focal_fwd.register_fake(_fake)
elementwise_loss_autograd(sigmoid_focal_fwd, "sigmoid_focal_loss", 9)

if _ext.available() and hasattr(torch.ops.fusedloss_C, "sigmoid_focal_fwd"):
    torch.library.register_fake("fusedloss_C::sigmoid_focal_fwd", _fake)
