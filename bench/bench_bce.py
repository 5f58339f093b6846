"""BCE-with-logits benchmark cases: segmentation-shaped logits (N, 1, H, W) with hard 0/1
targets, 'mean' loss, fwd and fwd+bwd (the runner and inputs of bench_sigmoid_focal.py)."""

from __future__ import annotations

from . import _harness as H
from ._harness import Case, Provider, ProviderUnavailable, Runner
from .bench_sigmoid_focal import ew_case, ew_inputs

LOSS = "bce"

PROVIDERS = {
    "fusedloss": Provider(requires=["fusedloss.binary_cross_entropy_with_logits"],
                          desc="fusedloss.binary_cross_entropy_with_logits(backend='auto')"),
    "torch eager": Provider(desc="torch.nn.functional.binary_cross_entropy_with_logits"),
    "torch.compile": Provider(desc="torch.compile(F.binary_cross_entropy_with_logits), compiled "
                                   "in the warm-up"),
    "reference": Provider(requires=["fusedloss.reference.binary_cross_entropy_with_logits"],
                          max_repeats=2, thp_settings=("default",),
                          desc="fusedloss.reference.binary_cross_entropy_with_logits"),
}

CHECK_ORDER = ["reference", "torch eager"]

FULL = [((64, 1, 512, 512), "fp32"), ((64, 1, 512, 512), "bf16")]
QUICK = [((4, 1, 128, 128), "fp32"), ((4, 1, 128, 128), "bf16")]
DEFAULT_CASES = ("bce_64x1x512x512_fp32_fwdbwd",)  # python -m bench without --full


def cases(device: str, quick: bool, dtype: str | None = None) -> list:
    shapes = QUICK if quick else FULL
    return H.unique_cases(ew_case(LOSS, "bce", s, dtype or dt, mode, PROVIDERS,
                                  "BCE with logits,")
                          for s, dt in shapes for mode in ("fwd", "fwdbwd"))


make_inputs = ew_inputs


def make_runner(provider: str, case: Case, inputs: dict, device: str, opts: dict) -> Runner:
    import torch
    import torch.nn.functional as F

    backend = opts.get("backend", "auto")
    if provider == "fusedloss":
        bce = H.resolve("fusedloss.binary_cross_entropy_with_logits")
        fn = lambda x, y: bce(x, y, backend=backend)  # noqa: E731
    elif provider == "torch eager":
        fn = F.binary_cross_entropy_with_logits
    elif provider == "torch.compile":
        fn = torch.compile(lambda x, y: F.binary_cross_entropy_with_logits(x, y), dynamic=False)
    elif provider == "reference":
        fn = H.resolve("fusedloss.reference.binary_cross_entropy_with_logits")
    else:
        raise ProviderUnavailable(f"unknown provider {provider!r}")
    return H.LogitsTargetRunner(fn, inputs, case.mode)


__all__ = ["LOSS", "PROVIDERS", "cases", "make_inputs", "make_runner"]


def sweep_cases(device: str, kind: str, dtype: str | None = None) -> list:
    """--sweep size: fwd+bwd over image sizes."""
    if kind != "size":
        return []
    return [ew_case(LOSS, "bce", (16, 1, s, s), dtype or "fp32", "fwdbwd", PROVIDERS,
                    "BCE with logits,") for s in (64, 128, 256, 512, 1024)]
