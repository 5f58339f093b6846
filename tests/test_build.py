"""The package and its build: backends(), the pure-Python fallback, FUSEDLOSS_REQUIRE_EXT, and the
CPU kernels under every instruction-set copy compiled into fusedloss._C."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedloss
from _support import cpu_capabilities

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code, prefix="", **env):
    """Run prefix + code in a fresh interpreter (imports happen once per process)."""
    full_env = {**os.environ, **env}
    script = prefix + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_backends_report():
    b = fusedloss.backends()
    assert set(b) == {"triton", "cuda", "cpu", "reference"}
    for name, info in b.items():
        assert isinstance(info["available"], bool) and info["why"], name
    assert b["reference"]["available"]
    if not torch.cuda.is_available():
        assert not b["cuda"]["available"] and "CUDA" in b["cuda"]["why"]


def test_extension_loaded_when_required():
    """CI sets FUSEDLOSS_REQUIRE_EXT=1: then _C must be there, with CPU kernels."""
    if os.environ.get("FUSEDLOSS_REQUIRE_EXT", "0") in ("", "0"):
        pytest.skip("FUSEDLOSS_REQUIRE_EXT is not set")
    assert fusedloss._ext.available()
    assert fusedloss.backends()["cpu"]["available"], fusedloss.backends()["cpu"]["why"]


BLOCK_C = "import sys; sys.modules['fusedloss._C'] = None  # as if the extension were not built\n"


def test_works_without_extension():
    r = run_py(prefix=BLOCK_C, code="""
        import warnings, torch, torch.nn.functional as F
        import fusedloss
        b = fusedloss.backends()
        assert not b["cpu"]["available"] and "pip install" in b["cpu"]["why"], b["cpu"]
        x = torch.randn(4, 7, requires_grad=True); t = torch.randint(0, 7, (4,))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            loss = fusedloss.cross_entropy(x, t)
            fusedloss.cross_entropy(x, t)
        msgs = [str(m.message) for m in w if "fusedloss" in str(m.message)]
        assert len(msgs) == 1 and "pip install" in msgs[0], msgs
        torch.testing.assert_close(loss, F.cross_entropy(x, t))
        loss.backward()
        try:
            fusedloss.cross_entropy(x, t, backend="cpu")
        except RuntimeError as e:
            assert "not available" in str(e)
        else:
            raise AssertionError("backend='cpu' without _C must raise")
        print("ok")
    """, FUSEDLOSS_REQUIRE_EXT="0")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_require_ext_turns_missing_extension_into_import_error():
    r = run_py("import fusedloss\n", prefix=BLOCK_C, FUSEDLOSS_REQUIRE_EXT="1")
    assert r.returncode != 0 and "FUSEDLOSS_REQUIRE_EXT" in r.stderr, r.stderr




@pytest.mark.parametrize("cap", cpu_capabilities())
def test_every_isa_copy(cap):
    """Each per-ISA copy of the CPU kernels (chosen at run time like ATen's, and forced here with
    ATEN_CPU_CAPABILITY) gives the same values and gradients."""
    if not fusedloss.backends()["cpu"]["available"]:
        pytest.skip(fusedloss.backends()["cpu"]["why"])
    r = run_py("""
        import torch, torch.nn.functional as F
        import fusedloss
        torch.manual_seed(0)
        for dtype, tol in [(torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-10)]:
            for shape, tshape in [((7, 1003), (7,)), ((2, 5, 19), (2, 19))]:
                x = (torch.randn(shape) * 3).to(dtype).requires_grad_(True)
                t = torch.randint(0, shape[1], tshape); t.view(-1)[0] = -100
                w = torch.rand(shape[1], dtype=dtype) + 0.5
                kw = dict(weight=w, label_smoothing=0.1)
                loss = fusedloss.cross_entropy(x, t, backend="cpu", **kw)
                (g,) = torch.autograd.grad(loss, x)
                ref = F.cross_entropy(x.double(), t, **{**kw, "weight": w.double()})
                (gr,) = torch.autograd.grad(ref, x)
                torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
                torch.testing.assert_close(g.double(), gr.double(), rtol=tol, atol=tol)
        print(torch.backends.cpu.get_cpu_capability())
    """, ATEN_CPU_CAPABILITY=cap)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().lower() == cap, r.stdout


def test_import_is_light():
    """``import fusedloss`` must not pull in torch._dynamo, inductor or triton (seconds and ~150
    MiB at every start of a CPU job); the compile path still works, marking its constants with
    the attribute dynamo reads. A first call on the CPU must not import them either."""
    script = textwrap.dedent("""
        import sys, torch
        import fusedloss
        heavy = [m for m in ("torch._dynamo", "torch._inductor", "triton") if m in sys.modules]
        assert not heavy, f"import fusedloss imported {heavy}"
        x = torch.randn(4, 5, requires_grad=True)
        fusedloss.cross_entropy(x, torch.tensor([0, 1, 2, 3])).backward()
        heavy = [m for m in ("torch._dynamo", "torch._inductor", "triton") if m in sys.modules]
        assert not heavy, f"a first eager call imported {heavy}"
        print("light")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "light" in p.stdout, p.stderr[-2000:]


def test_distributed_is_an_attribute():
    """``import fusedloss`` then ``fusedloss.distributed`` works, as torch's subpackages do."""
    p = run_py("import fusedloss; print(fusedloss.distributed.vocab_parallel_cross_entropy)")
    assert p.returncode == 0 and "vocab_parallel_cross_entropy" in p.stdout, p.stderr[-2000:]
