"""Total-variation benchmark cases: image batches (N, C, H, W), 'mean' loss, each norm.

fwdbwd  loss = provider(images); loss.backward() (upstream gradient 1), with the images a fresh
        non-leaf copy of a leaf ``base`` every repeat (``_harness.ProduceLogits``: the gradient
        goes to the images' producer uncopied, as a network's last layer would take it).
fwd     images that do not require grad (a metric / eval loss); l1 only.

The peers are the slicing form every tutorial writes (``x[..., 1:, :] - x[..., :-1, :]`` and the
horizontal twin), in torch eager and under torch.compile, and fusedloss.reference. Isotropic runs
with eps = 1e-6 everywhere: the slicing form's sqrt has an infinite derivative at a 0 norm (the
bottom-right pixel always has one), which fusedloss defines as 0 but eager autograd turns into NaN.
"""

from __future__ import annotations

from . import _harness as H
from ._harness import Case, Provider, ProviderUnavailable, Runner

LOSS = "tv"

PROVIDERS = {
    "fusedloss": Provider(requires=["fusedloss.total_variation"],
                          desc="fusedloss.total_variation(backend='auto')"),
    "torch eager": Provider(desc="the slicing form (x[..., 1:, :] - x[..., :-1, :], ...)"),
    "torch.compile": Provider(desc="torch.compile of the slicing form, compiled in the warm-up"),
    "reference": Provider(requires=["fusedloss.reference.total_variation"], max_repeats=2,
                          thp_settings=("default",),
                          desc="fusedloss.reference.total_variation (pure PyTorch spec)"),
    "kornia": Provider(requires=["kornia.losses.TotalVariation"],
                       desc="kornia.losses.total_variation(img, reduction='sum').sum() / "
                            "img.numel() (kornia has the anisotropic l1 only)"),
}

CHECK_ORDER = ["reference", "torch eager"]

NORMS = ("l1", "l2_squared", "isotropic")
EPS = {"l1": 0.0, "l2_squared": 0.0, "isotropic": 1e-6}
# (N, C, H, W): a training batch of 512 x 512 crops, and one 4K frame.
FULL = [((16, 3, 512, 512), norm, dt) for norm in NORMS for dt in ("fp32", "bf16")] + \
       [((1, 3, 2160, 3840), norm, dt) for norm in NORMS for dt in ("fp32", "bf16")]
QUICK = [((4, 3, 128, 160), "l1", "fp32"), ((2, 3, 64, 96), "isotropic", "bf16")]
DEFAULT_CASES = ("tv_16x3x512x512_isotropic_fp32_fwdbwd",)  # python -m bench without --full


def _case(shape, norm: str, dtype: str, mode: str) -> Case:
    n, c, h, w = shape
    elt = H.DTYPE_SIZE[dtype]
    image = n * c * h * w * elt
    provs = list(PROVIDERS)
    notes = [f"norm={norm!r}, eps={EPS[norm]}, reduction='mean' (the sum over input.numel())"]
    if mode == "fwd":
        floor = {"bytes": image}
        notes.append("fwd: images do not require grad")
    else:
        floor = {"bytes": 2 * image}
        notes.append("fwd+bwd: loss.backward(); images per repeat = a non-leaf clone of a leaf, "
                     "made before the timer, whose backward takes the gradient uncopied. Extra "
                     "memory includes the gradient (1x the images)")
    return Case(
        loss=LOSS,
        name=f"tv_{n}x{c}x{h}x{w}_{norm}_{dtype}_{mode}",
        mode=mode,
        dtype=dtype,
        dims={"N": n, "C": c, "H": h, "W": w, "norm": norm},
        providers=provs,
        check_order=list(CHECK_ORDER),
        logits_bytes=image,
        title=f"TV {norm}, (N, C, H, W) = {shape}, {H.DTYPE_NAMES[dtype]}, "
              f"{'fwd' if mode == 'fwd' else 'fwd+bwd'}",
        tol=dict(H.DEFAULT_TOL[dtype]),
        floor=floor,
        notes=notes,
    )


def cases(device: str, quick: bool, dtype: str | None = None) -> list:
    shapes = QUICK if quick else FULL
    out = []
    for shape, norm, dt in shapes:
        out.append(_case(shape, norm, dtype or dt, "fwdbwd"))
        if norm == "l1":
            out.append(_case(shape, norm, dtype or dt, "fwd"))
    return H.unique_cases(out)


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    g = H.make_generator(device, seed)
    d = case.dims
    base = H.randn_fast((d["N"], d["C"], d["H"], d["W"]), H.torch_dtype(case.dtype), device, g)
    if case.mode == "fwdbwd":
        base.requires_grad_(True)
    return {"base": base}


def slicing_tv(x, norm: str, eps: float):
    """The tutorials' form: differences by slicing, then the norm, 'mean' over x.numel()."""
    import torch.nn.functional as F

    dv = x[..., 1:, :] - x[..., :-1, :]
    dh = x[..., :, 1:] - x[..., :, :-1]
    if norm == "l1":
        total = dv.abs().sum() + dh.abs().sum()
    elif norm == "l2_squared":
        total = (dv * dv).sum() + (dh * dh).sum()
    else:
        dv = F.pad(dv, (0, 0, 0, 1))
        dh = F.pad(dh, (0, 1, 0, 0))
        total = (dv * dv + dh * dh + eps).sqrt().sum()
    return total / x.numel()


def make_runner(provider: str, case: Case, inputs: dict, device: str, opts: dict) -> Runner:
    import torch

    backend = opts.get("backend", "auto")
    norm = case.dims["norm"]
    eps = EPS[norm]
    if provider == "fusedloss":
        tv = H.resolve("fusedloss.total_variation")
        fn = lambda x: tv(x, norm=norm, eps=eps, backend=backend)  # noqa: E731
    elif provider == "torch eager":
        fn = lambda x: slicing_tv(x, norm, eps)  # noqa: E731
    elif provider == "torch.compile":
        fn = torch.compile(lambda x: slicing_tv(x, norm, eps), dynamic=False)
    elif provider == "reference":
        ref = H.resolve("fusedloss.reference.total_variation")
        fn = lambda x: ref(x, norm=norm, eps=eps)  # noqa: E731
    elif provider == "kornia":
        if norm != "l1":
            raise ProviderUnavailable("kornia's total_variation is the anisotropic l1 only")
        ktv = H.resolve("kornia.losses").total_variation  # (the dotted name is also a module)
        fn = lambda x: ktv(x, reduction="sum").sum() / x.numel()  # noqa: E731
    else:
        raise ProviderUnavailable(f"unknown provider {provider!r}")
    return H.LogitsTargetRunner(fn, inputs, case.mode)


def sweep_cases(device: str, kind: str, dtype: str | None = None) -> list:
    """--sweep size: fwd+bwd of isotropic TV over image sizes."""
    if kind != "size":
        return []
    return [_case((8, 3, s, s), "isotropic", dtype or "fp32", "fwdbwd")
            for s in (64, 128, 256, 512, 1024, 2048)]
