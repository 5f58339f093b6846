"""fusedloss: fused, single-pass losses with their own backward, for PyTorch.

Every loss has one signature and four implementations that agree: Triton, CUDA, CPU C++ and a
pure-PyTorch reference (``fusedloss.reference``). See ``fusedloss.backends()``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _ext  # noqa: F401  (loads fusedloss._C, if built, before the ops use it)
from . import ops  # noqa: F401  (registers the torch.library custom ops)
from . import nn, reference  # noqa: F401
from ._backend import status as _status
from .functional import cross_entropy, linear_cross_entropy

__all__ = ["backends", "cross_entropy", "linear_cross_entropy", "nn", "reference", "__version__"]


def backends() -> dict[str, dict[str, object]]:
    """Each backend ('triton', 'cuda', 'cpu', 'reference'): whether it can run here, and why.

    >>> fusedloss.backends()["cpu"]
    {'available': True, 'why': 'fusedloss._C CPU kernels (AVX512)'}
    """
    return {name: {"available": ok, "why": why} for name, (ok, why) in _status().items()}
