"""What ``python -m bench`` prints and writes after the runs (bench/_report.py), on made-up results:
a fast wrong kernel must read as FAIL in every table, a missing peer must be a row with its reason,
every provider a bench module adds must get a column, and ``--readme`` must replace only its block.
No timing happens here."""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the bench is a top-level package of the checkout
    sys.path.insert(0, ROOT)

from bench import _harness as H  # noqa: E402
from bench import _report as R  # noqa: E402


def _case(name, mode="fwdbwd"):
    return H.Case(loss="dice", name=name, mode=mode, dtype="fp32", dims={"shape": [2, 3, 8, 8]},
                  providers=["fusedloss", "torch.compile", "MONAI", "new peer", "reference"],
                  check_order=["reference"], logits_bytes=1536,
                  title=f"Dice {name}, float32, {'fwd+bwd' if mode == 'fwdbwd' else 'fwd'}",
                  tol=dict(H.DEFAULT_TOL["fp32"]), floor={"bytes": 3 * 1536})


def _ok(case, provider, ms, err=1e-7, passed=True, extra=1536):
    return {"case": case, "thp": "default", "provider": provider, "status": "ok",
            "median_ms": ms, "min_ms": ms * 0.9, "times_ms": [ms * 0.9, ms, ms * 1.1, ms * 1.2],
            "extra_bytes": extra,
            "check": {"pass": passed, "errors": {"loss": err, "grad": err / 2},
                      "fails": [] if passed else [f"grad err {err:.1e} > 1e-04"]}}


@pytest.fixture
def run():
    cases = [_case("good"), _case("wrong", mode="fwd")]
    results = [
        _ok("good", "fusedloss", 1.0),
        _ok("good", "torch.compile", 2.5, extra=3072),
        {"case": "good", "thp": "default", "provider": "MONAI", "status": "unavailable",
         "reason": "monai is not installed (pip install monai)"},
        _ok("good", "new peer", 4.0),
        {"case": "good", "thp": "default", "provider": "reference", "status": "ok",
         "median_ms": 10.0, "min_ms": 9.0, "times_ms": [9.0, 10.0], "extra_bytes": None,
         "check": {"target": "reference", "target_self": True}},
        # fusedloss is 10x faster here, and wrong
        _ok("wrong", "fusedloss", 0.1, err=0.5, passed=False),
        _ok("wrong", "torch.compile", 1.0),
    ]
    machine = {"copy_GBps": 20.0}
    env = {"cpu_model": "Test CPU", "threads": 2, "cpu_capability": "AVX2", "torch": "2.13.0",
           "git": "0123456789abcdef", "fusedloss": {"version": "0.1.0"}}
    return cases, results, machine, env


def test_summary_flags_a_wrong_kernel_and_keeps_every_peer(run):
    cases, results, machine, _ = run
    text = R.summary(cases, results, machine)
    good = next(ln for ln in text.splitlines() if ln.strip().startswith("good"))
    wrong = next(ln for ln in text.splitlines() if ln.strip().startswith("wrong"))
    assert "2.50x" in good and "4.00x" in good and "unavailable" in good and good.endswith("ok")
    assert "FAIL: fusedloss" in wrong
    header = text.splitlines()[1]
    for peer in ("torch.compile", "MONAI", "new peer", "reference"):
        assert f"{peer} x" in header


def test_markdown_rows(run):
    cases, results, machine, env = run
    md = R.markdown(cases, results, machine, env, "cpu", "python -m bench --full",
                    {"dice": "bench_cpu_full_dice.png"})
    assert md.startswith("`python -m bench --full` on CPU (Test CPU, 2 threads, AVX2")
    assert "copy bandwidth 20.0 GB/s" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| Dice")]
    assert len(rows) == 2
    good, wrong = rows
    cells = [c.strip() for c in good.strip("|").split("|")]
    # case, mode, fusedloss ms (p20-p80), GB/s, then the peers in PEERS order and the unknown one
    # last (torch.compile, MONAI, reference, new peer), mem, max err, check
    assert cells[1] == "fwd+bwd"
    assert cells[2].startswith("1 (")
    assert cells[3] == f"{3 * 1536 / 1e-3 / 1e9:.1f}"
    assert cells[4] == "2.50x (2.00)"
    assert cells[5] == "unavailable"
    assert cells[6] == "10.00x"  # no memory measured: no bracket
    assert cells[7] == "4.00x (1.00)"
    assert cells[8] == "1.00" and cells[9] == "1.0e-07" and cells[10] == "ok"
    assert wrong.rstrip(" |").endswith("FAIL: fusedloss") and "5.0e-01" in wrong
    assert "- MONAI: unavailable: monai is not installed (pip install monai)" in md
    assert "![dice](bench_cpu_full_dice.png)" in md


def test_readme_block_is_replaced_and_nothing_else(tmp_path, run):
    cases, results, machine, env = run
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{R.README_BEGIN}\nold table\n{R.README_END}\noutro\n")
    md = R.markdown(cases, results, machine, env, "cpu", "python -m bench",
                    {"dice": "bench_cpu_dice.png"})
    R.update_readme(str(readme), md, str(tmp_path / "docs" / "bench"))
    text = readme.read_text()
    assert text.startswith(f"intro\n{R.README_BEGIN}\n`python -m bench`")
    assert text.endswith(f"{R.README_END}\noutro\n")
    assert "old table" not in text
    assert "![dice](docs/bench/bench_cpu_dice.png)" in text  # relative to the README
    R.update_readme(str(readme), md, str(tmp_path / "docs" / "bench"))  # idempotent
    assert readme.read_text() == text


def test_readme_without_a_block_fails_before_the_run(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="no .* block"):
        R.check_readme(str(readme))
    with pytest.raises(SystemExit, match="missing.md"):
        R.check_readme(str(tmp_path / "missing.md"))


def test_csv_long_format(tmp_path, run):
    cases, results, _, _ = run
    path = tmp_path / "out.csv"
    R.write_csv(str(path), cases, results, "Test CPU", "0.1.0")
    rows = list(csv.DictReader(path.open()))
    speed = [r for r in rows if r["metric_name"] == "speed"]
    # every measured result, and nothing for the unavailable peer
    assert len(speed) == sum(r["status"] == "ok" for r in results)
    f = next(r for r in speed if r["kernel_provider"] == "fusedloss"
             and r["kernel_operation_mode"] == "full")
    assert float(f["y_value_50"]) == 1.0
    assert float(f["y_value_20"]) <= 1.0 <= float(f["y_value_80"])
    assert json.loads(f["extra_benchmark_config_str"])["case"] == "good"


def test_compare_marks_what_moved(tmp_path, run):
    _, results, _, _ = run
    old = [dict(r) for r in results if r["status"] == "ok"]
    for r in old:
        r["median_ms"] *= {"fusedloss": 2.0, "torch.compile": 1.0}.get(r["provider"], 0.5)
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"results": old}))
    lines = R.compare(str(path), results).splitlines()
    fused_good = next(ln for ln in lines if "good" in ln and "fusedloss" in ln)
    compiled = next(ln for ln in lines if "good" in ln and "torch.compile" in ln)
    peer = next(ln for ln in lines if "new peer" in ln)
    assert fused_good.endswith("faster")
    assert not compiled.endswith(("faster", "slower"))
    assert peer.endswith("slower")
