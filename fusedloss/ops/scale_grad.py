"""``fusedloss::scale_grad_``: a saved gradient times the upstream gradient, in place.

Loss-agnostic: every op whose forward saves ``d(loss)/d(input)`` (N, C, D) for per-row losses
(N, D) uses it in its backward. Contract (docs/KERNELS.md): grad_out (N, D) float32/float64, maybe
expanded (all strides 0: one scalar s, and s == 1 leaves grad untouched, decided where the data
lives, never a host sync); the product is taken in float32 and rounded once; an element that is
exactly 0 stays 0 whatever the factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _ext


@torch.library.custom_op("fusedloss::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: Tensor, grad_loss: Tensor, backend: str) -> None:
    _backend.kernels("scale_grad", backend).scale_grad_(grad, grad_loss)


@scale_grad_.register_fake
def _(grad, grad_loss, backend):
    return None


if _ext.available():
    torch.library.register_fake("fusedloss_C::scale_grad_", lambda grad, grad_loss: None)
