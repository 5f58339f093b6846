"""torch.library custom ops, one module per loss (docs/DESIGN.md section 1), plus what they share
(``_common``) and the loss-agnostic upstream-gradient op (``scale_grad``)."""

from . import (  # noqa: F401  (importing them registers the fusedloss:: custom ops)
    bce,
    cross_entropy,
    dice,
    linear_cross_entropy,
    logsumexp,
    scale_grad,
    sigmoid_focal,
    softmax_focal,
    tv,
)
