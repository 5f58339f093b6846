"""torch.library custom ops, one module per loss (DESIGN.md section 1)."""

from . import cross_entropy  # noqa: F401  (registers fusedloss::cross_entropy_*)
from . import linear_cross_entropy  # noqa: F401
