"""fusedloss: fused, single-pass losses with their own backward, for PyTorch.

Every loss has one signature and four implementations that agree: Triton, CUDA, CPU C++ and a
pure-PyTorch reference (``fusedloss.reference``). See ``fusedloss.backends()``.
"""

from __future__ import annotations

__version__ = "0.1.0"

# _ext first: it loads fusedloss._C, if built, before the ops register fake kernels for it.
from . import _ext, nn, ops, reference  # noqa: F401  (ops registers the torch.library custom ops)
from ._backend import status as _status
from .functional import (
    binary_cross_entropy_with_logits,
    cross_entropy,
    dice_ce_loss,
    dice_loss,
    linear_cross_entropy,
    sigmoid_focal_loss,
    softmax_focal_loss,
    total_variation,
    tversky_loss,
)

__all__ = ["backends", "binary_cross_entropy_with_logits", "cross_entropy", "distributed",
           "linear_cross_entropy", "nn", "reference", "sigmoid_focal_loss", "softmax_focal_loss",
           "total_variation", "__version__"]
__all__ += ["dice_loss", "tversky_loss", "dice_ce_loss"]


def __getattr__(name: str):
    # fusedloss.distributed is imported on first access (torch.distributed costs import time).
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'fusedloss' has no attribute {name!r}")


def backends(op: str = "cross_entropy") -> dict[str, dict[str, object]]:
    """Each backend ('triton', 'cuda', 'cpu', 'reference'): whether it can run ``op`` here (a loss
    name such as ``"cross_entropy"`` or ``"linear_cross_entropy"``), and why.

    >>> fusedloss.backends()["cpu"]
    {'available': True, 'why': 'fusedloss._C CPU kernels (AVX512)'}
    """
    return {name: {"available": ok, "why": why} for name, (ok, why) in _status(op).items()}
