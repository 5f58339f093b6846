"""fusedloss.distributed.vocab_parallel_cross_entropy on 2 and 4 gloo ranks over loopback.

One spawn per world size runs every case on every rank (the backends that can run on CPU here:
the reference, the CPU kernels when built, Triton under its interpreter) and saves each rank's
loss and gradient slice; the parent process rebuilds the full logits from the same seed and
compares with fusedloss.cross_entropy and torch's F.cross_entropy on them, so failures are
reported by pytest, one test per case. A hang fails after a timeout instead of blocking CI.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import pathlib
import socket
import sys
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fusedloss
from fusedloss.distributed import vocab_parallel_cross_entropy

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPAWN_TIMEOUT_S = 150
TOL = {torch.float64: 1e-11, torch.float32: 1e-5, torch.bfloat16: 2e-2}

# Vocabulary slices per rank: equal, odd totals (not divisible by the world size), skewed, a
# rank with an empty slice.
SPLITS = {
    2: {"even": [64, 64], "odd": [50, 51], "skew": [1, 100]},
    4: {"v103": [25, 26, 26, 26], "uneven": [40, 3, 0, 60], "even": [16, 16, 16, 16]},
}

# Per-case options; every case runs on every split of its world size.
OPTIONS = [
    dict(name="mean"),
    dict(name="sum", reduction="sum"),
    dict(name="none", reduction="none"),
    dict(name="mean_ignore", ignore_frac=0.3),
    dict(name="none_ignore_ls_z", reduction="none", ignore_frac=0.3, label_smoothing=0.1,
         z_loss=1e-3),
    dict(name="mean_ls", label_smoothing=0.2, ignore_frac=0.25),
    dict(name="sum_z", reduction="sum", z_loss=1e-2, upstream=0.5),
    dict(name="mean_ls_z_fp64", dtype=torch.float64, label_smoothing=0.3, z_loss=1e-2,
         ignore_frac=0.2),
    dict(name="none_fp64", dtype=torch.float64, reduction="none"),
    dict(name="all_ignored_mean", ignore_frac=1.0),
    dict(name="all_ignored_sum_ls", reduction="sum", ignore_frac=1.0, label_smoothing=0.1),
    dict(name="ignore_index_is_a_class", ignore_index=7, ignore_frac=0.3, label_smoothing=0.1),
    dict(name="empty_batch_mean", n=0),
    dict(name="extreme_logits", scale=30.0, confident=True, z_loss=1e-4),
    dict(name="vocab_padding_neg_inf", pad_last=5),
    dict(name="non_contiguous", layout="transposed", reduction="sum", label_smoothing=0.1),
    dict(name="bf16_mean", dtype=torch.bfloat16, label_smoothing=0.1),
]
# The fused-kernel runs of the Triton interpreter are slow: a subset covers its op call.
TRITON_OPTIONS = {"mean", "none_ignore_ls_z", "mean_ls_z_fp64", "all_ignored_mean",
                  "vocab_padding_neg_inf", "non_contiguous"}
BACKENDS = ["reference", "cpu", "triton"]


def _cases(world):
    return [(split, opt) for split in SPLITS[world] for opt in OPTIONS]


def _case_id(split, opt):
    return f"{split}-{opt['name']}"


def _make(split_sizes, opt, seed):
    """Full logits, targets and the upstream gradient of a case (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    n = opt.get("n", 16)
    v = sum(split_sizes)
    dtype = opt.get("dtype", torch.float32)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * opt.get("scale", 3.0)
    t = torch.randint(0, v, (n,), generator=g)
    if opt.get("confident"):
        x[: n // 2].clamp_(max=0.0)
        x[torch.arange(n // 2), t[: n // 2]] = 60.0  # p_y ~ 1: the gradient is p_y - 1 ~ tiny
    if opt.get("pad_last"):
        x[:, -opt["pad_last"]:] = float("-inf")  # padded vocabulary, never a target
        t = t % (v - opt["pad_last"])
    ignore_index = opt.get("ignore_index", -100)
    frac = opt.get("ignore_frac", 0.0)
    if frac:
        mask = torch.rand(n, generator=g) < frac if frac < 1 else torch.ones(n, dtype=torch.bool)
        t[mask] = ignore_index
    up = torch.randn(n, generator=g, dtype=torch.float64) if opt.get("reduction") == "none" \
        else torch.tensor(opt.get("upstream", 1.0), dtype=torch.float64)
    return x.to(dtype), t, up.to(dtype)


def _kwargs(opt):
    return dict(ignore_index=opt.get("ignore_index", -100),
                reduction=opt.get("reduction", "mean"),
                label_smoothing=opt.get("label_smoothing", 0.0),
                z_loss=opt.get("z_loss", 0.0))


def _layout(x, opt):
    if opt.get("layout") == "transposed":
        return x.t().contiguous().t()  # same values, column-major strides
    return x.contiguous()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# The rank processes
# --------------------------------------------------------------------------------------------


def _expose_triton_kernels():
    """Make fusedloss.kernels importable from an uninstalled checkout (setup.py maps it to
    kernels/); a no-op when it is installed."""
    try:
        importlib.import_module("fusedloss.kernels")
        return
    except ImportError:
        pass
    init = ROOT / "kernels" / "__init__.py"
    if not init.exists():
        return
    spec = importlib.util.spec_from_file_location(
        "fusedloss.kernels", init, submodule_search_locations=[str(ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fusedloss.kernels"] = mod
    spec.loader.exec_module(mod)


def _runnable_backends():
    from fusedloss import _backend
    out = []
    for name in BACKENDS:
        try:
            _backend.resolve(name, torch.device("cpu"))
            if name == "triton":
                _expose_triton_kernels()
                importlib.import_module("fusedloss.kernels.cross_entropy")
        except Exception:
            continue
        out.append(name)
    return out


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {"backends": _runnable_backends()}
    try:
        for backend in results["backends"]:
            os.environ["FUSEDLOSS_BACKEND"] = backend
            for i, (split, opt) in enumerate(_cases(world)):
                if backend == "triton" and opt["name"] not in TRITON_OPTIONS:
                    continue
                sizes = SPLITS[world][split]
                x, t, up = _make(sizes, opt, seed=1000 * world + i)
                start = sum(sizes[:rank])
                xl = _layout(x, opt)[:, start:start + sizes[rank]].requires_grad_(True)
                loss = vocab_parallel_cross_entropy(xl, t, **_kwargs(opt))
                loss.backward(up.expand_as(loss) if loss.dim() else up)
                results[(backend, _case_id(split, opt))] = (loss.detach(), xl.grad,
                                                            xl.is_contiguous())
            # Out-of-range targets raise on every rank (after the first all-reduce, together).
            x = torch.randn(4, 10)
            t = torch.tensor([0, 1, 10 * world, 2])
            try:
                vocab_parallel_cross_entropy(x, t)
                results[(backend, "bad_target")] = None
            except Exception as e:  # noqa: BLE001
                results[(backend, "bad_target")] = (type(e).__name__, str(e))
        # The function still works after that error (no collective left dangling).
        x = torch.zeros(3, 5)
        results["after_error"] = vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 2]))
        # Subgroup: the even ranks form their own vocabulary-parallel group.
        evens = list(range(0, world, 2))
        sub = dist.new_group(evens)
        if rank in evens:
            x = torch.randn(6, 7 * len(evens), generator=torch.Generator().manual_seed(5))
            t = torch.randint(0, x.shape[1], (6,), generator=torch.Generator().manual_seed(6))
            j = evens.index(rank)
            xl = x[:, 7 * j:7 * (j + 1)].clone().requires_grad_(True)
            loss = vocab_parallel_cross_entropy(xl, t, group=sub)
            loss.backward()
            results["subgroup"] = (loss.detach(), xl.grad, x, t)
        else:
            try:
                vocab_parallel_cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.int64),
                                             group=sub)
                results["not_a_member"] = None
            except ValueError as e:
                results["not_a_member"] = str(e)
    except Exception:  # noqa: BLE001
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _spawn(world, out_dir):
    port = _free_port()
    # forkserver: the server imports torch and fusedloss once, every rank is forked from it
    # (a fresh single-threaded process, unlike fork from pytest; far cheaper than spawn's imports)
    mp.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "triton",
                               "triton.language", "fusedloss", __name__])
    ctx = mp.start_processes(_worker, args=(world, port, str(out_dir)), nprocs=world, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"vocab-parallel ranks (world {world}) did not finish in "
                            f"{SPAWN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:  # only our own children, by process object
            if p.is_alive():
                p.kill()
                p.join(5)
    out = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
           for r in range(world)]
    for r, res in enumerate(out):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return out


_RESULTS: dict[int, list] = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    def get(world):
        if world not in _RESULTS:
            try:
                _RESULTS[world] = _spawn(world, tmp_path_factory.mktemp(f"vpce{world}"))
            except BaseException as e:  # noqa: BLE001  (reported once, not re-run per case)
                _RESULTS[world] = e
                raise
        if isinstance(_RESULTS[world], BaseException):
            pytest.fail(f"the world-{world} ranks failed (see the first failure): "
                        f"{str(_RESULTS[world])[:2000]}")
        return _RESULTS[world]
    return get


# --------------------------------------------------------------------------------------------
# Checks in the parent
# --------------------------------------------------------------------------------------------


def _close(a, b, dtype, what):
    tol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _expected(fn, x, t, up, kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, t, **kw)
    loss.backward(up.expand_as(loss) if loss.dim() else up)
    return loss.detach(), x.grad


def _params():
    return [pytest.param(world, split, opt, id=f"w{world}-{_case_id(split, opt)}")
            for world in SPLITS for split, opt in _cases(world)]


@pytest.mark.parametrize("world,split,opt", _params())
def test_matches_full_cross_entropy(results, world, split, opt):
    res = results(world)
    backends = res[0]["backends"]
    assert "reference" in backends
    i = _cases(world).index((split, opt))
    sizes = SPLITS[world][split]
    x, t, up = _make(sizes, opt, seed=1000 * world + i)
    kw = _kwargs(opt)
    dtype = x.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, g_want = _expected(fusedloss.cross_entropy, x, t, up, kw)
    if kw["z_loss"] == 0 and dtype != torch.bfloat16:
        tkw = {k: v for k, v in kw.items() if k != "z_loss"}
        tw, tg = _expected(F.cross_entropy, x, t, up, tkw)
        _close(want, tw, dtype, "fusedloss.cross_entropy vs torch")
        _close(g_want, tg, dtype, "fusedloss.cross_entropy grad vs torch")
    if opt.get("ignore_frac") == 1.0 and kw["reduction"] == "mean" or opt.get("n") == 0:
        assert torch.isnan(want)
    ran = 0
    for backend in backends:
        key = (backend, _case_id(split, opt))
        if key not in res[0]:
            continue
        ran += 1
        grads = []
        for r in range(world):
            loss, grad, contiguous = res[r][key]
            assert loss.dtype == dtype and loss.shape == want.shape, (backend, r)
            _close(loss, want, dtype, f"{backend} rank {r} loss")
            assert grad.shape == (x.shape[0], sizes[r]), (backend, r, grad.shape)
            grads.append(grad)
        if opt.get("layout") == "transposed":
            assert not contiguous
        _close(torch.cat(grads, dim=1), g_want, dtype, f"{backend} gradient")
    assert ran >= 1


@pytest.mark.parametrize("world", sorted(SPLITS))
def test_collective_extras(results, world):
    res = results(world)
    for backend in res[0]["backends"]:
        for r in range(world):
            err = res[r][(backend, "bad_target")]
            assert err is not None and err[0] == "IndexError", (backend, r, err)
            assert str(10 * world) in err[1]
    for r in range(world):
        assert torch.isclose(res[r]["after_error"], torch.tensor(5.0 * world).log())
    evens = list(range(0, world, 2))
    grads = []
    for r in evens:
        loss, grad, x, t = res[r]["subgroup"]
        want, g_want = _expected(F.cross_entropy, x, t, torch.tensor(1.0), {})
        _close(loss, want, torch.float32, f"subgroup rank {r}")
        grads.append(grad)
    _close(torch.cat(grads, 1), g_want, torch.float32, "subgroup gradient")
    for r in range(1, world, 2):
        assert res[r]["not_a_member"] is not None and "group" in res[r]["not_a_member"]


def test_triton_or_fused_path_covered(results):
    """Report which local-lse paths the spawned ranks exercised (the reference always)."""
    backends = results(2)[0]["backends"]
    assert backends[0] == "reference"
    if fusedloss.backends()["cpu"]["available"]:
        assert "cpu" in backends


# --------------------------------------------------------------------------------------------
# Argument checks (they run before any collective, so no process group is needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(input=torch.randn(4)), ValueError, "input"),
    (dict(input=torch.randn(4, 3, 2)), ValueError, "input"),
    (dict(input=torch.ones(4, 5, dtype=torch.int64)), TypeError, "input"),
    (dict(input=[[1.0]]), TypeError, "input"),
    (dict(target=torch.zeros(4, dtype=torch.int32)), TypeError, "target"),
    (dict(target=torch.zeros(3, dtype=torch.int64)), ValueError, "target"),
    (dict(target=torch.zeros(4, 1, dtype=torch.int64)), ValueError, "target"),
    (dict(target=torch.zeros(4)), TypeError, "target"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(group="world"), TypeError, "group"),
])
def test_bad_arguments(kwargs, exc, word):
    args = dict(input=torch.randn(4, 5), target=torch.zeros(4, dtype=torch.int64))
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        vocab_parallel_cross_entropy(args.pop("input"), args.pop("target"), **args)


def test_needs_initialised_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.int64))
