"""Dice and Dice+CE benchmark cases: segmentation logits (N, C, *spatial) with int64 class
indices, softmax, 'mean' (MONAI's defaults: include_background, smooth 1e-5, no batch).

fwd     logits that do not require grad (an eval loss).
fwdbwd  loss = provider(logits, target); loss.backward(), with logits a fresh non-leaf copy of a
        leaf ``base`` every repeat (``_harness.ProduceLogits``), as in the other benches.

Shapes: (8, 19, 512, 512), 2-D segmentation with Cityscapes' 19 classes, and (2, 14, 128, 128,
128), 3-D volumes with BTCV's 14 organ labels. The torch providers write what users write (and
what MONAI does): softmax over the class dim, a one-hot target of the logits' size, products and
sums over the spatial dims. The memory goal (issue 8/9): fusedloss's extra memory beyond the
logits and their gradient is at most 10% of the logits; MONAI and the one-hot formula hold
several logits-sized temporaries (the softmax, the one-hot in int64 and float, the products).
"""

from __future__ import annotations

import math

from . import _harness as H
from ._harness import Case, Provider, ProviderUnavailable, Runner

LOSS = "dice"
KINDS = ("dice", "dice_ce")
SMOOTH = 1e-5

PROVIDERS = {
    "fusedloss": Provider(requires=["fusedloss.dice_loss", "fusedloss.dice_ce_loss"],
                          desc="fusedloss.dice_loss / dice_ce_loss (backend='auto')"),
    "MONAI": Provider(requires=["monai.losses.DiceLoss", "monai.losses.DiceCELoss"],
                      desc="MONAI DiceLoss / DiceCELoss(softmax=True, to_onehot_y=True), eager "
                           "(pip install monai)"),
    "torch eager": Provider(desc="softmax + one_hot + sums (the one-hot formula), eager"),
    "torch.compile": Provider(desc="the one-hot formula under torch.compile, compiled in the "
                                   "warm-up"),
    "reference": Provider(requires=["fusedloss.reference.dice_loss"], max_repeats=2,
                          thp_settings=("default",),
                          desc="fusedloss.reference.dice_loss / dice_ce_loss (pure PyTorch "
                               "spec)"),
}

CHECK_ORDER = ["reference", "torch eager"]

# (N, C, spatial, dtype)
FULL = [(8, 19, (512, 512), "fp32"), (8, 19, (512, 512), "bf16"),
        (2, 14, (128, 128, 128), "fp32"), (2, 14, (128, 128, 128), "bf16")]
QUICK = [(2, 5, (32, 32), "fp32"), (1, 3, (16, 16, 16), "fp32")]
DEFAULT_CASES = ("dice_8x19x512x512_fp32_fwdbwd",
                 "dice_ce_8x19x512x512_fp32_fwdbwd")  # python -m bench without --full


def _case(kind: str, n: int, c: int, spatial: tuple, dtype: str, mode: str) -> Case:
    positions = n * math.prod(spatial)
    logits = positions * c * H.DTYPE_SIZE[dtype]
    dims = {"N": n, "C": c, "spatial": "x".join(str(s) for s in spatial), "loss": kind}
    what = "Dice" if kind == "dice" else "Dice + CE"
    notes = [f"{what}, softmax, reduction 'mean', include_background, no ignored positions, "
             "no class weight"]
    if mode == "fwd":
        floor = {"bytes": logits, "exp": positions * c}
    else:
        # The gradient depends on global sums: the logits are read twice (forward, backward).
        floor = {"bytes": 3 * logits, "exp": 2 * positions * c}
        notes.append("fwd+bwd: two reads of the logits and one write of the gradient at least "
                     "(the gradient needs the global sums); extra memory includes the gradient "
                     "(1x logits): the goal for fusedloss is at most 1.1x logits")
    shape = "x".join(str(s) for s in (n, c) + tuple(spatial))
    return Case(
        loss=LOSS,
        name=f"{kind}_{shape}_{dtype}_{mode}",
        mode=mode,
        dtype=dtype,
        dims=dims,
        providers=list(PROVIDERS),
        check_order=list(CHECK_ORDER),
        logits_bytes=logits,
        title=f"{what}, (N, C, *spatial) = ({n}, {c}, {dims['spatial']}), "
              f"{H.DTYPE_NAMES[dtype]}, {'fwd' if mode == 'fwd' else 'fwd+bwd'}",
        tol=dict(H.DEFAULT_TOL[dtype]),
        floor=floor,
        notes=notes,
    )


def cases(device: str, quick: bool, dtype: str | None = None) -> list:
    shapes = QUICK if quick else FULL
    modes = ("fwdbwd",) if quick else ("fwd", "fwdbwd")  # a smoke run: the backward op too
    return H.unique_cases(_case(kind, n, c, sp, dtype or dt, mode)
                          for kind in KINDS for n, c, sp, dt in shapes for mode in modes)


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


def dice_formula(x, y):
    """The Dice loss as users (and MONAI) write it: softmax, one-hot, sums over the spatial
    dims, 'mean' over (N, C). Computed in float32 for half inputs, as MONAI's float one-hot
    promotes it."""
    import torch
    import torch.nn.functional as F

    p = torch.softmax(x, 1)
    g = F.one_hot(y, x.shape[1]).movedim(-1, 1).float()
    dims = tuple(range(2, x.dim()))
    inter = (p * g).sum(dims)
    denom = p.sum(dims) + g.sum(dims)
    return (1.0 - (2.0 * inter + SMOOTH) / (denom + SMOOTH)).mean()


def dice_ce_formula(x, y):
    import torch.nn.functional as F

    return dice_formula(x, y) + F.cross_entropy(x, y)


def make_runner(provider: str, case: Case, inputs: dict, device: str, opts: dict) -> Runner:
    import torch

    kind = case.dims["loss"]
    backend = opts.get("backend", "auto")
    if provider == "fusedloss":
        import fusedloss

        if backend == "auto":
            fused = ("cuda", "triton") if device == "cuda" else ("cpu",)
            info = fusedloss.backends("dice")
            if not any(info[b]["available"] for b in fused):
                raise ProviderUnavailable("no fused Dice kernel in this build: "
                                          + "; ".join(info[b]["why"] for b in fused))
        f = H.resolve(f"fusedloss.{kind}_loss")
        fn = lambda x, y: f(x, y, backend=backend)  # noqa: E731
    elif provider == "MONAI":
        try:
            from monai.losses import DiceCELoss, DiceLoss
        except ImportError as e:
            raise ProviderUnavailable(f"monai is not installed (pip install monai): {e}") from e
        cls = DiceLoss if kind == "dice" else DiceCELoss
        loss = cls(softmax=True, to_onehot_y=True)
        fn = lambda x, y: loss(x, y.unsqueeze(1))  # noqa: E731
    elif provider == "torch eager":
        fn = dice_formula if kind == "dice" else dice_ce_formula
    elif provider == "torch.compile":
        fn = torch.compile(dice_formula if kind == "dice" else dice_ce_formula, dynamic=False)
    elif provider == "reference":
        fn = H.resolve(f"fusedloss.reference.{kind}_loss")
    else:
        raise ProviderUnavailable(f"unknown provider {provider!r}")
    return H.LogitsTargetRunner(fn, inputs, case.mode)


def sweep_cases(device: str, kind: str, dtype: str | None = None) -> list:
    """--sweep size: Dice fwd+bwd over square images, 19 classes (Cityscapes-like)."""
    if kind != "size":
        return []
    return [_case("dice", 4, 19, (s, s), dtype or "fp32", "fwdbwd") for s in (64, 128, 256, 512)]
