"""Peak host memory of fwd+bwd on the CPU backend, measured in a fresh process.

The memory goals are part of the API: cross_entropy's gradient buffer is the only logits-sized
allocation (none with inplace_backward), and linear_cross_entropy holds one chunk of logits at a
time. The linear CE bound caught two real regressions: autograd materialising zero gradients for
the op's gradient outputs (one more weight-sized buffer in backward) and a chunk of logits
allocated while the previous one was still referenced (two chunks at the peak).

Each measurement runs the step once to warm up (allocator, MKL buffers), returns freed memory to
the OS, resets the process's high-water mark (/proc/self/clear_refs) and reads VmHWM - VmRSS
around a second step.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import fusedloss

pytestmark = pytest.mark.skipif(
    not fusedloss.backends()["cpu"]["available"] or not sys.platform.startswith("linux"),
    reason="needs the CPU extension and Linux /proc")

MIB = 2**20

_PRELUDE = textwrap.dedent("""
    import ctypes, json, torch, fusedloss

    def _status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

    def measure(step, prepare=lambda: None):
        step(prepare())
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        args = prepare()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status("VmRSS")
        step(args)
        print(json.dumps({"extra": _status("VmHWM") - base}))
""")


def _extra_bytes(body: str) -> int:
    script = _PRELUDE + textwrap.dedent(body)
    env = dict(os.environ, OMP_NUM_THREADS="1", FUSEDLOSS_BACKEND="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    if out.returncode != 0 and "clear_refs" in out.stderr:
        pytest.skip("cannot reset the high-water mark here (/proc/self/clear_refs)")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["extra"]


N, C = 1024, 16384  # 64 MiB of fp32 logits
LOGITS = N * C * 4


@pytest.mark.parametrize("inplace", [False, True], ids=["grad_buffer", "inplace"])
def test_cross_entropy_fwd_bwd_peak(inplace):
    extra = _extra_bytes(f"""
        base = torch.randn({N}, {C}, requires_grad=True)
        target = torch.randint(0, {C}, ({N},))

        def prepare():
            base.grad = None
            return [base.clone()]  # non-leaf logits, as lm_head's output, made before the measure

        def step(held):
            loss = fusedloss.cross_entropy(held.pop(), target, inplace_backward={inplace})
            loss.backward()  # the logits' last reference went with the pop, as in a training step
        measure(step, prepare)
    """)
    # The gradient buffer is the only new logits-sized allocation; with inplace_backward it lives
    # in the logits' memory (base.grad keeps it). Slack: allocator and library noise.
    expected = 0 if inplace else LOGITS
    assert extra <= expected + 8 * MIB, (extra / MIB, expected / MIB)


def test_linear_cross_entropy_fwd_bwd_peak():
    n, h, v, chunk = 2048, 256, 32000, 256
    extra = _extra_bytes(f"""
        x = torch.randn({n}, {h}, requires_grad=True)
        w = (torch.randn({v}, {h}) * 0.02).requires_grad_()
        target = torch.randint(0, {v}, ({n},))

        def step(_):
            x.grad = None
            w.grad = None
            fusedloss.linear_cross_entropy(x, w, target, chunk_size={chunk}).backward()
        measure(step)
    """)
    grads = (n * h + v * h) * 4
    chunk_logits = chunk * v * 4  # 31 MiB: a second chunk, or zeros of w's size, exceed the slack
    assert extra <= grads + chunk_logits + 16 * MIB, (extra / MIB, (grads + chunk_logits) / MIB)


@pytest.mark.parametrize("loss", ["sigmoid_focal", "bce"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_elementwise_losses_fwd_bwd_peak(loss, dtype):
    """sigmoid focal and BCE, 'mean', broadcast weights: the gradient is the only input-sized
    allocation (no per-element loss, no broadcast copy, no float32 temporary of a bf16 input);
    the goal allows 10% of the input beyond it."""
    shape = (8, 16, 256, 256)  # 8M elements: 32 MiB fp32, 16 MiB bf16
    call = ("fusedloss.sigmoid_focal_loss(x, t, reduction='mean', weight=w)" if loss ==
            "sigmoid_focal" else "fusedloss.binary_cross_entropy_with_logits(x, t, w, 'mean', pw)")
    extra = _extra_bytes(f"""
        base = torch.randn({shape}).to(torch.{dtype}).requires_grad_()
        t = (torch.rand({shape}) < 0.1).to(torch.{dtype})
        w = torch.rand(16, 1, 1, dtype=torch.{dtype})
        pw = torch.rand(256, dtype=torch.{dtype}) * 3

        def prepare():
            base.grad = None
            return [base.clone()]

        def step(held):
            x = held.pop()
            loss = {call}
            del x
            loss.backward()
        measure(step, prepare)
    """)
    size = 8 * 16 * 256 * 256 * (4 if dtype == "float32" else 2)
    assert extra <= size * 1.1 + 2 * MIB, (extra / MIB, size / MIB)


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


def _huge_kib(env: dict) -> tuple[int, int]:
    """AnonHugePages (KiB) of the mapping holding a fresh 64 MiB gradient, and of a control
    buffer of that size that the test advises itself (does this machine give huge pages now?)."""
    script = textwrap.dedent("""
        import ctypes, mmap, torch, fusedloss

        def huge_kib(ptr):
            inside = False
            with open("/proc/self/smaps") as f:
                for line in f:
                    head = line.split()[0]
                    if "-" in head and not head.endswith(":"):
                        lo, hi = (int(v, 16) for v in head.split("-"))
                        inside = lo <= ptr < hi
                    elif inside and head == "AnonHugePages:":
                        return int(line.split()[1])

        x = torch.randn(512, 32768, requires_grad=True)
        fusedloss.cross_entropy(x, torch.randint(0, 32768, (512,))).backward()
        grad = huge_kib(x.grad.data_ptr() + x.grad.nbytes // 2)
        buf = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(64 << 20), 14)  # MADV_HUGEPAGE
        ctypes.memset(addr, 1, 64 << 20)
        print(grad, huge_kib(addr + (32 << 20)))
    """)
    base = {k: v for k, v in os.environ.items() if k != "FUSEDLOSS_CPU_HUGEPAGES"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(base, FUSEDLOSS_BACKEND="cpu", **env), timeout=300)
    assert out.returncode == 0, out.stderr
    grad, control = out.stdout.split()[-2:]
    return int(grad), int(control)


def test_gradient_buffer_huge_pages():
    """A large new gradient is advised to transparent huge pages (4 KiB first-touch faults cost
    as much as the kernel); FUSEDLOSS_CPU_HUGEPAGES=0 turns that off."""
    mode = _thp_mode()
    if mode not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages: {mode}")
    grad, control = _huge_kib({})
    if control == 0:
        pytest.skip("this machine gave no huge page to an advised buffer just now")
    assert grad > 0
    if mode == "madvise":  # only the advice makes huge pages
        grad, control = _huge_kib({"FUSEDLOSS_CPU_HUGEPAGES": "0"})
        assert grad == 0


def test_cpu_gradient_buffer_reuse_is_never_observable():
    """The CPU kernel hands the last call's gradient buffer out again only when nothing else holds
    it (FUSEDLOSS_CPU_GRAD_BUFFER=reuse, the default): a gradient still referenced is never
    overwritten by the next call."""
    if not fusedloss.backends()["cpu"]["available"]:
        pytest.skip("no CPU kernels")
    import torch
    op = torch.ops.fusedloss_C.cross_entropy_fwd
    x = torch.randn(64, 32768, 1)  # an 8 MiB gradient: above the 4 MiB threshold
    t = torch.randint(0, 32768, (64, 1))
    g1 = op(x, t, None, None, -100, 0.0, 0.0, 0.0, True)[2]
    kept = g1.clone()
    g2 = op(x * 2, t, None, None, -100, 0.0, 0.0, 0.0, True)[2]  # g1 still held: a new buffer
    assert g2.data_ptr() != g1.data_ptr()
    torch.testing.assert_close(g1, kept, rtol=0, atol=0)
    ptr = g2.data_ptr()
    del g1, g2
    g3 = op(x, t, None, None, -100, 0.0, 0.0, 0.0, True)[2]  # g2 released: its buffer again
    assert g3.data_ptr() == ptr
    torch.testing.assert_close(g3, kept, rtol=0, atol=0)
