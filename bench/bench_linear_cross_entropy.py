"""Linear cross-entropy (LM head + loss) benchmark cases:
loss = CE(input @ linear_weight.T, target), mean, fwd+bwd producing the gradients of ``input``
(N, H) and ``linear_weight`` (V, H)."""

from __future__ import annotations

import math

from . import _harness as H
from ._harness import Case, Provider, ProviderUnavailable, Runner

LOSS = "linear_cross_entropy"


def _options_class():
    """torch's chunking options: ``torch.nn.LinearCrossEntropyOptions`` in torch 2.13 (it is *not*
    in torch.nn.functional there); look in both places."""
    import torch
    import torch.nn.functional as F

    cls = (getattr(F, "LinearCrossEntropyOptions", None)
           or getattr(torch.nn, "LinearCrossEntropyOptions", None))
    if cls is None:
        raise ProviderUnavailable("this torch has no LinearCrossEntropyOptions")
    return cls


PROVIDERS = {
    "fusedloss": Provider(requires=["fusedloss.linear_cross_entropy"],
                          desc="fusedloss.linear_cross_entropy(backend='auto')"),
    "torch chunked": Provider(requires=["torch.nn.functional.linear_cross_entropy",
                                        "torch.nn.LinearCrossEntropyOptions"],
                              not_quick_on=("cpu",),
                              desc="F.linear_cross_entropy(..., "
                                   "options=torch.nn.LinearCrossEntropyOptions())"),
    "torch eager": Provider(desc="F.cross_entropy(F.linear(input, linear_weight), target)"),
    "torch.compile": Provider(desc="torch.compile of the eager function, compiled in the warm-up"),
    "reference": Provider(requires=["fusedloss.reference.linear_cross_entropy"], max_repeats=2,
                          thp_settings=("default",),
                          desc="fusedloss.reference.linear_cross_entropy"),
    "liger": Provider(requires=["liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss"],
                      devices=("cuda",), desc="liger_kernel LigerFusedLinearCrossEntropyLoss"),
}

CHECK_ORDER = ["reference", "torch eager"]

# (N tokens, H hidden, V vocabulary, dtype, heavy on CPU)
FULL = [(4096, 512, 32000, "fp32", False), (4096, 512, 128256, "fp32", True)]
# quick: H=128, not 256: torch chunked's CPU heuristics take ~3 s per call at 1024x256x8192
QUICK = [(1024, 128, 8192, "fp32", False)]
# The default run leaves linear CE out on CPU (about 2.5 s per call per provider); --full or
# --loss linear_cross_entropy runs it.
DEFAULT_CASES = ()


def _case(n, h, v, dtype, heavy) -> Case:
    elt = H.DTYPE_SIZE[dtype]
    notes = [
        f"extra memory includes input.grad ({H._fmt_mib(n * h * elt)} MiB) and linear_weight.grad "
        f"({H._fmt_mib(v * h * elt)} MiB); logits size shown for scale only",
        "torch chunked = F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions()) "
        "(the class lives in torch.nn, not torch.nn.functional, in torch 2.13); on CPU float32 its "
        "'auto' options resolve to acc_policy='compact', which torch's own source notes runs "
        "emulated low-precision matmuls on CPU, 20-50x slower (left out of --quick on CPU)",
    ]
    if heavy:
        notes.append("heavy on CPU (~20-40 s per call): run with --all")
    return Case(
        loss=LOSS,
        name=f"lce_{n}x{h}x{v}_{dtype}_fwdbwd",
        mode="fwdbwd",
        dtype=dtype,
        dims={"N": n, "H": h, "V": v},
        providers=list(PROVIDERS),
        check_order=list(CHECK_ORDER),
        logits_bytes=n * v * elt,
        title=f"N={n}, H={h}, V={v}, {H.DTYPE_NAMES[dtype]}, fwd+bwd (grads: input, linear_weight)",
        tol={"loss": H.DEFAULT_TOL[dtype]["loss"], "grad": max(1e-3, H.DEFAULT_TOL[dtype]["grad"])},
        heavy=heavy,
        floor={"flops": 6 * n * h * v, "exp": n * v},
        notes=notes,
    )


def cases(device: str, quick: bool, dtype: str | None = None) -> list:
    return H.unique_cases(_case(n, h, v, dtype or dt, heavy and device == "cpu")
                          for n, h, v, dt, heavy in (QUICK if quick else FULL))


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    import torch

    g = H.make_generator(device, seed)
    n, h, v = case.dims["N"], case.dims["H"], case.dims["V"]
    dt = H.torch_dtype(case.dtype)
    x = H.randn_fast((n, h), dt, device, g).requires_grad_(True)
    w = H.randn_fast((v, h), dt, device, g, scale=2.0 / math.sqrt(h)).requires_grad_(True)
    target = torch.randint(0, v, (n,), generator=g, device=device)
    return {"input": x, "linear_weight": w, "target": target}


class LCERunner(Runner):
    def __init__(self, fn, inputs: dict):
        self.fn = fn
        self.x = inputs["input"]
        self.w = inputs["linear_weight"]
        self.y = inputs["target"]
        self.loss = None

    def setup(self):
        self.loss = None
        self.x.grad = None
        self.w.grad = None

    def step(self):
        loss = self.fn(self.x, self.w, self.y)
        loss.backward()
        self.loss = loss.detach()

    def outputs(self):
        return {
            "loss": self.loss,
            "grad_input": self.x.grad,
            "grad_linear_weight": H.sample_rows(self.w.grad, max_elems=1 << 26, rows=1024),
        }

    def teardown(self):
        self.setup()


def make_runner(provider: str, case: Case, inputs: dict, device: str, opts: dict) -> Runner:
    import torch
    import torch.nn.functional as F

    backend = opts.get("backend", "auto")
    if provider == "fusedloss":
        lce = H.resolve("fusedloss.linear_cross_entropy")
        fn = lambda x, w, y: lce(x, w, y, backend=backend)  # noqa: E731
    elif provider == "torch chunked":
        opt = _options_class()()
        fn = lambda x, w, y: F.linear_cross_entropy(x, w, y, options=opt)  # noqa: E731
    elif provider == "torch eager":
        fn = lambda x, w, y: F.cross_entropy(F.linear(x, w), y)  # noqa: E731
    elif provider == "torch.compile":
        fn = torch.compile(lambda x, w, y: F.cross_entropy(F.linear(x, w), y), dynamic=False)
    elif provider == "reference":
        fn = H.resolve("fusedloss.reference.linear_cross_entropy")
    elif provider == "liger":
        if device != "cuda":
            raise ProviderUnavailable("liger needs CUDA")
        m = H.resolve("liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss")()
        fn = lambda x, w, y: m(w, x, y)  # noqa: E731  (liger takes the weight first)
    else:
        raise ProviderUnavailable(f"unknown provider {provider!r}")
    return LCERunner(fn, inputs)


def sweep_cases(device: str, kind: str, dtype: str | None = None) -> list:
    """--sweep V: fwd+bwd over vocabulary sizes at N=1024, H=256 on CPU (the GEMMs decide there),
    N=4096, H=4096 on CUDA."""
    if kind != "V":
        return []
    n, h = (1024, 256) if device == "cpu" else (4096, 4096)
    return [_case(n, h, v, dtype or "fp32", False) for v in (4096, 16384, 32000, 65536)]
