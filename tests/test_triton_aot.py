"""The project's ahead-of-time check of the Triton kernels (.ci/check_triton.py), in its quick
mode for sm_90: every kernel compiles with triton's own toolchain (no GPU needed), without register
spills, with 128-bit loads and stores on rows that can be aligned (GPT-2's 50257 included), its
target assertion compiled in, and launch grids within CUDA's limits at the worst shapes. CI runs
the full check (sm_80 and sm_90, every configuration) as a step of its own."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_aot_check():
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90)
    except Exception as e:  # pragma: no cover - triton built without the NVIDIA backend
        pytest.skip(f"triton cannot compile for NVIDIA here: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "check_triton.py"), "--quick",
                        "--arch", "90"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "OK" in r.stdout.splitlines()[-1]
