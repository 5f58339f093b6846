"""Cross-entropy benchmark cases: LLM-shaped (tokens x vocabulary) logits, mean loss.

fwd     logits that do not require grad (an eval / inference loss).
fwdbwd  loss = provider(logits, target); loss.backward() (upstream gradient 1), with logits a fresh
        non-leaf copy of a leaf ``base`` every repeat (see ``_harness.ProduceLogits``), so that
        ``inplace_backward=True`` is legal and every provider gets the same thing.
"""

from __future__ import annotations

from . import _harness as H
from ._harness import Case, Provider, ProviderUnavailable, Runner

LOSS = "cross_entropy"

PROVIDERS = {
    "fusedloss": Provider(requires=["fusedloss.cross_entropy"],
                          desc="fusedloss.cross_entropy(backend='auto')"),
    "fusedloss-inplace": Provider(requires=["fusedloss.cross_entropy"], modes=("fwdbwd",),
                                  desc="fusedloss.cross_entropy(inplace_backward=True)"),
    "torch eager": Provider(desc="torch.nn.functional.cross_entropy"),
    "torch.compile": Provider(desc="torch.compile(F.cross_entropy), compiled in the warm-up"),
    "reference": Provider(requires=["fusedloss.reference.cross_entropy"], max_repeats=2,
                          thp_settings=("default",),
                          desc="fusedloss.reference.cross_entropy (pure PyTorch spec)"),
    "liger": Provider(requires=["liger_kernel.transformers.LigerCrossEntropyLoss"],
                      devices=("cuda",), desc="liger_kernel LigerCrossEntropyLoss"),
    "quack": Provider(requires=["quack.cross_entropy.cross_entropy"], devices=("cuda",),
                      desc="quack.cross_entropy.cross_entropy(reduction='mean') (pip install "
                           "quack-kernels; CuTe DSL, Hopper and newer)"),
}

CHECK_ORDER = ["reference", "torch eager"]

FULL = [(4096, 32000, "fp32"), (8192, 50257, "fp32"), (2048, 128256, "fp32"),
        (2048, 128256, "bf16")]
# Per-call cost: classification heads and small vocabularies, where the Python and dispatch
# overhead of a call, not the kernel, decides (on a GPU it decides whether a fused kernel wins).
SMALL = [(64, 10, "fp32"), (32, 100, "fp32"), (256, 1000, "fp32")]
# The per-call overhead row: one row of two classes, so the kernel's work is nothing and the time
# is the fixed cost of a call (argument checks, dispatch, autograd node, reduction).
OVERHEAD = [(1, 2, "fp32")]
QUICK = [(1024, 8192, "fp32"), (64, 10, "fp32")]
# The default run (python -m bench without --full).
DEFAULT_CASES = ("ce_256x1000_fp32_fwdbwd", "ce_4096x32000_fp32_fwdbwd")


def _case(n: int, v: int, dtype: str, mode: str) -> Case:
    elt = H.DTYPE_SIZE[dtype]
    logits = n * v * elt
    provs = [p for p, pr in PROVIDERS.items() if pr.modes is None or mode in pr.modes]
    notes = []
    if (n, v, dtype) in OVERHEAD:
        notes.append("per-call overhead: N=1, V=2, the kernel does nothing; the time is the "
                     "fixed cost of one call")
    if mode == "fwd":
        floor = {"bytes": logits, "exp": n * v}
        notes.append("fwd: logits do not require grad (eval loss); extra memory is everything "
                     "the call allocates (torch eager: its log_softmax output, 1x logits)")
    else:
        floor = {"bytes": 2 * logits, "exp": n * v}
        notes.append("fwd+bwd: mean loss, loss.backward(). Logits per repeat = a non-leaf clone of "
                     "a leaf `base`, made before the timer, whose backward takes the gradient "
                     "uncopied, as an lm_head matmul would (needed for inplace_backward, given "
                     "to all); the harness "
                     "drops its own reference before the call, like a training step does with "
                     "lm_head logits. Extra memory includes the gradient (1x logits unless the "
                     "provider writes it into the logits' memory, as fusedloss-inplace may)")
        if n * v > (1 << 22):
            notes.append("gradient checked on 256 evenly spaced rows (full loss)")
    return Case(
        loss=LOSS,
        name=f"ce_{n}x{v}_{dtype}_{mode}",
        mode=mode,
        dtype=dtype,
        dims={"N": n, "V": v},
        providers=provs,
        check_order=list(CHECK_ORDER),
        logits_bytes=logits,
        title=(("per-call overhead: " if (n, v, dtype) in OVERHEAD else "")
               + f"N={n} tokens, V={v}, {H.DTYPE_NAMES[dtype]}, "
               f"{'fwd' if mode == 'fwd' else 'fwd+bwd'}"),
        tol=dict(H.DEFAULT_TOL[dtype]),
        floor=floor,
        notes=notes,
    )


def cases(device: str, quick: bool, dtype: str | None = None) -> list:
    shapes = OVERHEAD + (QUICK if quick else SMALL + FULL)
    return H.unique_cases(_case(n, v, dtype or dt, mode) for n, v, dt in shapes
                          for mode in ("fwd", "fwdbwd"))


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    import torch

    g = H.make_generator(device, seed)
    n, v = case.dims["N"], case.dims["V"]
    base = H.randn_fast((n, v), H.torch_dtype(case.dtype), device, g, scale=2.0)
    target = torch.randint(0, v, (n,), generator=g, device=device)
    if case.mode == "fwdbwd":
        base.requires_grad_(True)
    return {"base": base, "target": target}


def make_runner(provider: str, case: Case, inputs: dict, device: str, opts: dict) -> Runner:
    import torch
    import torch.nn.functional as F

    backend = opts.get("backend", "auto")
    if provider == "fusedloss":
        ce = H.resolve("fusedloss.cross_entropy")
        fn = lambda x, y: ce(x, y, backend=backend)  # noqa: E731
    elif provider == "fusedloss-inplace":
        ce = H.resolve("fusedloss.cross_entropy")
        fn = lambda x, y: ce(x, y, inplace_backward=True, backend=backend)  # noqa: E731
    elif provider == "torch eager":
        fn = F.cross_entropy
    elif provider == "torch.compile":
        fn = torch.compile(lambda x, y: F.cross_entropy(x, y), dynamic=False)
    elif provider == "reference":
        fn = H.resolve("fusedloss.reference.cross_entropy")
    elif provider == "liger":
        if device != "cuda":
            raise ProviderUnavailable("liger needs CUDA")
        fn = H.resolve("liger_kernel.transformers.LigerCrossEntropyLoss")()
    elif provider == "quack":
        if device != "cuda":
            raise ProviderUnavailable("quack needs CUDA")
        quack_ce = H.resolve("quack.cross_entropy.cross_entropy")
        fn = lambda x, y: quack_ce(x, y, reduction="mean")  # noqa: E731
    else:
        raise ProviderUnavailable(f"unknown provider {provider!r}")
    return H.LogitsTargetRunner(fn, inputs, case.mode)


def sweep_cases(device: str, kind: str, dtype: str | None = None) -> list:
    """--sweep V: fwd+bwd over vocabulary sizes at a fixed number of rows."""
    if kind != "V":
        return []
    n = 1024 if device == "cpu" else 4096
    return [_case(n, v, dtype or "fp32", "fwdbwd")
            for v in (1024, 4096, 16384, 32000, 65536, 128256)]
