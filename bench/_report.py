"""What ``python -m bench`` writes after the per-case tables: the summary table, the CSV in
Liger-Kernel's long format, and the ``--compare OLD.json`` report."""

from __future__ import annotations

import csv
import datetime
import json
import statistics

from . import _harness as H

# The providers the summary sets fusedloss against, in column order (absent ones are skipped).
# Any other provider a bench module adds comes after these, so none is left out of the tables.
PEERS = ("torch.compile", "torch eager", "torch chunked", "liger", "quack", "MONAI", "kornia",
         "torchvision", "fusedloss-inplace", "reference")


def _peers(rows) -> list:
    """The non-fusedloss providers in ``rows`` (dicts keyed by provider), in PEERS order."""
    seen = dict.fromkeys(p for d in rows for p in d if p != H.FUSED)
    return [p for p in PEERS if p in seen] + [p for p in seen if p not in PEERS]


def _ok(r):
    return r.get("status") == "ok" and r.get("median_ms") is not None


def _p20_p80(r) -> tuple:
    """The 20th and 80th percentiles of a result's timed steps (its one time when it has one)."""
    t = sorted(r.get("times_ms") or [r["median_ms"]])
    q = statistics.quantiles(t, n=10, method="inclusive") if len(t) > 1 else t * 9
    return q[1], q[7]


def _fused_mem(case, f) -> float | None:
    """fusedloss's extra memory in units of the case's input, when measured."""
    if f is None or not _ok(f) or f.get("extra_bytes") is None or not case or \
            not case.logits_bytes:
        return None
    return f["extra_bytes"] / case.logits_bytes


def _failed(d) -> str:
    """The check cell of one (case, allocator setting): ok, or FAIL and who failed."""
    fails = [p for p, r in d.items() if r.get("check", {}).get("pass") is False]
    return "FAIL: " + ", ".join(fails) if fails else "ok"


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
    present = _peers(by.values())
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
        xl = _fused_mem(case, f)
        row.append("-" if xl is None else f"{xl:.2f}")
        row.append(_failed(d))
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
            base = [case.loss, r["provider"], mode]
            tail = [cfg, device, ts, version]
            w.writerow(base + ["speed", "ms", xn, xn, xv, r["median_ms"], *_p20_p80(r)] + tail)
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


README_BEGIN = "<!-- bench-results:begin (written by python -m bench --readme README.md) -->"
README_END = "<!-- bench-results:end -->"


def _spread(r) -> str:
    if len(r.get("times_ms") or ()) < 3:
        return f"{r['median_ms']:.3g}"
    p20, p80 = _p20_p80(r)
    return f"{r['median_ms']:.3g} ({p20:.3g}-{p80:.3g})"


def markdown(cases, results, machine, env, device, command, pngs) -> str:
    """The run as markdown: per loss, one row per (case, allocator setting) with fusedloss's median
    and p20-p80 spread, its bandwidth, each peer's time over fusedloss's (and its extra memory in
    units of the input), fusedloss's extra memory and its largest error against the check target;
    then the loss's plot. What the README's results section is made of."""
    by = _by_case(results)
    cmap = {c.name: c for c in cases}
    copy = (machine or {}).get("copy_GBps")
    e = env or {}
    where = ", ".join(x for x in [
        e.get("gpu") or e.get("cpu_model") or device,
        f"{e['threads']} threads" if device == "cpu" and e.get("threads") else "",
        e.get("cpu_capability") if device == "cpu" else "",
        f"torch {e['torch']}" if e.get("torch") else "",
        f"fusedloss {(e.get('fusedloss') or {}).get('version', '?')} ({e.get('git', '?')[:12]})",
    ] if x)
    thps = sorted({thp for _, thp in by})
    out = [f"`{command}` on {device.upper()} ({where}), {datetime.date.today().isoformat()}"
           + (f"; copy bandwidth {copy:.1f} GB/s, measured in the same run" if copy else "")
           + ".",
           "",
           "Each row: fusedloss's median time in ms (p20-p80 of the timed steps); its achieved "
           "bandwidth (the minimal bytes: input read, gradient written); each peer's median over "
           "fusedloss's (> 1: fusedloss is faster), with the peer's extra memory in units of the "
           "input in brackets; fusedloss's extra memory (the gradient alone is 1.00); and "
           "fusedloss's largest relative error against the check target (the reference, else "
           "torch eager). A row whose check failed says FAIL."]
    for loss in dict.fromkeys(c.loss for c in cases):
        names = [c.name for c in cases if c.loss == loss]
        keys = [(n, t) for n in names for t in thps if (n, t) in by]
        if not keys:
            continue
        peers = _peers(by[k] for k in keys)
        hdr = (["case", "mode"] + (["thp"] if len(thps) > 1 else [])
               + ["fusedloss ms", "GB/s"] + peers + ["mem", "max err", "check"])
        out += ["", f"#### {loss}", "", "| " + " | ".join(hdr) + " |",
                "|" + "---|" * len(hdr)]
        for name, thp in keys:
            d, case = by[(name, thp)], cmap[name]
            f = d.get(H.FUSED)
            fok = f is not None and _ok(f)
            row = [case.title.rsplit(", fwd", 1)[0] if case.title else name,
                   "fwd+bwd" if case.mode == "fwdbwd" else "fwd"]
            row += [thp] if len(thps) > 1 else []
            bw = gbps(case, f) if fok else None
            row += [_spread(f) if fok else (f or {}).get("status", "-"),
                    "-" if bw is None else f"{bw:.1f}"]
            for p in peers:
                r = d.get(p)
                if r is None:
                    row.append("")
                elif not _ok(r) or not fok:
                    row.append(r.get("status", "-"))
                else:
                    cell = f"{r['median_ms'] / f['median_ms']:.2f}x"
                    if r.get("extra_bytes") is not None and case.logits_bytes:
                        cell += f" ({r['extra_bytes'] / case.logits_bytes:.2f})"
                    row.append(cell)
            xl = _fused_mem(case, f)
            row.append("-" if xl is None else f"{xl:.2f}")
            errs = (f or {}).get("check", {}).get("errors") or {}
            row.append(f"{max(errs.values()):.1e}" if errs else "-")
            row.append(_failed(d))
            out.append("| " + " | ".join(row) + " |")
        why = {}
        for k in keys:
            for p, r in by[k].items():
                if r.get("status") not in (None, "ok") and r.get("reason"):
                    why.setdefault(p, f"{r['status']}: {r['reason']}")
        if why:
            out += [""] + [f"- {p}: {w}" for p, w in why.items()]
        png = (pngs or {}).get(loss)
        if png:
            out += ["", f"![{loss}]({png})"]
    return "\n".join(out) + "\n"


def check_readme(readme_path) -> str:
    """The README's text, or SystemExit if it has no results block to write into."""
    try:
        with open(readme_path) as fh:
            text = fh.read()
    except OSError as e:
        raise SystemExit(f"--readme {readme_path}: {e}") from None
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"--readme {readme_path}: no '{README_BEGIN}' ... '{README_END}' block "
                         "to write the results into")
    return text


def update_readme(readme_path, md, results_dir) -> None:
    """Replace the README's block between README_BEGIN and README_END with ``md``, its image
    links made relative to the README."""
    import os
    import re

    text = check_readme(readme_path)
    rel = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(readme_path)))
    md = re.sub(r"\]\(([^)/]+\.png)\)", lambda mt: f"]({rel}/{mt.group(1)})", md)
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    with open(readme_path, "w") as fh:
        fh.write(head + README_BEGIN + "\n" + md + README_END + tail)
