"""``fusedloss::logsumexp_fwd``: the logsumexp over the class dim of each row of (N, C, D) logits.

The softmax-row skeleton's lse-only policy on every backend (docs/KERNELS.md): one read of the
logits, no target, no gradient. fusedloss.distributed uses it for each rank's partial logsumexp.
A row with a NaN or +inf logit gives NaN, as cross-entropy's lse does (torch.logsumexp: inf for
+inf), an all -inf row gives -inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _ext
from ._common import acc_dtype


@torch.library.custom_op("fusedloss::logsumexp_fwd", mutates_args=())
def logsumexp_fwd(input: Tensor, softcap: float, backend: str) -> Tensor:
    return _backend.kernels("logsumexp", backend).logsumexp_fwd(input, softcap)


def _fake(input, softcap, backend=None):
    return input.new_empty((input.shape[0], input.shape[2]), dtype=acc_dtype(input.dtype))


logsumexp_fwd.register_fake(_fake)

if _ext.available():
    torch.library.register_fake("fusedloss_C::logsumexp_fwd", _fake)
