"""Loads the compiled extension ``fusedloss._C`` and remembers why it is missing, if it is.

torch must be imported first: _C links against libtorch and registers its kernels with torch's
dispatcher (``torch.ops.fusedloss_C``) when imported.
"""

from __future__ import annotations

import os

import torch  # noqa: F401  (before _C: its registrations need libtorch loaded)

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the fusedloss checkout "
    "(needs a C++ compiler; FUSEDLOSS_BUILD_EXT=0 skips it)"
)

_C = None
error: str | None = None

try:
    from . import _C  # type: ignore[attr-defined, no-redef]
except ImportError as e:  # not built, or built against another torch
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C") is None:
        # Not built at all. Python's own message ("cannot import name '_C' from partially
        # initialized module ... circular import") reads like a bug in fusedloss.
        error = f"fusedloss._C is not built; {BUILD_HINT}"
    else:
        error = f"fusedloss._C could not be imported ({e}); {BUILD_HINT}"
    if os.environ.get("FUSEDLOSS_REQUIRE_EXT", "0") not in ("", "0"):
        raise ImportError(f"FUSEDLOSS_REQUIRE_EXT is set but {error}") from e


def available() -> bool:
    return _C is not None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fusedloss._C registered a kernel for ``fusedloss_C::<op>`` on that device."""
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss_C::{op}", dispatch_key)
    except RuntimeError:  # a _C built before the op's schema existed (a stale build)
        return False
