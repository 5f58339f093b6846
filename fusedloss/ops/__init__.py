"""torch.library custom ops, one module per loss (docs/DESIGN.md section 1)."""

from . import (
    cross_entropy,  # noqa: F401  (registers fusedloss::cross_entropy_*)
    linear_cross_entropy,  # noqa: F401
)
