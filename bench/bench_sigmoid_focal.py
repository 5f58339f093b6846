"""Sigmoid focal loss benchmark cases: detection-shaped logits (images, anchors, classes) with
hard 0/1 targets, torchvision's defaults (alpha 0.25, gamma 2) and a 'mean' loss.

fwd     logits that do not require grad.
fwdbwd  loss = provider(logits, target); loss.backward(), logits a fresh non-leaf copy of a leaf
        every repeat (``_harness.ProduceLogits``), as in the cross-entropy bench.
"""

from __future__ import annotations

from . import _harness as H
from ._harness import Case, Provider, ProviderUnavailable, Runner

LOSS = "sigmoid_focal"

PROVIDERS = {
    "fusedloss": Provider(requires=["fusedloss.sigmoid_focal_loss"],
                          desc="fusedloss.sigmoid_focal_loss(backend='auto', reduction='mean')"),
    "torch eager": Provider(desc="torchvision's sigmoid_focal_loss formula, eager"),
    "torch.compile": Provider(desc="torch.compile of torchvision's formula, compiled in the "
                                   "warm-up"),
    "torchvision": Provider(requires=["torchvision.ops.sigmoid_focal_loss"],
                            desc="torchvision.ops.sigmoid_focal_loss(reduction='mean'), eager "
                                 "(pip install torchvision, matching torch)"),
    "reference": Provider(requires=["fusedloss.reference.sigmoid_focal_loss"], max_repeats=2,
                          thp_settings=("default",),
                          desc="fusedloss.reference.sigmoid_focal_loss (pure PyTorch spec)"),
}

CHECK_ORDER = ["reference", "torch eager"]

FULL = [((16, 100000, 80), "fp32"), ((16, 100000, 80), "bf16"), ((4, 20000, 80), "fp32")]
# The default run (python -m bench without --full): a few seconds per provider.
DEFAULT_CASES = ("sfl_4x20000x80_fp32_fwdbwd",)
QUICK = [((2, 4000, 80), "fp32"), ((2, 4000, 80), "bf16")]


def torchvision_formula(inputs, targets, alpha: float = 0.25, gamma: float = 2.0):
    """torchvision.ops.sigmoid_focal_loss (reduction='mean'), as torchvision writes it."""
    import torch
    import torch.nn.functional as F

    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * loss).mean()


def ew_case(loss: str, name: str, shape, dtype: str, mode: str, providers, title: str) -> Case:
    """A case of a per-element loss (shared with bench_bce.py)."""
    import math

    elt = H.DTYPE_SIZE[dtype]
    numel = math.prod(shape)
    logits = numel * elt
    notes = ["targets: hard 0/1 in the logits' dtype; 'mean' loss"]
    if mode == "fwd":
        floor = {"bytes": 2 * logits, "exp": numel}
    else:
        floor = {"bytes": 3 * logits, "exp": numel}
        notes.append("fwd+bwd: extra memory includes the gradient (1x logits)")
    provs = [p for p, pr in providers.items() if pr.modes is None or mode in pr.modes]
    return Case(loss=loss, name=f"{name}_{'x'.join(map(str, shape))}_{dtype}_{mode}", mode=mode,
                dtype=dtype, dims={"shape": list(shape)}, providers=provs,
                check_order=list(CHECK_ORDER), logits_bytes=logits,
                title=f"{title} {tuple(shape)}, {H.DTYPE_NAMES[dtype]}, "
                      f"{'fwd' if mode == 'fwd' else 'fwd+bwd'}",
                tol=dict(H.DEFAULT_TOL[dtype]), floor=floor, notes=notes)


def cases(device: str, quick: bool, dtype: str | None = None) -> list:
    shapes = QUICK if quick else FULL
    return H.unique_cases(ew_case(LOSS, "sfl", s, dtype or dt, mode, PROVIDERS,
                                  "sigmoid focal, alpha 0.25, gamma 2,")
                          for s, dt in shapes for mode in ("fwd", "fwdbwd"))


def ew_inputs(case: Case, device: str, seed: int = 0) -> dict:
    """Logits (scale 2) and hard targets (10% ones) in the case's dtype (shared with bench_bce)."""
    import torch

    g = H.make_generator(device, seed)
    shape = tuple(case.dims["shape"])
    dt = H.torch_dtype(case.dtype)
    base = H.randn_fast(shape, dt, device, g, scale=2.0)
    target = (torch.rand(shape, generator=g, device=device) < 0.1).to(dt)
    if case.mode == "fwdbwd":
        base.requires_grad_(True)
    return {"base": base, "target": target}


make_inputs = ew_inputs



def make_runner(provider: str, case: Case, inputs: dict, device: str, opts: dict) -> Runner:
    import torch

    backend = opts.get("backend", "auto")
    if provider == "fusedloss":
        sfl = H.resolve("fusedloss.sigmoid_focal_loss")
        fn = lambda x, y: sfl(x, y, reduction="mean", backend=backend)  # noqa: E731
    elif provider == "torch eager":
        fn = torchvision_formula
    elif provider == "torch.compile":
        fn = torch.compile(torchvision_formula, dynamic=False)
    elif provider == "torchvision":
        tv_sfl = H.resolve("torchvision.ops.sigmoid_focal_loss")
        fn = lambda x, y: tv_sfl(x, y, reduction="mean")  # noqa: E731
    elif provider == "reference":
        ref = H.resolve("fusedloss.reference.sigmoid_focal_loss")
        fn = lambda x, y: ref(x, y, reduction="mean")  # noqa: E731
    else:
        raise ProviderUnavailable(f"unknown provider {provider!r}")
    return H.LogitsTargetRunner(fn, inputs, case.mode)


def sweep_cases(device: str, kind: str, dtype: str | None = None) -> list:
    """--sweep size: fwd+bwd over the number of anchors (80 classes)."""
    if kind != "size":
        return []
    return [ew_case(LOSS, "sfl", (4, a, 80), dtype or "fp32", "fwdbwd", PROVIDERS,
                    "sigmoid focal, alpha 0.25, gamma 2,") for a in (1000, 5000, 20000, 100000)]
