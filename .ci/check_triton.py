#!/usr/bin/env python
"""Ahead-of-time check of fusedloss's Triton kernels for sm_80 and sm_90, without a GPU.

How. The launchers in kernels/ are called on ``meta`` tensors (shapes of any size, no memory) with
a stand-in triton driver that names the target GPU, and with ``JITFunction._do_compile`` replaced
by a recorder: triton specialises each launch exactly as it would on that GPU (argument types,
16-byte alignment and divisibility of pointers and integers, constexprs, num_warps, debug) and we
keep that configuration and the launch grid instead of compiling. Each distinct configuration is
then compiled for real with ``triton.compile`` (triton's own LLVM and ptxas), in parallel.

What fails the check (exit status 1):
  * a configuration that does not compile;
  * any register spill (ptxas: bytes spill stores / loads);
  * a scenario whose rows are 16-byte alignable (class stride 1, or a dense tensor walked flat)
    but whose kernel has no 128-bit global load (or, for a kernel that writes a gradient tile, no
    128-bit store) in its PTX;
  * a launch grid beyond CUDA's limits (x <= 2^31 - 1, y and z <= 65535) at the worst shapes
    (N*V up to 2^34, linear cross-entropy's weight gradient V*H up to 2^33), or a launcher that
    raises on a realistic shape.
It prints a table: kernel, configuration, arch, registers, spill bytes, widest global load / store
(bits) and how many of the accesses are narrower.

    python .ci/check_triton.py            # every scenario, sm_80 and sm_90
    python .ci/check_triton.py --quick    # a subset (one aligned and one odd vocabulary, bf16)
    python .ci/check_triton.py --json out.json --keep-ptx /tmp/ptx

Adding a kernel: add its launches to ``scenarios()`` (label, call, alignable).
"""

import argparse
import collections
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton or the kernels are imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning

GRID_LIMITS = (2**31 - 1, 65535, 65535)
ARCHS = (80, 90)
VOCABS = (32000, 50257, 128256, 256000)
# (V, H) of lm_head weights whose gradient linear cross-entropy scales as (1, V*H, 1).
LM_HEADS = {"llama3-8b": (128256, 4096), "qwen2.5-72b": (152064, 8192),
            "gemma2-27b": (256000, 4608), "llama3.1-405b": (128256, 16384), "2^33": (2**20, 2**13)}

# ------------------------------------------------------------------------------------------------
# Scenarios: the launchers' real calls, on meta tensors
# ------------------------------------------------------------------------------------------------

CE_FEATURES = {  # label -> cross_entropy_fwd arguments
    "plain": dict(),
    "no-grad": dict(grad=False),
    "sum (no scale)": dict(scale=False),
    "smoothing": dict(ls=0.1),
    "z-loss": dict(z=1e-4),
    "softcap": dict(cap=30.0),
    "weight": dict(weight=True),
    "weight+smoothing": dict(weight=True, ls=0.1),
    "prob": dict(prob=True),
    "prob+weight+smoothing": dict(prob=True, weight=True, ls=0.1),
    "all idx": dict(weight=True, ls=0.1, z=1e-4, cap=30.0),
    "all idx no-grad": dict(weight=True, ls=0.1, z=1e-4, cap=30.0, grad=False),
    "all idx in-place": dict(weight=True, ls=0.1, z=1e-4, cap=30.0, inplace=True),
    "all prob": dict(prob=True, weight=True, ls=0.1, z=1e-4, cap=30.0),
    "all prob in-place": dict(prob=True, weight=True, ls=0.1, z=1e-4, cap=30.0, inplace=True),
}
QUICK_FEATURES = ("plain", "all idx", "all prob")


def scenarios(quick):
    """Yield (label, call, wide): call() runs a launcher on meta tensors; wide: the accesses that
    must be 128-bit because the rows can be walked with 16-byte aligned bodies: "ld+st" (loads,
    and stores where the kernel writes a tile), "ld" (loads only: a channels-last input's
    gradient is a new (N, C, H*W) tensor, whose rows are not the input's), "" (class stride
    != 1: nothing required)."""
    import torch

    from fusedloss.kernels import cross_entropy, logsumexp, scale_grad

    def empty(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def ce(N, C, D, dtype, prob=False, weight=False, ls=0.0, z=0.0, cap=0.0, scale=True,
           grad=True, inplace=False, layout="ncd"):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if layout == "channels_last":  # (N, D, C) memory seen as (N, C, D): class stride 1
            x = empty(N, D, C, dtype=dtype).transpose(1, 2)
        else:
            x = empty(N, C, D, dtype=dtype)
        t = empty(N, C, D, dtype=dtype) if prob else empty(N, D, dtype=torch.int64)
        w = empty(C, dtype=acc) if weight else None
        gs = empty((), dtype=acc) if scale else None
        if inplace:
            return lambda: cross_entropy.cross_entropy_fwd_inplace(x, t, w, gs, -100, ls, z, cap)
        return lambda: cross_entropy.cross_entropy_fwd(x, t, w, gs, -100, ls, z, cap, grad)

    def scale(shape, dtype, per_row):
        g = empty(*shape, dtype=dtype)
        rows = (shape[0], shape[2])
        gl = empty(*rows, dtype=torch.float32) if per_row else \
            empty((), dtype=torch.float32).expand(*rows)
        return lambda: scale_grad.scale_grad_(g, gl)

    def lse(N, C, dtype):
        x = empty(N, C, 1, dtype=dtype)
        return lambda: logsumexp.logsumexp_fwd(x)

    dtypes = {"bf16": torch.bfloat16} if quick else {"fp32": torch.float32,
                                                      "bf16": torch.bfloat16}
    vocabs = (50257, 128256) if quick else VOCABS
    features = {k: CE_FEATURES[k] for k in QUICK_FEATURES} if quick else CE_FEATURES
    N = 8192
    for dname, dt in dtypes.items():
        for V in vocabs:
            for fname, kw in features.items():
                yield f"CE N={N} V={V} {dname} {fname}", ce(N, V, 1, dt, **kw), "ld+st"
            yield f"scale_grad scalar N={N} V={V} {dname}", scale((N, V, 1), dt, False), "ld+st"
            yield f"scale_grad per-row N={N} V={V} {dname}", scale((N, V, 1), dt, True), "ld+st"
            yield f"logsumexp N={N} V={V} {dname}", lse(N, V, dt), "ld+st"
    # Linear cross-entropy's backward: grad_weight (V, H) scaled as (1, V*H, 1), and chunks of
    # logits (rows, V, 1) scaled per row.
    for name, (V, H) in LM_HEADS.items():
        if quick and name != "2^33":
            continue
        yield (f"scale_grad LCE grad_weight {name} V*H={V * H} bf16",
               scale((1, V * H, 1), torch.bfloat16, False), "ld+st")
    # The worst shapes: N*V = 2^34 logits.
    for V in ((50257,) if quick else (32000, 50257, 256000)):
        n = 2**34 // V
        yield f"CE N*V=2^34 V={V} bf16 plain", ce(n, V, 1, torch.bfloat16), "ld+st"
        yield f"scale_grad per-row N*V=2^34 V={V} bf16", scale((n, V, 1), torch.bfloat16, True), \
            "ld+st"
        yield f"scale_grad scalar N*V=2^34 V={V} bf16", scale((n, V, 1), torch.bfloat16, False), \
            "ld+st"
    yield "CE seg N=1 C=19 D=2^34/19 bf16", ce(1, 19, 2**34 // 19, torch.bfloat16), ""
    yield from elementwise_scenarios(quick)
    yield from softmax_focal_scenarios(quick)
    yield from dice_scenarios(quick)
    if quick:
        return
    fp16 = torch.float16
    yield "CE N=8192 V=50257 fp16 plain", ce(8192, 50257, 1, fp16), "ld+st"
    yield "CE N=8192 V=128256 fp16 all idx", ce(8192, 128256, 1, fp16, **CE_FEATURES["all idx"]), \
        "ld+st"
    yield "CE N=4096 V=32000 fp64 plain", ce(4096, 32000, 1, torch.float64), "ld+st"
    yield "CE N=4096 V=50257 fp64 all idx", ce(4096, 50257, 1, torch.float64,
                                               **CE_FEATURES["all idx"]), "ld+st"
    # Small class counts: segmentation (N, C, H*W) with class stride H*W, its channels-last
    # layout (class stride 1), classification heads.
    for C in (19, 21):
        for dname, dt in dtypes.items():
            D = 512 * 512
            yield f"CE seg N=8 C={C} D={D} {dname}", ce(8, C, D, dt, weight=True), ""
            yield (f"CE seg channels-last N=8 C={C} D={D} {dname}",
                   ce(8, C, D, dt, weight=True, layout="channels_last"), "ld")
            yield f"scale_grad seg per-row N=8 C={C} D={D} {dname}", scale((8, C, D), dt, True), ""
    yield "CE cls N=4096 C=1000 fp32 smoothing", ce(4096, 1000, 1, torch.float32, ls=0.1), \
        "ld+st"
    yield "CE cls N=4096 C=1001 bf16 smoothing", ce(4096, 1001, 1, torch.bfloat16, ls=0.1), \
        "ld+st"
    # Total variation (kernels/tv.py): the bench's image batch and 4K frame, each norm, weighted
    # (a per-image map (N, 1, H, W), read by stride) or not, with and without the gradient.
    from fusedloss.kernels import tv

    def tv_call(shape, dtype, norm, weight, grad):
        x = empty(*shape, dtype=dtype)
        w = empty(shape[0], 1, *shape[2:], dtype=dtype).expand(shape) if weight else None
        return lambda: tv.tv_fwd(x, w, norm, 1e-6 if norm == 2 else 0.0, 1.0, grad)

    for shape in ((16, 3, 512, 512), (1, 3, 2160, 3840)):
        for dname, dt in {"fp32": torch.float32, "bf16": torch.bfloat16}.items():
            for norm, nname in enumerate(("l1", "l2_squared", "isotropic")):
                for weight in (False, True):
                    yield (f"TV {shape} {dname} {nname}{' weight' if weight else ''}",
                           tv_call(shape, dt, norm, weight, True), "ld+st")
            yield f"TV {shape} {dname} l1 no-grad", tv_call(shape, dt, 0, False, False), "ld"
    yield "TV (2, 3, 517, 301) fp64 isotropic weight", \
        tv_call((2, 3, 517, 301), torch.float64, 2, True, True), ""


def elementwise_scenarios(quick):
    """sigmoid_focal_fwd and bce_fwd: detection (16, 100000, 80) and segmentation
    (64, 1, 512, 512) shapes, every feature flag, a broadcast (strided) operand, 2^34 elements."""
    import torch

    from fusedloss.kernels import bce, sigmoid_focal

    def empty(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def sf(shape, dtype, weight=None, alpha=0.25, gamma=2.0, red=1, grad=True):
        x, t = empty(*shape, dtype=dtype), empty(*shape, dtype=dtype)
        w = None if weight is None else empty(*weight, dtype=dtype)
        return lambda: sigmoid_focal.sigmoid_focal_fwd(x, t, w, alpha, gamma, 1.0, red, grad)

    def bc(shape, dtype, weight=None, pos_weight=None, red=1, grad=True):
        x, t = empty(*shape, dtype=dtype), empty(*shape, dtype=dtype)
        w = None if weight is None else empty(*weight, dtype=dtype)
        pw = None if pos_weight is None else empty(*pos_weight, dtype=dtype)
        return lambda: bce.bce_fwd(x, t, w, pw, 1.0, red, grad)

    det, seg = (16, 100000, 80), (64, 1, 512, 512)
    dtypes = {"bf16": torch.bfloat16} if quick else {"fp32": torch.float32,
                                                      "bf16": torch.bfloat16}
    for dname, dt in dtypes.items():
        yield f"sigmoid_focal {det} {dname} mean", sf(det, dt), "ld+st"
        yield f"sigmoid_focal {det} {dname} none", sf(det, dt, red=0), "ld+st"
        yield f"sigmoid_focal {det} {dname} gamma0 no-alpha", sf(det, dt, alpha=-1.0, gamma=0.0), \
            "ld+st"
        yield f"sigmoid_focal {det} {dname} class weight (80,)", sf(det, dt, weight=(80,)), "ld+st"
        yield f"sigmoid_focal {det} {dname} full weight no-grad", \
            sf(det, dt, weight=det, grad=False), "ld"
        yield f"bce {seg} {dname} mean", bc(seg, dt), "ld+st"
        yield f"bce {seg} {dname} none weight+pos_weight", \
            bc(seg, dt, weight=seg, pos_weight=(1, 1, 1), red=0), "ld+st"
        yield f"bce (8, 19, 512, 512) {dname} pos_weight (19, 1, 1)", \
            bc((8, 19, 512, 512), dt, pos_weight=(19, 1, 1)), "ld+st"
    yield "bce 2^34 elements bf16 sum", bc((2**20, 2**14), torch.bfloat16, red=2), "ld+st"
    if not quick:
        yield "sigmoid_focal (4, 1000, 80) fp64", sf((4, 1000, 80), torch.float64), "ld+st"
        yield "bce (16, 1000) fp16 pos_weight", bc((16, 1000), torch.float16,
                                                   pos_weight=(1000,)), "ld+st"


def softmax_focal_scenarios(quick):
    """The softmax focal loss launches (kernels/softmax_focal.py): segmentation and volumes
    (class stride D), channels-last (class stride 1), classification heads and an LM vocabulary;
    per-row ('none') and block-sum outputs, the gamma paths (0: cross-entropy, 2: multiplies,
    0.5: pow), class weights, no gradient; float64; the 2^34-logit grid."""
    import torch

    from fusedloss.kernels import softmax_focal

    def sf(N, C, D, dtype, gamma=2.0, weight=False, reduce=True, grad=True, layout="ncd"):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if layout == "channels_last":
            x = torch.empty(N, D, C, dtype=dtype, device="meta").transpose(1, 2)
        else:
            x = torch.empty(N, C, D, dtype=dtype, device="meta")
        t = torch.empty(N, D, dtype=torch.int64, device="meta")
        w = torch.empty(C, dtype=acc, device="meta") if weight else None
        s = torch.empty((), dtype=acc, device="meta")
        return lambda: softmax_focal.softmax_focal_fwd(x, t, w, s, gamma, -100, reduce, grad)

    variants = {"mean": {}, "none weight": dict(reduce=False, weight=True),
                "gamma0": dict(gamma=0.0), "gamma0.5 weight": dict(gamma=0.5, weight=True),
                "no-grad": dict(grad=False)}
    if quick:
        variants = {k: variants[k] for k in ("mean", "gamma0.5 weight")}
    dtypes = {"bf16": torch.bfloat16} if quick else {"fp32": torch.float32,
                                                      "bf16": torch.bfloat16}
    for dname, dt in dtypes.items():
        for vname, kw in variants.items():
            yield (f"SFocal seg N=8 C=19 D=512^2 {dname} {vname}", sf(8, 19, 512 * 512, dt, **kw),
                   "")
            yield f"SFocal vol N=2 C=4 D=96^3 {dname} {vname}", sf(2, 4, 96**3, dt, **kw), ""
        yield (f"SFocal seg channels-last N=8 C=19 D=512^2 {dname}",
               sf(8, 19, 512 * 512, dt, layout="channels_last"), "ld")
        yield f"SFocal cls N=4096 C=1000 {dname} weight", sf(4096, 1000, 1, dt, weight=True), \
            "ld+st"
        yield f"SFocal LM N=8192 V=128256 {dname}", sf(8192, 128256, 1, dt), "ld+st"
    if quick:
        return
    yield "SFocal cls N=4096 C=1000 fp64", sf(4096, 1000, 1, torch.float64), "ld+st"
    yield "SFocal seg N=1 C=19 D=2^34/19 bf16", sf(1, 19, 2**34 // 19, torch.bfloat16), ""
    yield "SFocal N*V=2^34 V=50257 bf16", sf(2**34 // 50257, 50257, 1, torch.bfloat16), "ld+st"


def dice_scenarios(quick):
    """The Dice launches (kernels/dice.py), forward and backward: Cityscapes (8, 19, 512, 512) and
    BTCV (2, 14, 128, 128, 128) in NCHW (positions contiguous: 128-bit loads and gradient stores)
    and channels-last (class stride 1, rows of C = 19 / 14 elements: not alignable), every
    feature flag in softmax and sigmoid mode, 95 classes (one tile), 200 (the lse pre-pass and
    class chunks), float64, and the 2^31-position grid."""
    import torch

    from fusedloss.kernels import dice

    def empty(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def ncd(N, C, D, dtype, layout):
        if layout == "channels_last":
            return empty(N, D, C, dtype=dtype).transpose(1, 2)
        return empty(N, C, D, dtype=dtype)

    def fwd(N, C, D, dtype, flags, sigmoid=False, layout="ncd"):
        x = ncd(N, C, D, dtype, layout)
        t = ncd(N, C, D, dtype, layout) if sigmoid else empty(N, D, dtype=torch.int64)
        return lambda: dice.dice_fwd(x, t, -100, sigmoid, *flags)

    def bwd(N, C, D, dtype, flags, sigmoid=False, layout="ncd"):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x = ncd(N, C, D, dtype, layout)
        t = ncd(N, C, D, dtype, layout) if sigmoid else empty(N, D, dtype=torch.int64)
        gs = empty(N, C, 5, dtype=acc)
        lse = empty(0, dtype=acc) if sigmoid else empty(N, D, dtype=acc)
        return lambda: dice.dice_bwd(gs, x, t, lse, -100, sigmoid, *flags)

    softmax_flags = {"plain": (False, False, False), "sq": (True, False, False),
                     "ce": (False, True, False), "ce+smoothing": (False, True, True),
                     "sq+ce+smoothing": (True, True, True)}
    sigmoid_flags = {"sigmoid": (False, False, False), "sigmoid sq": (True, False, False)}
    if quick:
        softmax_flags = {k: softmax_flags[k] for k in ("plain", "sq+ce+smoothing")}
        sigmoid_flags = {"sigmoid": sigmoid_flags["sigmoid"]}
    shapes = {"seg (8,19,512^2)": (8, 19, 512 * 512), "vol (2,14,128^3)": (2, 14, 128**3)}
    if quick:
        del shapes["vol (2,14,128^3)"]
    dtypes = {"bf16": torch.bfloat16} if quick else {"fp32": torch.float32,
                                                      "bf16": torch.bfloat16}
    for dname, dt in dtypes.items():
        for sname, (N, C, D) in shapes.items():
            for fname, flags in softmax_flags.items():
                yield f"Dice fwd {sname} {dname} {fname}", fwd(N, C, D, dt, flags), "ld"
                yield f"Dice bwd {sname} {dname} {fname}", bwd(N, C, D, dt, flags), "ld+st"
            for fname, flags in sigmoid_flags.items():
                yield (f"Dice fwd {sname} {dname} {fname}",
                       fwd(N, C, D, dt, flags, sigmoid=True), "ld")
                yield (f"Dice bwd {sname} {dname} {fname}",
                       bwd(N, C, D, dt, flags, sigmoid=True), "ld+st")
            cl = softmax_flags["sq+ce+smoothing"]
            yield (f"Dice fwd {sname} channels-last {dname}",
                   fwd(N, C, D, dt, cl, layout="channels_last"), "")
            yield (f"Dice bwd {sname} channels-last {dname}",
                   bwd(N, C, D, dt, cl, layout="channels_last"), "")
    if quick:
        return
    for C in (95, 200):
        for fname in ("plain", "sq+ce+smoothing"):
            flags = softmax_flags[fname]
            yield f"Dice fwd C={C} (2,{C},64^3) bf16 {fname}", fwd(2, C, 64**3, torch.bfloat16,
                                                                     flags), "ld"
            yield f"Dice bwd C={C} (2,{C},64^3) bf16 {fname}", bwd(2, C, 64**3, torch.bfloat16,
                                                                     flags), "ld+st"
    yield "Dice fwd (2,4,96^3) fp64 ce", fwd(2, 4, 96**3, torch.float64, (False, True, True)), \
        "ld"
    yield "Dice bwd (2,4,96^3) fp64 ce", bwd(2, 4, 96**3, torch.float64, (False, True, True)), \
        "ld+st"
    yield "Dice fwd N*D=2^31 (1,19,2^31) bf16", fwd(1, 19, 2**31, torch.bfloat16,
                                                    (False, True, True)), "ld"
    yield "Dice bwd N*D=2^31 (1,19,2^31) bf16", bwd(1, 19, 2**31, torch.bfloat16,
                                                    (False, True, True)), "ld+st"
    yield "Dice bwd N*D=2^31 (8,16,2^28) bf16 sigmoid", bwd(8, 16, 2**28, torch.bfloat16,
                                                            (False, False, False), True), "ld+st"


# ------------------------------------------------------------------------------------------------
# Recording launches instead of compiling them
# ------------------------------------------------------------------------------------------------

Launch = collections.namedtuple("Launch", "fn signature constexprs attrs options grid")


class _TargetOnly:
    """The part of a triton driver the JIT asks before it compiles: device, stream, target."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.target.arch  # one JIT cache per arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


@contextlib.contextmanager
def recording(arch, launches):
    """Within: every kernel launch appends a Launch (for `arch`) to `launches` and runs nothing."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    grid_of_call = []
    real_run, real_compile = JITFunction.run, JITFunction._do_compile

    def run(self, *args, grid, warmup, **kwargs):
        grid_of_call.append(tuple(grid))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        launches.append(Launch(self, dict(signature), dict(constexprs), dict(attrs), options,
                               grid_of_call[-1]))
        return None  # run() then returns before launching

    driver.set_active(_TargetOnly(arch))
    JITFunction.run, JITFunction._do_compile = run, do_compile
    try:
        yield
    finally:
        JITFunction.run, JITFunction._do_compile = real_run, real_compile


def config_key(launch):
    """What makes triton compile a new kernel: function, types, constexprs, attributes, options."""
    return (launch.fn.fn.__qualname__, tuple(sorted(launch.signature.items())),
            tuple(sorted((k, str(v)) for k, v in launch.constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in launch.attrs.items())), launch.options.hash())


def describe(launch):
    """Short form of a configuration: pointer dtypes, num_warps, non-default constexprs."""
    names = launch.fn.arg_names
    parts = [f"w{launch.options.num_warps}"]
    for path, value in launch.constexprs.items():
        name = names[path[0]]
        if isinstance(value, bool):
            if value and name not in ("EMULATE_RTNE", "REPORT_ERRORS"):
                parts.append(name.replace("HAS_", "").replace("COMPUTE_", ""))
        elif name.isupper():
            parts.append(f"{name}={str(value).replace('triton.language.', '')}")
    x = next((t for n, t in launch.signature.items() if n in ("x_ptr", "grad_ptr")), "")
    parts.insert(0, x.lstrip("*"))
    if launch.signature.get("C") == "i64":
        parts.append("C:i64")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------
# Compiling one configuration (in a worker process)
# ------------------------------------------------------------------------------------------------

_JOBS = []  # (Launch, arch): filled before the workers fork
_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16,
         "b32": 32, "u32": 32, "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64}


def access_widths(ptx):
    """{'ld': Counter(bits -> count), 'st': ...} of the global loads and stores in the PTX."""
    out = {"ld": collections.Counter(), "st": collections.Counter()}
    for op, mods in re.findall(r"\b(ld|st)\.global((?:\.\w+)+)", ptx):
        mods = mods.split(".")
        lanes = next((int(m[1:]) for m in mods if m in ("v2", "v4", "v8")), 1)
        bits = next((_BITS[m] for m in mods if m in _BITS), 0)
        out[op][lanes * bits] += 1
    return out


def compile_job(index):
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    launch, arch, keep = _JOBS[index]
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output: registers and spills
    log = io.StringIO()
    start = time.time()
    try:
        src = triton.compiler.ASTSource(launch.fn, launch.signature, launch.constexprs,
                                        launch.attrs)
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options=launch.options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported, and fails the check
        error = f"{type(e).__name__}: {e}".strip()
        if e.__cause__ is not None:  # triton's CompilationError: the cause is the real message
            error += f"\n  caused by {type(e.__cause__).__name__}: {e.__cause__}"
        return dict(ok=False, error=error[-3000:], seconds=time.time() - start)
    text = log.getvalue()

    def number(pattern):
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    ptx = kernel.asm["ptx"]
    widths = access_widths(ptx)
    if keep:
        name = f"{launch.fn.fn.__name__}_{index}_sm{arch}"
        with open(os.path.join(keep, name + ".ptx"), "w") as f:
            f.write(ptx)
    return dict(ok=True, seconds=time.time() - start, regs=number(r"Used (\d+) registers"),
                spill_st=number(r"(\d+) bytes spill stores"),
                spill_ld=number(r"(\d+) bytes spill loads"),
                ld={str(b): n for b, n in widths["ld"].items()},
                st={str(b): n for b, n in widths["st"].items()},
                asserts=bool(re.search(r"__assertfail|assertFunc", ptx)))


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def writes_tile(launch):
    """Whether the kernel stores a tile (a gradient), so that 128-bit stores are expected too."""
    names = launch.fn.arg_names
    if launch.fn.fn.__name__ in ("_scale_grad_kernel", "_dice_bwd_kernel"):
        return True
    return "COMPUTE_GRAD" in names and bool(launch.constexprs.get((names.index("COMPUTE_GRAD"),)))


def checks_targets(launch):
    """Whether the kernel validates class indices, so its PTX must keep the device assertion."""
    names = launch.fn.arg_names
    if launch.fn.fn.__name__ in ("_dice_fwd_kernel", "_dice_bwd_kernel"):
        return not launch.constexprs.get((names.index("SIGMOID"),))
    return launch.fn.fn.__name__ == "_cross_entropy_fwd_kernel" and not launch.constexprs.get(
        (names.index("PROB_TARGET"),))


def _widest(counts):
    return max((int(b) for b in counts), default=0)


def _narrow(counts):
    return sum(n for b, n in counts.items() if int(b) < 128)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast subset of the scenarios")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)),
                        help="compute capabilities, comma-separated (default: 80,90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile processes (default: one per core)")
    parser.add_argument("--json", help="write every result to this file")
    parser.add_argument("--keep-ptx", help="write each compiled kernel's PTX into this folder")
    parser.add_argument("--only", action="append", default=[],
                        help="only scenarios whose label contains this text (repeatable)")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a]
    t0 = time.time()

    cache = tempfile.mkdtemp(prefix="fusedloss_triton_aot_")  # fresh: ptxas runs, logs are seen
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        import triton

        import fusedloss.kernels  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"check_triton: cannot import triton / fusedloss.kernels: {e}", file=sys.stderr)
        return 2
    if args.keep_ptx:
        os.makedirs(args.keep_ptx, exist_ok=True)

    problems = []
    configs = collections.OrderedDict()  # (arch, key) -> Launch
    uses = collections.defaultdict(list)  # (arch, key) -> [(label, grid, alignable)]
    for arch in archs:
        launches = []
        with recording(arch, launches):
            for label, call, wide in scenarios(args.quick):
                if args.only and not any(s in label for s in args.only):
                    continue
                before = len(launches)
                try:
                    call()
                except Exception as e:  # noqa: BLE001 - a launcher failing on a real shape
                    if arch == archs[0]:
                        problems.append(f"launcher raised for '{label}': {type(e).__name__}: {e}")
                    continue
                if len(launches) == before and arch == archs[0]:
                    problems.append(f"'{label}' launched nothing")
                for launch in launches[before:]:
                    key = (arch, config_key(launch))
                    configs.setdefault(key, launch)
                    uses[key].append((label, launch.grid, wide))
    ids = {}
    for _, key in configs:
        ids.setdefault(key, f"K{len(ids) + 1}")

    _JOBS[:] = [(launch, arch, args.keep_ptx) for (arch, _), launch in configs.items()]
    print(f"triton {triton.__version__}: {len(ids)} configurations x {len(archs)} archs = "
          f"{len(_JOBS)} compiles on {args.jobs} processes", flush=True)
    if args.jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(compile_job, range(len(_JOBS))))
    else:
        results = [compile_job(i) for i in range(len(_JOBS))]
    shutil.rmtree(cache, ignore_errors=True)

    rows = []
    header = (f"{'id':>4} {'kernel':<26} {'sm':>2} {'regs':>4} {'spill st/ld':>11} "
              f"{'ld bits':>7} {'st bits':>7} {'narrow ld/st':>12}  configuration")
    print("\n" + header + "\n" + "-" * len(header))
    for ((arch, key), launch), res in zip(configs.items(), results):
        cid, name = ids[key], launch.fn.fn.__name__
        row = dict(id=cid, kernel=name, arch=arch, config=describe(launch),
                   scenarios=[u[0] for u in uses[(arch, key)]], **res)
        rows.append(row)
        if not res["ok"]:
            print(f"{cid:>4} {name:<26} {arch:>2} COMPILE ERROR {res['error'][:300]}")
            problems.append(f"{cid} {name} sm_{arch} does not compile: {res['error'][:1000]}")
            continue
        ld, st = _widest(res["ld"]), _widest(res["st"])
        print(f"{cid:>4} {name:<26} {arch:>2} {res['regs']:>4} "
              f"{res['spill_st']:>5}/{res['spill_ld']:<5} {ld:>7} {st:>7} "
              f"{_narrow(res['ld']):>6}/{_narrow(res['st']):<5}  {row['config']}")
        if res["spill_st"] or res["spill_ld"]:
            problems.append(f"{cid} {name} sm_{arch} spills {res['spill_st']} B stores / "
                            f"{res['spill_ld']} B loads ({row['config']})")
        wide_ld = [u[0] for u in uses[(arch, key)] if "ld" in u[2]]
        wide_st = [u[0] for u in uses[(arch, key)] if "st" in u[2]] if writes_tile(launch) else []
        if (wide_ld and ld < 128) or (wide_st and st < 128):
            problems.append(f"{cid} {name} sm_{arch}: widest global load {ld} / store {st} bits, "
                            f"128 expected for 16-byte alignable rows "
                            f"('{(wide_st or wide_ld)[0]}')")
        if checks_targets(launch) and not res["asserts"]:
            problems.append(f"{cid} {name} sm_{arch}: the target check (tl.device_assert) was "
                            "compiled out")

    print(f"\n{'scenario':<58} {'id':>4} {'grid':<16} limits")
    seen = set()
    for (_, key), used in uses.items():
        for label, grid, _ in used:
            if (label, grid) in seen:
                continue
            seen.add((label, grid))
            ok = all(0 < g <= lim for g, lim in zip(grid, GRID_LIMITS))
            print(f"{label:<58} {ids[key]:>4} {str(grid):<16} {'ok' if ok else 'EXCEEDED'}")
            if not ok:
                problems.append(f"'{label}': grid {grid} beyond CUDA's limits {GRID_LIMITS}")

    seconds = time.time() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=rows, problems=problems, seconds=seconds), f, indent=1)
    print(f"\n{len(rows)} compiles in {seconds:.0f} s; "
          f"{'OK' if not problems else str(len(problems)) + ' problem(s):'}")
    for p in problems:
        print(f"  FAIL {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
