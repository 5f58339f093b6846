"""What ``python -m bench`` writes after the per-case tables: the summary table, the CSV in
Liger-Kernel's long format, and the ``--compare OLD.json`` report."""

from __future__ import annotations

import csv
import datetime
import json
import statistics

from . import _harness as H

# The providers the summary sets fusedloss against, in column order (absent ones are skipped).
PEERS = ("torch.compile", "torch eager", "torch chunked", "liger", "quack", "monai", "kornia",
         "torchvision", "reference")


def _ok(r):
    return r.get("status") == "ok" and r.get("median_ms") is not None


def _by_case(results):
    out = {}
    for r in results:
        out.setdefault((r["case"], r["thp"]), {})[r["provider"]] = r
    return out


def gbps(case, r) -> float | None:
    """Achieved bandwidth: the case's minimal bytes moved (logits in, gradient out) over the
    median time."""
    b = (case.floor or {}).get("bytes")
    if not b or not _ok(r):
        return None
    return b / (r["median_ms"] * 1e-3) / 1e9


def summary(cases, results, machine) -> str:
    """One line per (case, allocator setting): fusedloss's median, its bandwidth against the
    machine's copy bandwidth, how many times longer each peer takes, extra memory in logits,
    and whether every check passed."""
    by = _by_case(results)
    present = [p for p in PEERS if any(p in d for d in by.values())]
    hdr = ["case", "thp", "fused ms", "GB/s (copy %)"] + [f"{p} x" for p in present] + [
        "mem x logits", "checks"]
    lines = []
    copy = (machine or {}).get("copy_GBps")
    cmap = {c.name: c for c in cases}
    for (name, thp), d in by.items():
        case = cmap.get(name)
        f = d.get(H.FUSED)
        row = [name, thp]
        if f is None or not _ok(f):
            row += ["-", "-"]
        else:
            bw = gbps(case, f) if case else None
            row += [f"{f['median_ms']:.4g}",
                    "-" if bw is None else (f"{bw:.1f}" + (f" ({100 * bw / copy:.0f}%)"
                                                            if copy else ""))]
        for p in present:
            r = d.get(p)
            if r is None:
                row.append("")
            elif not _ok(r) or f is None or not _ok(f):
                row.append(r.get("status", "-"))
            else:
                row.append(f"{r['median_ms'] / f['median_ms']:.2f}x")
        xl = (f.get("extra_bytes") / case.logits_bytes
              if f is not None and f.get("extra_bytes") is not None and case
              and case.logits_bytes else None)
        row.append("-" if xl is None else f"{xl:.2f}")
        fails = [p for p, r in d.items() if r.get("check", {}).get("pass") is False]
        row.append("FAIL: " + ", ".join(fails) if fails else "ok")
        lines.append(row)
    if not lines:
        return ""
    w = [max(len(str(x[i])) for x in [hdr] + lines) for i in range(len(hdr))]
    out = ["== summary: fusedloss per case; a peer's column is its time over fusedloss's "
           "(> 1: fusedloss is faster)"]
    for j, row in enumerate([hdr] + lines):
        out.append("   " + "  ".join(str(c).ljust(w[i]) if i < 2 else str(c).rjust(w[i])
                                     for i, c in enumerate(row)))
        if j == 0:
            out.append("   " + "  ".join("-" * x for x in w))
    return "\n".join(out)


def _x(case) -> tuple[str, str]:
    dims = case.dims or {}
    if "V" in dims:
        return "V", str(dims["V"])
    if "shape" in dims:
        return "shape", "x".join(map(str, dims["shape"]))
    return "case", case.name


def write_csv(path, cases, results, device, version) -> None:
    """Liger-Kernel's long format: one row per (kernel, provider, mode, metric)."""
    cmap = {c.name: c for c in cases}
    ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    cols = ["kernel_name", "kernel_provider", "kernel_operation_mode", "metric_name",
            "metric_unit", "x_name", "x_label", "x_value", "y_value_50", "y_value_20",
            "y_value_80", "extra_benchmark_config_str", "gpu_name", "timestamp",
            "fusedloss_version"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in results:
            case = cmap.get(r["case"])
            if case is None or not _ok(r):
                continue
            xn, xv = _x(case)
            mode = "full" if case.mode == "fwdbwd" else "forward"
            cfg = json.dumps({"dtype": case.dtype, "thp": r.get("thp"), "case": case.name,
                              **(case.dims or {})}, sort_keys=True)
            t = sorted(r.get("times_ms") or [r["median_ms"]])
            q = statistics.quantiles(t, n=10, method="inclusive") if len(t) > 1 else t * 9
            base = [case.loss, r["provider"], mode]
            tail = [cfg, device, ts, version]
            w.writerow(base + ["speed", "ms", xn, xn, xv, r["median_ms"], q[1], q[7]] + tail)
            if r.get("extra_bytes") is not None:
                mb = r["extra_bytes"] / 2**20
                w.writerow(base + ["memory", "MB", xn, xn, xv, mb, mb, mb] + tail)


def compare(old_path, results) -> str:
    """fusedloss's medians against an earlier JSON of the same cases: what got faster or slower
    (beyond 5%, the run-to-run noise of a quiet machine)."""
    with open(old_path) as fh:
        old = json.load(fh)
    prev = {(r["case"], r["thp"], r["provider"]): r for r in old.get("results", []) if _ok(r)}
    lines = [f"== compared with {old_path} (median ms, new / old; beyond +-5% marked)"]
    n = 0
    for r in results:
        o = prev.get((r["case"], r["thp"], r["provider"]))
        if o is None or not _ok(r):
            continue
        ratio = r["median_ms"] / o["median_ms"]
        mark = "slower" if ratio > 1.05 else ("faster" if ratio < 1 / 1.05 else "")
        lines.append(f"   {r['case']:<42} {r['thp']:<8} {r['provider']:<15} "
                     f"{o['median_ms']:>9.4g} -> {r['median_ms']:<9.4g} {ratio:5.2f}x  {mark}")
        n += 1
    if not n:
        lines.append("   no case of this run is in that file")
    return "\n".join(lines)


def write_sweep_plot(path, cases, results, device) -> None:
    """Time and extra memory of each provider against the swept size (vocabulary, or the logits'
    MiB), log-log, one figure per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cases:
        return
    by_v = "V" in (cases[0].dims or {})

    def xval(c):
        return c.dims["V"] if by_v else c.logits_bytes / 2**20

    provs = list(dict.fromkeys(p for c in cases for p in c.providers))
    thp = next((t for t in ("default", "n/a", "on") if any(r["thp"] == t for r in results)), None)
    results = [r for r in results if r["thp"] == thp]  # one allocator setting per line
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for p in provs:
        pts = []
        for c in cases:
            r = next((r for r in results if r["case"] == c.name and r["provider"] == p
                      and _ok(r)), None)
            if r is not None:
                pts.append((xval(c), r["median_ms"], r.get("extra_bytes")))
        if not pts:
            continue
        xs = [x for x, _, _ in pts]
        axes[0].plot(xs, [t for _, t, _ in pts], marker="o", label=p)
        mem = [(x, m / 2**20) for x, _, m in pts if m is not None]
        if mem:
            axes[1].plot([x for x, _ in mem], [m for _, m in mem], marker="o", label=p)
    xs = [xval(c) for c in cases]
    axes[1].plot(xs, [c.logits_bytes / 2**20 for c in cases], color="gray", ls="--", lw=0.8,
                 label="logits size")
    xlabel = "vocabulary size V" if by_v else "logits (MiB)"
    for ax, title in zip(axes, ("median fwd+bwd time (ms)", "extra memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(f"{cases[0].loss}: {title}", fontsize=10)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"fusedloss sweep on {device}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
