"""``python -m bench``: every loss x provider at realistic shapes; tables, JSON and a PNG.

Each (case, provider, allocator setting) runs in a process of its own, forked from a server
(``python -m bench._worker --zygote``, one per allocator setting) that has imported torch and
fusedloss, so that its peak memory is its own and start-up costs milliseconds (--no-fork: a fresh
interpreter per job). Exit status: 0 when every correctness check passed (providers
that are unavailable or raise are reported, not fatal), 1 when a check failed, 2 on bad arguments
or a harness crash.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from . import _harness as H
from . import _report as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Results go to bench/results in a checkout; installed (python -m fusedloss.bench, or the
# fusedloss-bench command) to ./bench-results in the current directory.
IN_CHECKOUT = os.path.exists(os.path.join(REPO, "pyproject.toml"))
DEFAULT_OUT = (os.path.join(REPO, "bench", "results") if IN_CHECKOUT
               else os.path.join(os.getcwd(), "bench-results"))
WORKER = [sys.executable, "-m", f"{__package__}._worker"]
WORKER_CWD = REPO if IN_CHECKOUT else None


def _version() -> str:
    try:
        import fusedloss

        return fusedloss.__version__
    except Exception:
        return "unknown"


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where the help text does not already say it."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default in (None, False, argparse.SUPPRESS):
            return h
        return super()._get_help_string(action)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog=f"python -m {__package__}",
        description="Benchmark fusedloss against torch eager, torch.compile, the reference and "
                    "peers: time (median of repeats) and peak extra memory, checked against the "
                    "reference.",
        formatter_class=_HelpFormatter,
        epilog="Without --full, --quick, --only or --loss, a CPU run takes each loss's headline "
               "cases (DEFAULT_CASES in bench/bench_<loss>.py; about 5 minutes) and says what it "
               "left out; --full runs every case under both allocator settings (over 30 minutes "
               "on 2 cores).",
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: cuda if available, else cpu")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (<1 min on CPU): one small fwd+bwd case per loss, 3 repeats, "
                         "default allocator, no memory job (the other runs measure memory)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="directory for the JSON and PNG")
    ap.add_argument("--full", action="store_true",
                    help="every case of every loss, both allocator settings on CPU (default: on "
                         "CPU, each loss's headline cases only, default allocator)")
    ap.add_argument("--loss", default=None,
                    help="comma-separated loss names to run (cross_entropy, linear_cross_entropy, "
                         "sigmoid_focal, softmax_focal, bce, tv, dice), every case of each")
    ap.add_argument("--sweep", choices=["V", "size"], default=None,
                    help="fwd+bwd over a series of sizes instead of the cases: vocabulary (V: "
                         "cross-entropy) or input size (size: the other losses); one plot per "
                         "loss of time and memory against the size (with --loss to pick)")
    ap.add_argument("--readme", default=None, metavar="README.md",
                    help="after the run, write its results (the markdown written beside the JSON) "
                         "into this file, between its bench-results begin/end markers")
    ap.add_argument("--compare", default=None, metavar="OLD.json",
                    help="after the run, print what got faster or slower than in OLD.json")
    ap.add_argument("--only", default=None,
                    help="comma-separated: a loss name (cross_entropy, linear_cross_entropy) or a "
                         "substring of case names (e.g. 128256, bf16, fwdbwd)")
    ap.add_argument("--providers", default=None,
                    help="comma-separated provider names to run (default: all)")
    ap.add_argument("--dtype", default=None,
                    help="run every case in this dtype instead of its own (fp32, bf16, fp16)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repeats per measurement (default: quick 3, cpu 11, cuda 20; "
                         "on CPU, first touches of fresh memory can cost 5-10x a normal step on "
                         "a VM: the median needs enough repeats to ignore them)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed warm-up calls, >= 1 (default: cpu 1, cuda 3)")
    ap.add_argument("--max-time", type=float, default=None,
                    help="stop repeating once this many seconds were spent timing one measurement "
                         "(after at least 3 repeats; default: quick 2, cpu 15, cuda 10)")
    ap.add_argument("--thp", choices=["default", "on", "both"], default=None,
                    help="CPU allocator setting(s): the default, THP_MEM_ALLOC_ENABLE=1, or both "
                         "(default: both; --quick: default)")
    ap.add_argument("--all", action="store_true",
                    help="include the heavy cases (on CPU: linear CE at V=128256, minutes per "
                         "provider); naming a heavy case exactly in --only also runs it")
    ap.add_argument("--timing", choices=["interleaved", "fresh"], default="interleaved",
                    help="interleaved: all providers of a case timed in turn in one long-lived "
                         "process, round after round, as a training loop calls its loss (the "
                         "README's numbers); fresh: each provider timed alone in a fresh process")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="with --timing interleaved, skip the short fresh-process run per "
                         "provider that measures peak memory")
    ap.add_argument("--busy", action="store_true",
                    help="keep one core busy with a background spinning process while measuring "
                         "(a kernel must not be fast only on an idle machine)")
    ap.add_argument("--shared-process", dest="shared", action="store_true", default=False,
                    help="run all providers of a case in one worker process (memory then only "
                         "approximate: glibc may serve a provider's buffers from heap memory that "
                         "an earlier provider freed, or keep freed buffers resident)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in workers")
    ap.add_argument("--backend", default="auto", help="backend= passed to fusedloss providers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process")
    ap.add_argument("--no-fork", dest="fork", action="store_false",
                    help="start every worker with a fresh interpreter instead of forking it from a "
                         "server that has torch imported (slower; same isolation)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--list", action="store_true", help="list the cases and providers and exit")
    args = ap.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if _cuda_available() else "cpu"
    elif args.device == "cuda" and not _cuda_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    cpu = args.device == "cpu"
    if args.repeats is None:
        args.repeats = 3 if args.quick else (11 if cpu else 20)
    if args.warmup is None:
        args.warmup = 1 if cpu else 3
    args.warmup = max(1, args.warmup)
    if args.max_time is None:
        args.max_time = 2.0 if args.quick else (15.0 if cpu else 10.0)
    if args.quick:
        args.memory = False
    args.headline = (cpu and not (args.full or args.quick or args.only or args.loss
                                  or args.list or args.sweep))
    if args.thp is None:
        args.thp = "both" if (args.full or args.only or args.loss) and not args.quick \
            else "default"
    if args.loss is not None:
        bad = [x for x in args.loss.split(",") if x.strip() not in _LOSSES()]
        if bad:
            ap.error(f"--loss: unknown loss(es) {', '.join(bad)}; known: {', '.join(_LOSSES())}")
    if args.dtype is not None:
        if args.dtype.lower() not in H.DTYPE_ALIASES:
            ap.error(f"--dtype: unknown dtype {args.dtype!r}")
        args.dtype = H.DTYPE_ALIASES[args.dtype.lower()]
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def select_cases(args):
    cases, skipped = [], []
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    provs = [s.strip() for s in args.providers.split(",")] if args.providers else None
    losses = [s.strip() for s in args.loss.split(",")] if args.loss else None
    left_out = []
    for mod in H.loss_modules():
        if losses and mod.LOSS not in losses:
            continue
        if args.sweep:
            mcases = getattr(mod, "sweep_cases", lambda *a: [])(args.device, args.sweep,
                                                                  args.dtype)
            if not mcases:
                continue
        else:
            mcases = mod.cases(args.device, args.quick, args.dtype)
        headline = getattr(mod, "DEFAULT_CASES", None)
        if headline is None:  # a loss module without its own list: its first fwd+bwd case
            headline = [next((c.name for c in mcases if c.mode == "fwdbwd"), mcases[0].name)]
        if args.quick and not (only or losses):  # a smoke run: each loss's first fwd+bwd case
            first = next((c for c in mcases if c.mode == "fwdbwd"), mcases[0])
            left_out += [c.name for c in mcases if c is not first]
            mcases = [first]
        for c in mcases:
            if args.headline and c.name not in headline:
                left_out.append(c.name)
                continue
            if only and not any(o == c.loss or (o not in _LOSSES() and o in c.name) for o in only):
                continue
            if args.quick:
                left = [p for p in c.providers if args.device in mod.PROVIDERS[p].not_quick_on]
                c.providers = [p for p in c.providers if p not in left]
                if left:
                    c.notes.append(f"--quick on {args.device} leaves out: {', '.join(left)}")
            if provs:
                c.providers = [p for p in c.providers if p in provs]
                if not c.providers:
                    continue
            if c.heavy and not args.all and not (only and c.name in only):
                skipped.append(c)
                continue
            cases.append(c)
    args.left_out = left_out
    return cases, skipped


def _LOSSES():
    return [m.LOSS for m in H.loss_modules()]


class Runner:
    """Spawns workers and collects their results."""

    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.cache = os.path.join(tmp, "targets")
        os.makedirs(self.cache, exist_ok=True)
        self.n = 0
        self.zygotes = {}

    def env(self, thp: str) -> dict:
        env = dict(os.environ)
        env.pop("THP_MEM_ALLOC_ENABLE", None)
        if thp == "on":
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        if IN_CHECKOUT:
            env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def spawn(self, spec: dict, thp: str, timeout: float):
        """Run one worker job; returns (exit code or "timeout", its output, result path, wall s)."""
        self.n += 1
        spec_path = os.path.join(self.tmp, f"spec{self.n}.json")
        spec["result_path"] = os.path.join(self.tmp, f"result{self.n}.jsonl")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        t0 = time.perf_counter()
        z = self.zygote(thp)
        if z is not None:
            try:
                rc = z.run(spec_path, timeout)
                try:
                    with open(spec_path + ".log", errors="replace") as f:
                        err = f.read()
                except OSError:
                    err = ""
                return rc, err, spec["result_path"], time.perf_counter() - t0
            except ZygoteDied as e:
                self.zygotes[thp] = None  # fall back to a plain process from now on
                print(f"warning: fork server died ({e}); using one process per worker",
                      file=sys.stderr)
        try:
            p = subprocess.run(WORKER + [spec_path], cwd=WORKER_CWD,
                               env=self.env(thp), capture_output=True, text=True, timeout=timeout)
            rc, err = p.returncode, (p.stderr or "") + (p.stdout or "")
        except subprocess.TimeoutExpired as e:
            rc = "timeout"
            err = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes)
                   else (e.stderr or ""))
        return rc, err, spec["result_path"], time.perf_counter() - t0

    def zygote(self, thp: str):
        if not self.args.fork:
            return None
        if thp not in self.zygotes:
            try:
                self.zygotes[thp] = Zygote(self.env(thp),
                                           os.path.join(self.tmp, f"zygote-{thp}.log"))
            except ZygoteDied as e:
                print(f"warning: fork server did not start ({e}); using one process per worker",
                      file=sys.stderr)
                self.zygotes[thp] = None
        return self.zygotes[thp]

    def close(self):
        for z in self.zygotes.values():
            if z is not None:
                z.close()

    def probe(self, no_machine=False):
        spec = {"mode": "probe", "device": self.args.device, "threads": self.args.threads,
                "no_machine": no_machine}
        rc, err, path, _ = self.spawn(spec, "default", 300)
        if rc != 0 or not os.path.exists(path):
            return None, _tail(err)
        with open(path) as f:
            return json.load(f), None

    def run_case(self, case: H.Case, providers: list, thp: str, on_result):
        """Run ``providers`` on ``case``; call on_result(result) for each, crash-tolerant.

        Interleaved timing (the default): one worker times all providers in turn, then (unless
        --no-memory) each provider runs again alone in a fresh process, briefly, for its peak
        memory (and that process's time, kept as ``fresh_median_ms``)."""
        if self.args.timing != "interleaved":
            groups = [list(providers)] if self.args.shared else [[p] for p in providers]
            self._run_groups(case, groups, thp, {}, on_result)
            return
        timed = {}
        self._run_groups(case, [list(providers)], thp, {"interleave": True},
                         lambda r: timed.__setitem__(r["provider"], r))
        if not self.args.memory:
            for p in providers:
                on_result(timed[p])
            return
        fresh = {}
        # FUSEDLOSS_CPU_GRAD_BUFFER=fresh: by default fusedloss keeps its CPU gradient buffer
        # resident between steps and hands it out again, so it would not show as a rise over the
        # timed calls; allocated per step, the same buffer counts in the peak like any provider's.
        self._run_groups(case, [[p] for p in providers if timed[p].get("status") == "ok"], thp,
                         {"repeats": 2, "max_time": 1.0, "mmap_threshold": 1 << 20,
                          "env": {"FUSEDLOSS_CPU_GRAD_BUFFER": "fresh"}},
                         lambda r: fresh.__setitem__(r["provider"], r))
        for p in providers:
            r, f = timed[p], fresh.get(p)
            if f is not None and f.get("status") == "ok":
                r.update(extra_bytes=f.get("extra_bytes"), fresh_median_ms=f.get("median_ms"),
                         baseline_bytes=f.get("baseline_bytes"))
            elif f is not None:
                r["memory_error"] = f.get("reason")
            on_result(r)

    def _run_groups(self, case: H.Case, groups: list, thp: str, overrides: dict, on_result):
        queue = [list(g) for g in groups if g]
        while queue:
            group = queue.pop(0)
            spec = {
                "mode": "run", "device": self.args.device, "case": case.to_json(),
                "providers": group, "cache_dir": self.cache, "warmup": self.args.warmup,
                "repeats": self.args.repeats, "max_time": self.args.max_time,
                "threads": self.args.threads, "seed": self.args.seed,
                "opts": {"backend": self.args.backend},
            }
            spec.update(overrides)
            rc, err, path, wall = self.spawn(spec, thp, self.args.timeout * len(group))
            done, started = {}, []
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        if obj.get("event") == "start":
                            started.append(obj["provider"])
                        else:
                            done[obj["provider"]] = obj
            for p in group:
                if p in done:
                    done[p]["worker_wall_s"] = round(wall, 2)
                    done[p]["worker_providers"] = len(group)
                    on_result(done[p])
            missing = [p for p in group if p not in done]
            if not missing:
                continue
            # the worker died: blame the provider it had started, retry the rest in a new worker
            culprit = started[-1] if started and started[-1] in missing else missing[0]
            what = (f"timed out after {self.args.timeout * len(group):.0f} s" if rc == "timeout"
                    else f"worker died (exit {rc}{_signame(rc)})")
            on_result({"provider": culprit, "status": "error",
                       "reason": f"{what}: {_crash_summary(err)}",
                       "stderr_tail": _tail(err, 3000)})
            rest = [p for p in missing if p != culprit]
            if rest:
                queue.insert(0, rest)


class ZygoteDied(Exception):
    pass


class Zygote:
    """Client of ``python -m bench._worker --zygote`` (a fork server with torch imported), one per
    allocator setting, since the allocator reads THP_MEM_ALLOC_ENABLE once per process."""

    def __init__(self, env: dict, log_path: str):
        self.log = open(log_path, "w")
        self.p = subprocess.Popen(WORKER + ["--zygote"], cwd=WORKER_CWD,
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.log)
        self.buf = b""
        line = self._line(time.monotonic() + 120)
        if line != "ready":
            self.close()
            raise ZygoteDied(f"no ready line (got {line!r}); log: {_tail(_read(log_path))}")

    def _line(self, deadline: float):
        import select

        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise ZygoteDied(f"fork server exited ({self.p.poll()})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode().strip()

    def run(self, spec_path: str, timeout: float):
        try:
            self.p.stdin.write((spec_path + "\n").encode())
            self.p.stdin.flush()
        except OSError as e:
            raise ZygoteDied(str(e)) from e
        line = self._line(time.monotonic() + 60)
        if not line or not line.startswith("pid "):
            raise ZygoteDied(f"unexpected reply {line!r}")
        pid = int(line.split()[1])
        line = self._line(time.monotonic() + timeout)
        if line is None:  # the job ran past its time: kill it, collect the zygote's exit line
            import signal

            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._line(time.monotonic() + 60)
            return "timeout"
        parts = line.split()
        if len(parts) != 3 or parts[0] != "exit":
            raise ZygoteDied(f"unexpected reply {line!r}")
        return int(parts[2])

    def close(self):
        try:
            self.p.stdin.close()
        except Exception:
            pass
        try:
            self.p.wait(timeout=10)
        except Exception:
            self.p.kill()
        self.log.close()


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _signame(rc):
    if isinstance(rc, int) and rc < 0:
        import signal

        try:
            return f", {signal.Signals(-rc).name}"
        except ValueError:
            return ""
    return ""


def _crash_summary(err: str) -> str:
    """faulthandler's 'Fatal Python error' line and the innermost frame, else the output's tail."""
    lines = [ln.strip() for ln in (err or "").splitlines() if ln.strip()]
    fatal = next((i for i, ln in enumerate(lines) if ln.startswith("Fatal Python error")), None)
    if fatal is None:
        return _tail(err, 400)
    frame = next((ln for ln in lines[fatal:] if ln.startswith("File ")), "")
    return f"{lines[fatal]} at {frame}" if frame else lines[fatal]


def _tail(s: str, n: int = 600) -> str:
    s = (s or "").strip()
    lines = [ln for ln in s.splitlines() if ln.strip()]
    s = " | ".join(lines[-6:])
    return s if len(s) <= n else "..." + s[-n:]


def print_env(probe: dict | None, args, cases, skipped, out):
    w = lambda s="": print(s, file=out, flush=True)  # noqa: E731
    w(f"fusedloss benchmarks: device {args.device}, repeats {args.repeats} (median; also min), "
      f"warm-up {args.warmup}, max {args.max_time:g} s timing per measurement"
      + (", QUICK" if args.quick else ""))
    if not probe:
        w("environment probe failed; see above")
        return
    e, m = probe["env"], probe.get("machine") or {}
    w(f"torch {e['torch']} | python {e['python']} | CPU capability {e['cpu_capability']} | "
      f"{e['threads']} threads of {e['cpu_count']} CPUs | {e.get('cpu_model') or ''}"
      + (f" | GPU {e['gpu']}" if e.get("gpu") else ""))
    w(f"git {e.get('git')} | THP sysfs: {e.get('thp_sysfs')} | load average at start "
      f"{e.get('loadavg', '?')} (other work on the machine skews the numbers)")
    fl = e.get("fusedloss", {})
    line = f"fusedloss: import {fl.get('import')}"
    if fl.get("version"):
        line += f", version {fl['version']}"
    b = fl.get("backends")
    if isinstance(b, dict):
        parts = []
        for name, info in b.items():
            if isinstance(info, dict) and "available" in info:
                why = str(info.get("why", ""))
                parts.append(f"{name} " + ("yes" if info["available"] else
                                           f"no ({why[:90]}{'...' if len(why) > 90 else ''})"))
            else:
                parts.append(f"{name} {info}")
        line += "; backends: " + ", ".join(parts)
    elif b is not None:
        line += f"; backends: {b}"
    w(line)
    for msg in fl.get("warnings", [])[:3]:
        w(f"  fusedloss import warning: {msg}")
    if m:
        w(f"machine ({args.device}): copy {m['copy_GBps']:.1f} GB/s (read+write), exp "
          f"{m['exp_Gelemps']:.2f} Gelem/s fp32, GEMM {m['gemm_fp32_GFLOPs']:.0f} GFLOP/s fp32")
    memline = (
        "memory: CUDA max_memory_allocated over the timed calls minus memory_allocated before them"
        if args.device == "cuda" else
        "memory: peak RSS over the timed calls (VmHWM, reset through /proc/self/clear_refs after "
        "malloc_trim) minus RSS just before them (inputs and first logits resident, warm-up done); "
        "a fresh process per provider, forked from a server that has only imported torch and "
        "fusedloss" + ("; BUT --shared-process runs all providers of a case in one process, the "
                       "peak reset between them, so memory is approximate" if args.shared else ""))
    w(memline)
    if skipped:
        w("skipped (heavy on this device; --all, or its exact name in --only, runs it): "
          + ", ".join(c.name for c in skipped))
    w()


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    cases, skipped = select_cases(args)
    if args.list:
        for mod in H.loss_modules():
            print(f"{mod.LOSS}: providers: " + ", ".join(mod.PROVIDERS))
        for c in cases + skipped:
            print(f"  {c.name:<40} {c.title}" + ("  [heavy: --all]" if c in skipped else ""))
        return 0
    if not cases:
        print("no cases selected", file=sys.stderr)
        return 2
    if args.readme:  # fail now, not after the run
        R.check_readme(args.readme)
    os.makedirs(args.out, exist_ok=True)
    thps = (["n/a"] if args.device == "cuda"
            else (["default", "on"] if args.thp == "both" else [args.thp]))

    tmp = tempfile.mkdtemp(prefix="fusedloss-bench-")
    runner = None
    busy = None
    if args.busy:  # a spinning process: the other core busy, as on a shared machine
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        runner = Runner(args, tmp)
        probe, perr = runner.probe()
        if probe is None:
            print(f"warning: environment probe failed, providers are tried blindly: {perr}",
                  file=sys.stderr)
        print_env(probe, args, cases, skipped, sys.stdout)
        avail = (probe or {}).get("available", {})
        machine = (probe or {}).get("machine")

        from tqdm import tqdm

        plan = []  # (case, thp, runnable, unavailable)
        for c in cases:
            a = avail.get(c.loss, {})
            provs = H.module_for_loss(c.loss).PROVIDERS
            run = [p for p in c.providers if not a.get(p)]
            # check targets first, in order of preference, so that the others can be compared
            run = ([p for p in c.check_order if p in run]
                   + [p for p in run if p not in c.check_order])
            for thp in thps:
                skip = {p: ("unavailable", a[p]) for p in c.providers if a.get(p)}
                for p in run:
                    only = provs[p].thp_settings
                    if thp != "n/a" and only and thp not in only and len(thps) > 1:
                        skip[p] = ("skipped", f"timed under the {'/'.join(only)} allocator setting "
                                              f"only (see that table)")
                plan.append((c, thp, [p for p in run if p not in skip], skip))
        total = sum(len(r) for _, _, r, _ in plan)
        results = []
        bar = tqdm(total=total, desc="bench", unit="run", dynamic_ncols=True, file=sys.stderr,
                   disable=None)  # a bar on a terminal; none in a log file
        for case, thp, run, unavail in plan:
            rows = {p: {"provider": p, "status": st, "reason": why}
                    for p, (st, why) in unavail.items()}

            def on_result(r, case=case, thp=thp, rows=rows):
                rows[r["provider"]] = r
                bar.update(1)

            bar.set_postfix_str(f"{case.name} {thp}")
            runner.run_case(case, run, thp, on_result)
            ordered = [rows[p] for p in case.providers if p in rows]
            for r in ordered:
                r.update(loss=case.loss, case=case.name, thp=thp, device=args.device,
                         logits_bytes=case.logits_bytes)
                results.append(r)
            tqdm.write(H.format_table(case, thp, ordered, machine, args.device) + "\n")
        bar.close()

        # summary, JSON, plot
        failed = [r for r in results
                  if r.get("status") == "ok" and r.get("check", {}).get("pass") is False]
        errors = [r for r in results if r.get("status") == "error"]
        suffix = (f"{args.device}{'_quick' if args.quick else ''}{'_full' if args.full else ''}"
                  f"{'_sweep_' + args.sweep if args.sweep else ''}{'_busy' if args.busy else ''}")
        json_path = os.path.join(args.out, f"bench_{suffix}.json")
        png_path = os.path.join(args.out, f"bench_{suffix}.png")
        H.dump_json(json_path, {
            "args": vars(args),
            "env": (probe or {}).get("env"),
            "available": avail,
            "machine": machine,
            "cases": [c.to_json() for c in cases],
            "skipped_cases": [c.name for c in skipped],
            "providers": {m.LOSS: {k: v.desc for k, v in m.PROVIDERS.items()}
                          for m in H.loss_modules()},
            "results": results,
            "wall_s": time.perf_counter() - t_start,
        })
        plot_files = {}
        if not args.no_plot:
            try:
                for loss in dict.fromkeys(c.loss for c in cases):
                    lc = [c for c in cases if c.loss == loss]
                    f = png_path.replace(".png", f"_{loss}.png")
                    (R.write_sweep_plot if args.sweep else H.write_plot)(
                        f, lc, results, args.device)
                    plot_files[loss] = f
                png_path = ", ".join(plot_files.values())
            except Exception as e:  # a plot failure should not hide the numbers
                print(f"warning: plot failed: {H.short_error(e)}", file=sys.stderr)
                png_path = None
        csv_path = os.path.join(args.out, f"bench_{suffix}.csv")
        R.write_csv(csv_path, cases, results, (machine or {}).get("name") or args.device,
                    _version())
        md_path = os.path.join(args.out, f"bench_{suffix}.md")
        command = " ".join(["python -m bench"] + list(sys.argv[1:] if argv is None else argv))
        md = R.markdown(cases, results, machine, (probe or {}).get("env"), args.device, command,
                        {loss: os.path.basename(f) for loss, f in plot_files.items()})
        with open(md_path, "w") as fh:
            fh.write(md)
        if args.readme:
            R.update_readme(args.readme, md, args.out)
        print(R.summary(cases, results, machine) + "\n")
        if args.compare:
            try:
                print(R.compare(args.compare, results) + "\n")
            except (OSError, ValueError, KeyError) as e:
                print(f"warning: --compare {args.compare}: {H.short_error(e)}", file=sys.stderr)
        if getattr(args, "left_out", None) and args.quick:
            print(f"--quick ran one case per loss and no memory job; left out "
                  f"{len(args.left_out)} quick cases (--quick --loss NAME runs a loss's): "
                  + ", ".join(args.left_out))
        elif getattr(args, "left_out", None):
            print(f"left out {len(args.left_out)} cases of the full run (--full runs them, over "
                  f"30 minutes here; --loss NAME or --only CASE picks some): "
                  + ", ".join(args.left_out))
        print(f"wrote {json_path}, {csv_path}, {md_path}"
              + (f" and {png_path}" if png_path and not args.no_plot else ""))
        for r in errors:
            print(f"provider error: {r['case']} [{r['thp']}] {r['provider']}: {r.get('reason')}")
        for r in failed:
            print(f"CHECK FAILED: {r['case']} [{r['thp']}] {r['provider']} vs "
                  f"{r['check'].get('target')}: {'; '.join(r['check']['fails'])}")
        print(f"done in {time.perf_counter() - t_start:.0f} s: {len(results)} results, "
              f"{sum(r.get('status') == 'ok' for r in results)} measured, {len(errors)} errors, "
              f"{len(failed)} failed checks")
        return 1 if failed else 0
    finally:
        if busy is not None:
            busy.kill()
        if runner is not None:
            runner.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException:
        import traceback

        traceback.print_exc()
        print("bench: harness crashed", file=sys.stderr)
        sys.exit(2)
