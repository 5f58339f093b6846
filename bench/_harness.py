"""Shared benchmark machinery: the case/provider model, timing, memory, checks, tables, JSON, plots.

A loss file ``bench/bench_<loss>.py`` defines:

``LOSS``            the loss name (``"cross_entropy"``)
``PROVIDERS``       ``{name: Provider(...)}``: who is measured, what each needs to be importable
``cases(device, quick)``            the list of :class:`Case` to run
``make_inputs(case, device)``      a dict of input tensors, deterministic, every page touched
``make_runner(provider, case, inputs, device, opts)``   a :class:`Runner`

Everything else (subprocesses, timing, memory, checks, printing, JSON, PNG) lives here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib
import json
import math
import os
import pkgutil
import statistics
import time
from typing import Any, Callable

MiB = 1024 * 1024

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp64": "fp64", "float64": "fp64", "double": "fp64",
}
DTYPE_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}

# Check tolerances by dtype: loss = relative error of the loss value,
# grad = max|g - g_ref| / max|g_ref|.
DEFAULT_TOL = {
    "fp64": {"loss": 1e-10, "grad": 1e-10},
    "fp32": {"loss": 1e-4, "grad": 1e-4},
    "bf16": {"loss": 2e-2, "grad": 2e-2},
    "fp16": {"loss": 5e-3, "grad": 5e-3},
}
# Peers (torch eager, torch.compile, ...) that round every intermediate to a half dtype may be this
# many times further from the target than fusedloss, which computes in fp32: a composite sigmoid
# focal loss in bf16 is 2.2e-2 off in its gradient. A semantic mismatch is still O(1).
PEER_HALF_TOL_FACTOR = 4.0


def provider_tol(case, provider: str) -> dict:
    """The check tolerance for one provider of a case."""
    if provider.startswith(FUSED) or case.dtype not in ("bf16", "fp16"):
        return dict(case.tol)
    return {k: v * PEER_HALF_TOL_FACTOR for k, v in case.tol.items()}


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPE_NAMES[name])


# --------------------------------------------------------------------------------------------------
# The model


@dataclasses.dataclass
class Provider:
    """One implementation being measured.

    requires: dotted names that must resolve (``"fusedloss.cross_entropy"``); checked once per run
    in the probe subprocess so an unavailable provider costs no worker start-up.
    devices / modes: where it applies (None = everywhere).
    max_repeats: cap on the timed repeats (for the slow reference).
    not_quick_on: devices where --quick skips it.
    thp_settings: on CPU, the allocator settings it is timed under (the slow reference: default).
    """

    requires: list = dataclasses.field(default_factory=list)
    devices: tuple | None = None
    modes: tuple | None = None
    max_repeats: int | None = None
    desc: str = ""
    not_quick_on: tuple = ()       # devices where --quick leaves it out (too slow for a smoke run)
    thp_settings: tuple | None = None  # CPU allocator settings it runs under (None = all)


@dataclasses.dataclass
class Case:
    loss: str                      # "cross_entropy"
    name: str                      # unique and stable: "ce_4096x32000_fp32_fwdbwd"
    mode: str                      # "fwd" | "fwdbwd"
    dtype: str                     # "fp32" | "bf16" | "fp16"
    dims: dict                     # shape parameters, e.g. {"N": 4096, "V": 32000}
    providers: list                # provider names, in run order
    check_order: list              # providers that may serve as the check target, by preference
    logits_bytes: int              # size of the full logits tensor, for the "x logits" column
    title: str = ""                # one line describing the case
    tol: dict = dataclasses.field(default_factory=dict)
    heavy: bool = False            # skipped on CPU unless --all (minutes per provider)
    floor: dict = dataclasses.field(default_factory=dict)  # minimal work: bytes / exp / flops
    notes: list = dataclasses.field(default_factory=list)  # footnotes printed under the table

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Case":
        return cls(**d)


def unique_cases(cases) -> list:
    """The cases in order, each name once (a --dtype override can map two shapes to one case)."""
    out, seen = [], set()
    for c in cases:
        if c.name not in seen:
            seen.add(c.name)
            out.append(c)
    return out


class ProviderUnavailable(Exception):
    """Raised by make_runner when a provider cannot run here (import failed, wrong device...)."""


class Runner:
    """One provider on one case. The worker calls setup() before every call of step() (untimed),
    times step(), and after the last repeat reads outputs() for the correctness check."""

    def setup(self) -> None:  # untimed, before each step
        pass

    def step(self) -> None:  # timed
        raise NotImplementedError

    def outputs(self) -> dict:  # {"loss": tensor, "grad_...": tensor}, after the last step
        raise NotImplementedError

    def teardown(self) -> None:
        pass


def resolve(dotted: str):
    """Import ``a.b.c`` as far as it is a module and getattr the rest; raise with a short reason."""
    parts = dotted.split(".")
    obj = None
    err = None
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            err = e
            if e.name and not ".".join(parts[:i]).startswith(e.name):
                raise  # a dependency of the module is missing: report that
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise AttributeError(f"{'.'.join(parts[:i])} has no attribute "
                                     f"{'.'.join(parts[i:])}")
            obj = getattr(obj, attr)
        return obj
    raise err if err else ImportError(dotted)


def short_error(e: BaseException, limit: int = 300) -> str:
    s = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Loss modules


def loss_modules() -> list:
    """Every ``bench/bench_*.py``, imported, in file-name order, cross_entropy first."""
    pkg = importlib.import_module(__package__)  # "bench" in a checkout, "fusedloss.bench" installed
    names = sorted(
        m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_")
    )
    names.sort(key=lambda n: (n != "bench_cross_entropy", n))
    return [importlib.import_module(f"{__package__}.{n}") for n in names]


def module_for_loss(loss: str):
    return importlib.import_module(f"{__package__}.bench_{loss}")


# --------------------------------------------------------------------------------------------------
# Inputs


def randn_fast(shape, dtype, device, generator, scale: float = 1.0):
    """Gaussian-ish values, fast: torch's CPU normal_ is single-threaded (~3 s per GiB here), so big
    tensors are filled block-wise as R[i % B] + S[i // B] with R (B, ...) and S (K, ...) Gaussian,
    each scaled by 1/sqrt(2); every row is distinct and every page is written. Writes straight into
    the target dtype, with no full-size float32 temporary."""
    import torch

    numel = math.prod(shape)
    if numel <= (1 << 22) or len(shape) < 2:
        return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)
    n = shape[0]
    rest = tuple(shape[1:])
    b = min(n, 64)
    k = -(-n // b)
    r = torch.randn((b,) + rest, generator=generator, device=device) * (scale / math.sqrt(2.0))
    s = torch.randn((k,) + rest, generator=generator, device=device) * (scale / math.sqrt(2.0))
    out = torch.empty(shape, dtype=dtype, device=device)
    for j in range(k):
        lo, hi = j * b, min(n, (j + 1) * b)
        torch.add(r[: hi - lo], s[j], out=out[lo:hi])
    return out


def make_generator(device: str, seed: int):
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sample_rows(t, max_elems: int = 1 << 22, rows: int = 256):
    """The tensor itself when small, else ``rows`` evenly spaced rows (first and last included)."""
    import torch

    if t.numel() <= max_elems or t.dim() < 2:
        return t
    idx = torch.linspace(0, t.shape[0] - 1, rows, device=t.device).round().long().unique()
    return t.index_select(0, idx)


class ProduceLogits:
    """A non-leaf copy of a leaf whose backward takes the gradient, as an lm_head's matmul would.

    ``inplace_backward`` may overwrite its input, which autograd forbids for a leaf that requires
    grad, so every fwd+bwd provider gets logits = ProduceLogits.apply(base, sink): a clone made
    *before* the timer starts, whose backward stores the incoming gradient in ``sink["grad"]``
    (no copy) and passes nothing on, like the producer op of real logits that consumes the
    gradient. (Handing it on to ``base.grad`` would let AccumulateGrad steal or copy it depending
    on who else holds it: a copy of the gradient that no training step makes.) All providers get
    the same, so the comparison stays fair, and no producer cost lands in the timed region.
    """

    _fn = None

    @classmethod
    def apply(cls, base, sink: dict):
        if cls._fn is None:
            import torch

            class _Produce(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x, sink):
                    ctx.sink = sink
                    return x.clone()

                @staticmethod
                def backward(ctx, g):
                    ctx.sink["grad"] = g
                    return None, None

            cls._fn = _Produce
        return cls._fn.apply(base, sink)


# --------------------------------------------------------------------------------------------------
# Memory


_libc = None


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS so it cannot hide the next allocation from RSS."""
    global _libc
    gc.collect()
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except Exception:
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    """Peak RSS of this process image. This is the counter getrusage(RUSAGE_SELF).ru_maxrss reads,
    except that ru_maxrss is also floored by the peak of the process that exec'd us (with vfork,
    which Python's subprocess uses, that is the *parent's* peak); VmHWM is not, and it can be
    reset."""
    return _status_kib("VmHWM") * 1024


def ru_maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemMeter:
    """Extra memory during a window: CUDA max_memory_allocated over the window minus the allocated
    bytes at its start; CPU peak RSS (VmHWM, reset at the start) minus the RSS at the start."""

    def __init__(self, device: str):
        self.device = device
        self.base = 0
        self.valid = True

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            malloc_trim()
            self.base = rss_bytes()
            self.valid = reset_peak_rss() or hwm_bytes() <= self.base

    def stop(self) -> int | None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        if not self.valid:
            return None
        return max(0, hwm_bytes() - self.base)


# --------------------------------------------------------------------------------------------------
# Timing


def sync_fn(device: str) -> Callable[[], None]:
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def measure(runner: Runner, device: str, warmup: int, repeats: int, max_time: float,
            min_repeats: int = 3) -> dict:
    """Warm up with ``warmup`` calls (compiles, first touch, lazy init; not counted), then time
    ``repeats`` calls, each alone with time.perf_counter (CUDA synchronised around it) and setup()
    untimed before each, stopping early once ``min_repeats`` are done and ``max_time`` seconds have
    been spent.

    Memory: just before the timed calls (inputs resident, first setup() done) freed heap memory is
    handed back to the OS (malloc_trim) and the peak reset; extra = peak over the timed calls minus
    the resident size then (CPU: VmHWM vs VmRSS; CUDA: max_memory_allocated vs memory_allocated).
    The trim can only slow the first timed call (allocations under glibc's 32 MiB mmap threshold
    fault in again; larger ones are fresh mmaps on every call anyway), which the median absorbs."""
    sync = sync_fn(device)
    meter = MemMeter(device)

    meter.start()
    w0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        runner.setup()
        sync()
        runner.step()
        sync()
    warmup_s = time.perf_counter() - w0
    warmup_extra = meter.stop()

    runner.setup()
    meter.start()
    baseline = meter.base
    times, trace = [], []
    t_start = time.perf_counter()
    for i in range(max(1, repeats)):
        if i:
            runner.setup()
        sync()
        t0 = time.perf_counter()
        runner.step()
        sync()
        times.append(time.perf_counter() - t0)
        if device == "cpu":
            trace.append((rss_bytes() >> 20, hwm_bytes() >> 20))
        if i + 1 >= min_repeats and time.perf_counter() - t_start > max_time:
            break
    extra = meter.stop()
    return {
        "times_ms": [t * 1e3 for t in times],
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "repeats": len(times),
        "warmup_s": warmup_s,
        "extra_bytes": extra,
        "warmup_extra_bytes": warmup_extra,  # includes compilation for torch.compile
        "baseline_bytes": baseline,
        "mem_trace_mib": trace,  # CPU: (RSS, peak RSS) after each timed call, for digging
        # lifetime peak, floored by what the process inherited at exec/fork: not used, for reference
        "ru_maxrss_lifetime_bytes": ru_maxrss_bytes() if device == "cpu" else None,
    }


# --------------------------------------------------------------------------------------------------
# Checks


def check_outputs(out: dict, ref: dict, tol: dict) -> dict:
    """Compare a provider's outputs with the target's. loss: |a-b|/max(|b|,1e-6); tensors:
    max|a-b| / max|b|. Both in float64. NaN or a missing/misshaped output fails."""
    import torch

    errors, fails = {}, []
    for key, b in ref.items():
        a = out.get(key)
        kind = "loss" if key == "loss" else "grad"
        limit = tol.get(kind, 0.0)
        if a is None:
            fails.append(f"{key} missing")
            continue
        if tuple(a.shape) != tuple(b.shape):
            fails.append(f"{key} shape {tuple(a.shape)} != {tuple(b.shape)}")
            continue
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        if not torch.isfinite(a64).all():
            fails.append(f"{key} non-finite")
            errors[key] = float("nan")
            continue
        diff = (a64 - b64).abs().max().item() if a64.numel() else 0.0
        if kind == "loss":
            err = diff / max(b64.abs().max().item(), 1e-6)
        else:
            err = diff / max(b64.abs().max().item(), 1e-30)
        errors[key] = err
        if not err <= limit:
            fails.append(f"{key} err {err:.1e} > {limit:.0e}")
    return {"pass": not fails, "errors": errors, "fails": fails, "tol": tol}


# --------------------------------------------------------------------------------------------------
# Machine context (run in the probe subprocess)


def machine_context(device: str) -> dict:
    """Copy bandwidth and exp throughput on this device, for a roofline; plus a GEMM rate."""
    import torch

    sync = sync_fn(device)

    def best(fn, n):
        fn()
        sync()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    def copy_and_exp(n):
        a = torch.empty(n, device=device)
        a.uniform_(-1, 1)
        b = torch.empty_like(a)
        b.zero_()
        return best(lambda: b.copy_(a), 5), best(lambda: torch.exp(a, out=b), 5)

    n = (1 << 26) if device == "cpu" else (1 << 28)  # 256 MiB / 1 GiB of fp32
    t_copy, t_exp = copy_and_exp(n)  # a and b are freed on its return, before the GEMM's buffers
    m = 2048 if device == "cpu" else 8192
    x = torch.randn(m, m, device=device)
    y = torch.randn(m, m, device=device)
    t_mm = best(lambda: torch.mm(x, y), 3)
    return {
        "copy_GBps": 2 * n * 4 / t_copy / 1e9,  # read + write
        "exp_Gelemps": n / t_exp / 1e9,
        "gemm_fp32_GFLOPs": 2 * m ** 3 / t_mm / 1e9,
        "buffer_MiB": n * 4 / MiB,
        "note": "copy: b.copy_(a) counting read+write bytes; exp: torch.exp(a, out=b), fp32; "
                f"gemm: {m}^3 fp32 torch.mm; best of 5/5/3 after one warm-up call",
    }


def floor_ms(case: Case, machine: dict) -> dict | None:
    """Lower bounds on the time of a case from the machine's measured rates."""
    if not machine or not case.floor:
        return None
    parts = {}
    if "bytes" in case.floor and machine.get("copy_GBps"):
        parts["memory"] = case.floor["bytes"] / (machine["copy_GBps"] * 1e9) * 1e3
    if "exp" in case.floor and machine.get("exp_Gelemps"):
        parts["exp"] = case.floor["exp"] / (machine["exp_Gelemps"] * 1e9) * 1e3
    if "flops" in case.floor and machine.get("gemm_fp32_GFLOPs"):
        parts["gemm"] = case.floor["flops"] / (machine["gemm_fp32_GFLOPs"] * 1e9) * 1e3
    return parts or None


# --------------------------------------------------------------------------------------------------
# Printing


THP_LABEL = {
    "default": "allocator default (THP_MEM_ALLOC_ENABLE unset)",
    "on": "allocator THP on (THP_MEM_ALLOC_ENABLE=1: 2 MiB-aligned, madvise(MADV_HUGEPAGE))",
    "n/a": "CUDA caching allocator",
}

FUSED = "fusedloss"


def _fmt_ms(x):
    if x is None:
        return "-"
    if x < 1:
        return f"{x:.4f}"
    return f"{x:.2f}" if x < 100 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _fmt_mib(b):
    if b is None:
        return "n/a"
    v = b / MiB
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _ratio(a, b, floor=None):
    if a is None or b is None:
        return "-"
    if floor is not None and b < floor:
        return "-"
    if b <= 0:
        return "-"
    return f"{a / b:.2f}x"


def format_table(case: Case, thp: str, rows: list, machine: dict | None, device: str) -> str:
    """rows: worker results for this case and allocator setting, in provider order."""
    lines = []
    head = f"== {case.loss} / {case.name}: {case.title}"
    lines.append(head)
    alloc = THP_LABEL["n/a"] if device == "cuda" else THP_LABEL[thp]
    lines.append(f"   device {device} | {alloc} | logits {_fmt_mib(case.logits_bytes)} MiB")
    fl = floor_ms(case, machine)
    if fl:
        label = {"memory": f"moving {_fmt_mib(case.floor.get('bytes'))} MiB (logits in"
                           + (", gradient out" if case.mode == "fwdbwd" else "")
                           + ") at copy speed",
                 "exp": "one torch.exp per logit", "gemm": "the 3 GEMMs at torch.mm speed"}
        lines.append("   roofline at this run's measured rates: " + "; ".join(
            f"{label[k]} {_fmt_ms(v)} ms" for k, v in fl.items()))
    fused = next((r for r in rows if r["provider"] == FUSED and r.get("status") == "ok"), None)
    f_t = fused["median_ms"] if fused else None
    f_m = fused["extra_bytes"] if fused else None
    interleaved = any(r.get("timing") == "interleaved" for r in rows)
    if interleaved:
        lines.append("   timing: providers interleaved in one long-lived process, one step each "
                     "per round (a training loop's calls); memory: a fresh process per provider "
                     "(fusedloss with FUSEDLOSS_CPU_GRAD_BUFFER=fresh: its default keeps the "
                     "gradient buffer resident between steps, the same peak; glibc's mmap "
                     "threshold fixed at 1 MiB for every provider, so freed buffers cannot stay "
                     "resident and count)")
    fresh = any(r.get("fresh_median_ms") is not None for r in rows)
    hdr = ["provider", "median ms", "min ms", "n", "time vs fusedloss"]
    hdr += ["fresh-process ms"] if fresh else []
    hdr += ["extra MiB", "x logits", "mem vs fusedloss", "check"]
    table = [hdr]
    other = []
    for r in rows:
        p = r["provider"]
        st = r.get("status")
        if st != "ok":
            other.append(f"   {p:<18} {st}: {r.get('reason', '')}")
            continue
        chk = r.get("check") or {}
        if chk.get("target_self"):
            mark = "target"
        elif "pass" not in chk:
            mark = "-" if not chk.get("reason") else "? " + chk["reason"]
        else:
            mark = "✓" if chk["pass"] else "✗ " + "; ".join(chk["fails"])
        xl = (f"{r['extra_bytes'] / case.logits_bytes:.2f}" if r.get("extra_bytes") is not None
              else "n/a")
        reps = str(r["repeats"]) + (f"x{r['inner']}" if r.get("inner", 1) > 1 else "")
        row = [p, _fmt_ms(r["median_ms"]), _fmt_ms(r["min_ms"]), reps,
               _ratio(r["median_ms"], f_t)]
        row += [_fmt_ms(r.get("fresh_median_ms"))] if fresh else []
        row += [_fmt_mib(r.get("extra_bytes")), xl, _ratio(r.get("extra_bytes"), f_m, floor=MiB),
                mark]
        table.append(row)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(hdr))]
    for j, row in enumerate(table):
        cells = []
        for i, c in enumerate(row):
            cells.append(str(c).ljust(widths[i]) if i in (0, len(hdr) - 1)
                         else str(c).rjust(widths[i]))
        lines.append("   " + "  ".join(cells).rstrip())
        if j == 0:
            lines.append("   " + "  ".join("-" * w for w in widths))
    lines.extend(other)
    # footnotes
    tgt = next((r.get("check", {}).get("target") for r in rows
                if r.get("check", {}).get("target")), None)
    tol = case.tol
    if tgt:
        lines.append(f"   check: against {tgt!r} (its result on the same inputs, computed once "
                     f"per case); loss rel. err <= {tol.get('loss'):.0e}, "
                     f"grads max|d|/max|ref| <= {tol.get('grad'):.0e}"
                     + (f" (peers other than fusedloss: {PEER_HALF_TOL_FACTOR:g}x, they round "
                        "every step to the half dtype)" if case.dtype in ("bf16", "fp16") else ""))
    else:
        lines.append("   check: no check target ran (reference and torch eager both unavailable)")
    for n in case.notes:
        lines.append(f"   note: {n}")
    for r in rows:
        for w in r.get("warnings", [])[:2]:
            lines.append(f"   warning ({r['provider']}): {w}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plot


def write_plot(path: str, cases: list, results: list, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in cases
             if any(r["case"] == c.name and r.get("status") == "ok" for r in results)]
    if not cases:
        return
    thps = sorted({r["thp"] for r in results}, key=lambda t: ("default", "on", "n/a").index(t))
    fig, axes = plt.subplots(len(cases), 2, figsize=(13, 2.8 * len(cases) + 0.6), squeeze=False)
    for ci, case in enumerate(cases):
        provs = [p for p in case.providers
                 if any(r["case"] == case.name and r["provider"] == p and r.get("status") == "ok"
                        for r in results)]
        width = 0.8 / max(1, len(thps))
        for col, (key, label, scale) in enumerate(
                [("median_ms", "median time (ms)", 1.0),
                 ("extra_bytes", "extra memory (MiB)", 1 / MiB)]):
            ax = axes[ci][col]
            allv = []
            for ti, thp in enumerate(thps):
                vals = []
                for p in provs:
                    r = next((r for r in results if r["case"] == case.name and r["provider"] == p
                              and r["thp"] == thp and r.get("status") == "ok"), None)
                    v = r.get(key) if r else None
                    vals.append(v * scale if v is not None else 0.0)
                xs = [i + (ti - (len(thps) - 1) / 2) * width for i in range(len(provs))]
                lab = {"default": "THP default", "on": "THP on", "n/a": device}[thp]
                bars = ax.bar(xs, vals, width=width, label=lab)
                ax.bar_label(bars, labels=[(f"{v:.0f}" if v >= 100 else f"{v:.3g}") if v else ""
                                           for v in vals], fontsize=6, padding=1)
                allv.extend(v for v in vals if v > 0)
            if key == "median_ms" and allv and max(allv) / min(allv) > 30:
                ax.set_yscale("log")
                label += ", log scale"
            ax.set_xticks(range(len(provs)))
            ax.set_xticklabels(provs, rotation=15, fontsize=8)
            ax.set_title(f"{case.name}: {label}", fontsize=9)
            if key == "extra_bytes":
                ax.axhline(case.logits_bytes / MiB, color="gray", ls="--", lw=0.8,
                           label="logits size")
                ax.legend(fontsize=7, loc="upper left")
            if len(thps) > 1 and ci == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"fusedloss benchmarks on {device}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dump_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


class LogitsTargetRunner(Runner):
    """``fn(logits, target)``, or ``fn(logits)`` when the inputs have no target (TV's images): fwd
    on the base logits; fwd+bwd on a fresh non-leaf copy per step (ProduceLogits), whose gradient
    the sink keeps for the check (cross-entropy, BCE, both focal losses, Dice, TV)."""

    def __init__(self, fn, inputs: dict, mode: str):
        self.fn = fn
        self.base = inputs["base"]
        self.rest = (inputs["target"],) if "target" in inputs else ()
        self.mode = mode
        self.logits = None
        self.loss = None
        self.sink = {}

    def setup(self):
        self.loss = None
        if self.mode == "fwdbwd":
            self.sink.clear()
            self.logits = None
            self.logits = ProduceLogits.apply(self.base, self.sink)

    def step(self):
        if self.mode == "fwd":
            self.loss = self.fn(self.base, *self.rest)
            return
        logits, self.logits = self.logits, None
        loss = self.fn(logits, *self.rest)
        del logits
        loss.backward()
        self.loss = loss.detach()

    def outputs(self):
        out = {"loss": self.loss}
        if self.mode == "fwdbwd":
            g = self.sink["grad"]  # rows of the leading dim, the rest flattened
            out["grad"] = sample_rows(g.reshape(g.shape[0], -1))
        return out

    def teardown(self):
        self.logits = None
        self.loss = None
        self.sink.clear()
