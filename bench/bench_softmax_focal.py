"""Softmax focal loss benchmark cases: segmentation-shaped logits (N, C, *spatial), 'mean' loss,
gamma = 2.

fwd     logits that do not require grad (an eval loss).
fwdbwd  loss = provider(logits, target); loss.backward(), with logits a fresh non-leaf copy of a
        leaf ``base`` every repeat (``_harness.ProduceLogits``), as in the cross-entropy bench.

The torch providers compute the same formula without a one-hot tensor: log_softmax over the class
dim, gather of the target's log-probability, the focal factor (1 - p_y)^gamma = (-expm1(logp_y))^g.
The memory goal (docs/KERNELS.md, softmax_focal_fwd): fusedloss's extra memory beyond the input and
its gradient is at most 10% of the input at these shapes ('mean' keeps block sums, not a loss per
position).
"""

from __future__ import annotations

import math

from . import _harness as H
from ._harness import Case, Provider, ProviderUnavailable, Runner

LOSS = "softmax_focal"
GAMMA = 2.0

PROVIDERS = {
    "fusedloss": Provider(requires=["fusedloss.softmax_focal_loss"],
                          desc="fusedloss.softmax_focal_loss(backend='auto')"),
    "torch eager": Provider(desc="log_softmax + gather + (-expm1(logp_y))**gamma, eager"),
    "torch.compile": Provider(desc="the same formula under torch.compile, compiled in the "
                                   "warm-up"),
    "reference": Provider(requires=["fusedloss.reference.softmax_focal_loss"], max_repeats=2,
                          thp_settings=("default",),
                          desc="fusedloss.reference.softmax_focal_loss (pure PyTorch spec)"),
}

CHECK_ORDER = ["reference", "torch eager"]

# (N, C, spatial, dtype): 2-D segmentation (Cityscapes' 19 classes) and 3-D medical volumes.
FULL = [(8, 19, (512, 512), "fp32"), (8, 19, (512, 512), "bf16"),
        (2, 4, (96, 96, 96), "fp32"), (2, 4, (96, 96, 96), "bf16")]
QUICK = [(2, 5, (64, 64), "fp32")]
DEFAULT_CASES = ("sfocal_8x19x512x512_fp32_fwdbwd",)  # python -m bench without --full


def _case(n: int, c: int, spatial: tuple, dtype: str, mode: str) -> Case:
    positions = n * math.prod(spatial)
    logits = positions * c * H.DTYPE_SIZE[dtype]
    provs = list(PROVIDERS)
    dims = {"N": n, "C": c, "spatial": "x".join(str(s) for s in spatial)}
    notes = ["gamma = 2, reduction 'mean', no ignored positions, no class weight"]
    if mode == "fwd":
        floor = {"bytes": logits, "exp": positions * c}
    else:
        floor = {"bytes": 2 * logits, "exp": positions * c}
        notes.append("fwd+bwd: extra memory includes the gradient (1x logits); the goal for "
                     "fusedloss is at most 1.1x logits")
    shape = "x".join(str(s) for s in (n, c) + tuple(spatial))
    return Case(
        loss=LOSS,
        name=f"sfocal_{shape}_{dtype}_{mode}",
        mode=mode,
        dtype=dtype,
        dims=dims,
        providers=provs,
        check_order=list(CHECK_ORDER),
        logits_bytes=logits,
        title=f"(N, C, *spatial) = ({n}, {c}, {dims['spatial']}), {H.DTYPE_NAMES[dtype]}, "
              f"{'fwd' if mode == 'fwd' else 'fwd+bwd'}",
        tol=dict(H.DEFAULT_TOL[dtype]),
        floor=floor,
        notes=notes,
    )


def cases(device: str, quick: bool, dtype: str | None = None) -> list:
    shapes = QUICK if quick else FULL
    return H.unique_cases(_case(n, c, sp, dtype or dt, mode) for n, c, sp, dt in shapes
                          for mode in ("fwd", "fwdbwd"))


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    import torch

    g = H.make_generator(device, seed)
    n, c = case.dims["N"], case.dims["C"]
    spatial = tuple(int(s) for s in case.dims["spatial"].split("x"))
    base = H.randn_fast((n, c) + spatial, H.torch_dtype(case.dtype), device, g, scale=2.0)
    target = torch.randint(0, c, (n,) + spatial, generator=g, device=device)
    if case.mode == "fwdbwd":
        base.requires_grad_(True)
    return {"base": base, "target": target}


def focal_formula(x, y, gamma: float = GAMMA):
    """The focal loss from torch ops, without a one-hot: what a user writes (torch eager and the
    torch.compile provider)."""
    import torch

    logp = torch.log_softmax(x, 1)
    lp = logp.gather(1, y.unsqueeze(1)).squeeze(1)
    return (-((-torch.expm1(lp)) ** gamma) * lp).mean()


def make_runner(provider: str, case: Case, inputs: dict, device: str, opts: dict) -> Runner:
    import torch

    backend = opts.get("backend", "auto")
    if provider == "fusedloss":
        sf = H.resolve("fusedloss.softmax_focal_loss")
        fn = lambda x, y: sf(x, y, GAMMA, backend=backend)  # noqa: E731
    elif provider == "torch eager":
        fn = focal_formula
    elif provider == "torch.compile":
        fn = torch.compile(focal_formula, dynamic=False)
    elif provider == "reference":
        ref = H.resolve("fusedloss.reference.softmax_focal_loss")
        fn = lambda x, y: ref(x, y, GAMMA)  # noqa: E731
    else:
        raise ProviderUnavailable(f"unknown provider {provider!r}")
    return H.LogitsTargetRunner(fn, inputs, case.mode)


def sweep_cases(device: str, kind: str, dtype: str | None = None) -> list:
    """--sweep size: fwd+bwd over image sizes (19 classes)."""
    if kind != "size":
        return []
    return [_case(4, 19, (s, s), dtype or "fp32", "fwdbwd") for s in (64, 128, 256, 512, 1024)]
