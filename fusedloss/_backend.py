"""Backend selection (DESIGN.md section 2): which implementation runs a call.

``backend="auto"`` (or the ``FUSEDLOSS_BACKEND`` environment variable): CUDA tensor -> triton, else
cuda, else reference; CPU tensor -> cpu, else reference with one warning. An explicit backend that
cannot run raises a RuntimeError saying why.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from . import _ext

BACKENDS = ("triton", "cuda", "cpu", "reference")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    if torch.cuda.is_available():
        return True, "triton on CUDA tensors"
    if _interpreting():
        return True, "TRITON_INTERPRET=1: Triton interpreter on CPU tensors (slow; for tests)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 before importing fusedloss to interpret)"


# What each backend needs for an op family to run there: the fusedloss_C kernel that the cpu and
# cuda backends call, and the module of fusedloss.kernels that holds the Triton launchers. A loss
# adds its line here (docs/ADDING_A_LOSS.md).
OPS = {
    "cross_entropy": ("cross_entropy_fwd", "cross_entropy"),
    "linear_cross_entropy": ("cross_entropy_fwd_inplace", "cross_entropy"),
    "scale_grad": ("scale_grad_", "scale_grad"),
    "logsumexp": ("logsumexp_fwd", "logsumexp"),
    "tv": ("tv_fwd", "tv"),
    "total_variation": ("tv_fwd", "tv"),  # the public function's name for fusedloss.backends()
    "sigmoid_focal": ("sigmoid_focal_fwd", "sigmoid_focal"),
    "bce": ("bce_fwd", "bce"),
    "softmax_focal": ("softmax_focal_fwd", "softmax_focal"),
    "dice": ("dice_fwd", "dice"),
    # the public functions' names for fusedloss.backends()
    "dice_loss": ("dice_fwd", "dice"),
    "tversky_loss": ("dice_fwd", "dice"),
    "dice_ce_loss": ("dice_fwd", "dice"),
}


def status(op: str = "cross_entropy") -> dict[str, tuple[bool, str]]:
    """(available, why) for every backend for ``op`` (a key of OPS), as ``fusedloss.backends()``
    reports it."""
    c_op, triton_module = OPS[op]
    ok, why = _triton_status()
    if ok and importlib.util.find_spec(f"fusedloss.kernels.{triton_module}") is None:
        ok, why = False, f"no Triton kernels for {op} (fusedloss.kernels.{triton_module})"
    out = {"triton": (ok, why)}
    if not _ext.available():
        out["cuda"] = (False, _ext.error or "fusedloss._C is not built")
        out["cpu"] = (False, _ext.error or "fusedloss._C is not built")
    else:
        if not _ext.has_kernel(c_op, "CUDA"):
            out["cuda"] = (False, f"fusedloss._C has no CUDA kernel for {op} (it needs a CUDA "
                           "build of torch and CUDA_HOME at build time)")
        elif not torch.cuda.is_available():
            out["cuda"] = (False, "fusedloss._C has CUDA kernels but no CUDA device is available")
        else:
            out["cuda"] = (True, "fusedloss._C CUDA kernels")
        if _ext.has_kernel(c_op, "CPU"):
            cap = torch.backends.cpu.get_cpu_capability()
            out["cpu"] = (True, f"fusedloss._C CPU kernels ({cap})")
        else:
            out["cpu"] = (False, f"fusedloss._C has no CPU kernel for {op}")
    out["reference"] = (True, "pure PyTorch (fusedloss.reference); slow, for checking")
    return out


_warned_fallback = False


def _warn_fallback(why: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"fusedloss: using the slow reference implementation: {why}", stacklevel=4)


def resolve(backend: str, device: torch.device, op: str = "cross_entropy") -> str:
    """The backend that runs ``op`` (a key of OPS) on ``device``; raises RuntimeError if an
    explicitly named backend cannot run it."""
    return _checked_resolve(backend, device.type, op)


def resolve_for(backend: str, tensor: torch.Tensor, op: str = "cross_entropy") -> str:
    """:func:`resolve` for ``tensor``'s device, the per-call path of every loss: the CPU case
    without building a torch.device (``tensor.device.type`` costs more than the rest of the
    lookup)."""
    return _checked_resolve(backend, "cpu" if tensor.is_cpu else tensor.device.type, op)


def _checked_resolve(backend, device_type: str, op: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    return _resolve(backend, device_type, op)


def _constant_result(fn):
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo (which
    imports triton: seconds at every ``import fusedloss``); dynamo only reads this attribute."""
    fn._dynamo_marked_constant = True
    return fn


# Depends only on its strings and on facts fixed for the process (FUSEDLOSS_BACKEND is read at the
# first call for each device type), so under torch.compile it is evaluated once while tracing and
# becomes a constant (no graph break on the dispatcher queries). Cached: it runs on every call.
@_constant_result
def _resolve(backend: str, device_type: str, op: str) -> str:
    key = (backend, device_type, op)
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve_uncached(backend, device_type, op)
    return name


def reset() -> None:
    """Forget the resolved backends, so that FUSEDLOSS_BACKEND is read again (tests)."""
    _resolved.clear()


_resolved: dict[tuple, str] = {}


def _resolve_uncached(backend: str, device_type: str, op: str) -> str:
    if backend == "auto":
        backend = os.environ.get("FUSEDLOSS_BACKEND", "auto") or "auto"
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; "
                         f"got {backend!r}")
    st = status(op)
    if backend == "auto":
        if device_type == "cuda":
            for name in ("triton", "cuda"):
                if st[name][0]:
                    return name
            _warn_fallback("neither the triton nor the cuda backend is available: "
                           f"{st['triton'][1]}; {st['cuda'][1]}")
            return "reference"
        if device_type == "cpu" and st["cpu"][0]:
            return "cpu"
        _warn_fallback(st["cpu"][1] if device_type == "cpu" else
                       f"no fused backend for {device_type} tensors")
        return "reference"
    ok, why = st[backend]
    if not ok:
        raise RuntimeError(f"fusedloss: backend {backend!r} is not available for {op}: {why}")
    if backend == "cpu" and device_type != "cpu":
        raise RuntimeError(f"fusedloss: backend 'cpu' needs CPU tensors, "
                           f"got a {device_type} tensor")
    if backend == "cuda" and device_type != "cuda":
        raise RuntimeError(f"fusedloss: backend 'cuda' needs CUDA tensors, "
                           f"got a {device_type} tensor")
    if backend == "triton" and device_type != "cuda" and not (
            device_type == "cpu" and _interpreting()):
        raise RuntimeError(f"fusedloss: backend 'triton' needs CUDA tensors (or CPU tensors with "
                           f"TRITON_INTERPRET=1), got a {device_type} tensor")
    return backend


def kernels(op: str, backend: str):
    """The module-like object holding ``op``'s kernel functions (a key of OPS) for a fused
    backend: its Triton module, or ``torch.ops.fusedloss_C``."""
    if backend == "triton":
        return importlib.import_module(f"fusedloss.kernels.{OPS[op][1]}")
    return torch.ops.fusedloss_C  # cpu and cuda: the dispatcher picks the device kernel
