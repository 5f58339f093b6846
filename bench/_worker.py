"""Benchmark worker: ``python -m bench._worker SPEC.json`` (or ``--zygote``, the fork server).

Each job runs in a process of its own so that its peak RSS belongs to the providers it measures.
The parent normally sends jobs to a fork server (``--zygote``: torch and fusedloss imported once,
one server per allocator setting) and falls back to a fresh interpreter per job. Job modes:

``probe``: environment, which providers can be imported here, and the machine's copy / exp / GEMM
rates; writes one JSON object to ``spec["result_path"]``.

``run`` with ``interleave``: all providers of one case timed in turn in this one process, round
after round (see :func:`run_interleaved`): the timing mode of the README's numbers.

``run``: builds the inputs of one case once, then for each provider in ``spec["providers"]``
(one in a full run, several with --quick) appends a ``{"event": "start"}`` line and then its result
line to ``spec["result_path"]`` (JSON lines), so that the parent can tell which provider took the
process down if it dies.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import traceback
import warnings


def _append(path: str, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                           timeout=5).stdout.strip()
        d = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True,
                           text=True, timeout=5).stdout.strip()
        return (c + ("+dirty" if d else "")) or None
    except Exception:
        return None


def probe(spec: dict) -> dict:
    import torch

    from . import _harness as H

    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "git": _git_commit(),
        "device": device,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f
                                     if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            env["thp_sysfs"] = f.read().strip()
    except OSError:
        env["thp_sysfs"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    fl = {}
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        try:
            import fusedloss

            fl["import"] = "ok"
            fl["version"] = getattr(fusedloss, "__version__", None)
            fl["path"] = getattr(fusedloss, "__file__", None)
            if hasattr(fusedloss, "backends"):
                try:
                    fl["backends"] = fusedloss.backends()
                except Exception as e:
                    fl["backends"] = f"error: {H.short_error(e)}"
        except Exception as e:
            fl["import"] = H.short_error(e)
    fl["warnings"] = sorted({str(w.message)[:300] for w in wl})
    env["fusedloss"] = fl

    avail = {}
    for mod in H.loss_modules():
        a = {}
        for name, prov in mod.PROVIDERS.items():
            reason = None
            if prov.devices and device not in prov.devices:
                reason = f"needs {' or '.join(prov.devices)}"
            else:
                for dotted in prov.requires:
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            H.resolve(dotted)
                    except Exception as e:
                        reason = f"{dotted}: {H.short_error(e, 200)}"
                        break
            a[name] = reason
        avail[mod.LOSS] = a
    machine = None
    if not spec.get("no_machine"):
        machine = H.machine_context(device)
    return {"env": env, "available": avail, "machine": machine}


def _job(spec: dict):
    """What every run job starts with: threads, the case, its loss module, options and inputs."""
    import torch

    from . import _harness as H

    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    case = H.Case.from_json(spec["case"])
    mod = H.module_for_loss(case.loss)
    inputs = mod.make_inputs(case, device, seed=int(spec.get("seed", 0)))
    if device == "cuda":
        torch.cuda.synchronize()
    return H, device, spec["result_path"], case, mod, dict(spec.get("opts", {})), inputs


def run(spec: dict) -> None:
    import torch

    H, device, out_path, case, mod, opts, inputs = _job(spec)
    target_path = os.path.join(spec["cache_dir"], f"{case.name}.target.pt")
    target_meta_path = target_path + ".json"
    shared = len(spec["providers"]) > 1

    for p in spec["providers"]:
        _append(out_path, {"event": "start", "provider": p})
        res = {"provider": p, "status": "ok", "shared_process": shared}
        wl = []
        runner = None
        try:
            with warnings.catch_warnings(record=True) as wl:
                warnings.simplefilter("always")
                try:
                    runner = mod.make_runner(p, case, inputs, device, opts)
                except (H.ProviderUnavailable, ImportError, AttributeError) as e:
                    res.update(status="unavailable", reason=H.short_error(e))
                else:
                    prov = mod.PROVIDERS[p]
                    reps = int(spec["repeats"])
                    if prov.max_repeats:
                        reps = min(reps, prov.max_repeats)
                    res.update(H.measure(runner, device, int(spec["warmup"]), reps,
                                         float(spec["max_time"]), min(3, reps)))
            res["warnings"] = _warnings(wl)
            if res["status"] == "ok":
                res["check"] = _check(H, runner, case, p, target_path, target_meta_path)
        except Exception as e:
            res.update(status="error", reason=H.short_error(e),
                       traceback=traceback.format_exc()[-3000:])
            res.setdefault("warnings", _warnings(wl))
        finally:
            if runner is not None:
                try:
                    runner.teardown()
                except Exception:
                    pass
            runner = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        _append(out_path, res)


def run_interleaved(spec: dict) -> None:
    """All providers of one case in this one process, timed in turn: round after round, each
    provider's step once per round (the order rotating), the way a training loop calls its loss.
    The first round is warm-up (compiles, first touches); memory is not measured here (the fresh
    process per provider does that). Each provider's outputs come from one last untimed step
    after the rounds, checked as in ``run``."""
    import statistics
    import time

    H, device, out_path, case, mod, opts, inputs = _job(spec)
    sync = H.sync_fn(device)
    target_path = os.path.join(spec["cache_dir"], f"{case.name}.target.pt")
    target_meta_path = target_path + ".json"

    runners, res, inner, caps = {}, {}, {}, {}
    for p in spec["providers"]:
        _append(out_path, {"event": "start", "provider": p})
        res[p] = {"provider": p, "status": "ok", "timing": "interleaved", "times_ms": []}
        try:
            with warnings.catch_warnings(record=True) as wl:
                warnings.simplefilter("always")
                runners[p] = r = mod.make_runner(p, case, inputs, device, opts)
                w0 = time.perf_counter()
                for _ in range(max(1, int(spec["warmup"]))):
                    r.setup()
                    sync()
                    r.step()
                    sync()
                warm = time.perf_counter() - w0
            res[p]["warmup_s"] = warm
            res[p]["warnings"] = _warnings(wl)
            # Steps far below a millisecond are timed k at a time (each with its setup), so that
            # the timer's resolution and the loop's own cost do not dominate.
            step = warm / max(1, int(spec["warmup"]))
            inner[p] = max(1, min(1000, int(2e-3 / max(step, 1e-7))))
            prov = mod.PROVIDERS[p]
            caps[p] = min(int(spec["repeats"]), prov.max_repeats or int(spec["repeats"]))
        except (H.ProviderUnavailable, ImportError, AttributeError) as e:
            res[p].update(status="unavailable", reason=H.short_error(e))
        except Exception as e:
            res[p].update(status="error", reason=H.short_error(e),
                          traceback=traceback.format_exc()[-3000:])
        if res[p]["status"] != "ok":
            runners.pop(p, None)
            _append(out_path, res.pop(p))

    # Calibrate inner counts on a second, warm call (the first includes compiles).
    for p, r in runners.items():
        if inner[p] == 1 and res[p]["warmup_s"] > 0.05:
            continue  # a slow step, even counting first-call costs: timed one at a time
        t0 = time.perf_counter()
        r.setup()
        sync()
        r.step()
        sync()
        dt = time.perf_counter() - t0
        inner[p] = max(1, min(1000, int(2e-3 / max(dt, 1e-7))))

    order = list(runners)
    max_time = float(spec["max_time"]) * max(1, len(order))
    t_start = time.perf_counter()
    rnd = 0
    while True:
        live = [p for p in order if len(res[p]["times_ms"]) < caps[p]]
        if not live:
            break
        if rnd >= 3 and time.perf_counter() - t_start > max_time:
            break
        k = rnd % len(live)
        for p in live[k:] + live[:k]:
            r, n = runners[p], inner[p]
            total = 0.0
            for _ in range(n):
                r.setup()
                sync()
                t0 = time.perf_counter()
                r.step()
                sync()
                total += time.perf_counter() - t0
            res[p]["times_ms"].append(total / n * 1e3)
        rnd += 1

    for p, r in runners.items():
        out = res[p]
        try:
            times = out["times_ms"]
            out.update(median_ms=statistics.median(times), min_ms=min(times),
                       repeats=len(times), inner=inner[p], extra_bytes=None)
            r.setup()
            r.step()
            sync()
            out["check"] = _check(H, r, case, p, target_path, target_meta_path)
        except Exception as e:
            out.update(status="error", reason=H.short_error(e),
                       traceback=traceback.format_exc()[-3000:])
        finally:
            try:
                r.teardown()
            except Exception:
                pass
        _append(out_path, out)
    runners.clear()
    gc.collect()


def _warnings(wl) -> list:
    """Distinct warning messages, without deprecation chatter from library internals."""
    keep = [w for w in wl if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    return sorted({str(w.message).replace("\n", " ")[:300] for w in keep})


def _check(H, runner, case, provider, target_path, meta_path) -> dict:
    import torch

    out = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
           for k, v in runner.outputs().items()}
    if os.path.exists(target_path):
        with open(meta_path) as f:
            meta = json.load(f)
        ref = torch.load(target_path)
        c = H.check_outputs(out, ref, H.provider_tol(case, provider))
        c["target"] = meta["provider"]
        return c
    if provider in case.check_order:
        torch.save(out, target_path)
        with open(meta_path, "w") as f:
            json.dump({"provider": provider}, f)
        return {"target": provider, "target_self": True}
    return {"reason": "no check target (reference and torch eager did not run)"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--zygote":
        return zygote()
    import faulthandler

    faulthandler.enable()  # a crashing provider leaves a Python traceback in the worker's log
    with open(argv[0]) as f:
        spec = json.load(f)
    os.environ.update(spec.get("env") or {})  # before anything reads it (fusedloss: lazily)
    if spec.get("mmap_threshold"):
        fixed_mmap_threshold(spec["mmap_threshold"])
    if spec.get("mode") == "probe":
        from . import _harness as H

        H.dump_json(spec["result_path"], probe(spec))
        return 0
    if spec.get("interleave"):
        run_interleaved(spec)
    else:
        run(spec)
    return 0


def fixed_mmap_threshold(nbytes: int) -> None:
    """glibc's malloc with a FIXED mmap threshold (mallopt(M_MMAP_THRESHOLD)): every block of at
    least ``nbytes`` is its own mapping, returned to the OS on free. By default the threshold grows
    to the size of the largest block freed so far (up to 32 MiB), after which blocks of that size
    come from the heap and freed ones stay resident: a provider's peak RSS over repeated steps then
    depends on which of its buffers glibc happened to keep, not on what the computation needs
    (a (2, 4, 96, 96, 96) loss read as 2x its gradient instead of 1x). Same for every provider."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(nbytes))
    except (OSError, AttributeError):
        pass


def zygote() -> int:
    """Fork server: import torch (and fusedloss, the loss files) once, then for each spec path read
    from stdin fork a child that runs it with stdout/stderr in ``<spec>.log``. Protocol on stdout:
    ``ready``, then per job ``pid N`` and ``exit N CODE`` (CODE < 0: killed by signal -CODE).

    Forking saves the 2-4 s of imports per worker while each measurement still gets a process of its
    own; nothing here runs a parallel region, touches CUDA or starts a compile pool before forking
    (the same conditions under which DataLoader forks its workers after ``import torch``)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # stray prints from the imports below must not reach the protocol pipe
    import torch  # noqa: F401

    from . import _harness as H

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import fusedloss  # noqa: F401
        except Exception:
            pass  # the child imports it again and reports why it is unavailable
        H.loss_modules()
    proto.write("ready\n")
    for line in sys.stdin:
        spec_path = line.strip()
        if not spec_path:
            break
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                proto.close()
                fd = os.open(spec_path + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                rc = main([spec_path])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                rc = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(rc)
        proto.write(f"pid {pid}\n")
        _, status = os.waitpid(pid, 0)
        proto.write(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
