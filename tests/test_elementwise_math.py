"""Host test of the per-element math the CUDA kernels run (csrc/include/fusedloss/{logistic,bce,
sigmoid_focal}.h with ScalarMath, one element at a time; the CPU kernels run the same templates on
vectors): compiled with g++ where it exists, against the float64 reference at ordinary and extreme
logits, hard and soft targets, every gamma of the issue."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from fusedloss import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE = os.path.join(ROOT, "csrc", "include")

PROGRAM = r"""
#include <cstdio>
#include <fusedloss/bce.h>
#include <fusedloss/sigmoid_focal.h>
using namespace fusedloss;
template <typename T>
void run(double x, double t, double pw, double alpha, double gamma) {
  T lb, gb, ls, gs;
  bce::elem<ScalarMath<T>, true>(T(x), T(t), T(pw), lb, gb);
  sigmoid_focal::elem<ScalarMath<T>>(T(x), T(t), T(alpha), T(gamma), ls, gs);
  std::printf("%.17g %.17g %.17g %.17g\n", double(lb), double(gb), double(ls), double(gs));
}
int main() {
  double x, t, pw, alpha, gamma;
  int is_float;
  while (std::scanf("%d %lf %lf %lf %lf %lf", &is_float, &x, &t, &pw, &alpha, &gamma) == 6) {
    if (is_float) run<float>(x, t, pw, alpha, gamma); else run<double>(x, t, pw, alpha, gamma);
  }
}
"""


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("ewmath")
    src, out = d / "m.cpp", d / "m"
    src.write_text(PROGRAM)
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{INCLUDE}", str(src), "-o", str(out)],
                   check=True)
    return str(out)


def _cases():
    xs = [-1e4, -100.0, -20.0, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0, 100.0, 1e4]
    ts = [0.0, 1.0, 0.3, 0.99]
    return [(x, t) for x in xs for t in ts]


@pytest.mark.parametrize("is_float", [0, 1], ids=["double", "float"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_scalar_math_matches_reference(exe, is_float, gamma):
    cases = _cases()
    pw, alpha = 2.5, 0.25
    lines = "".join(f"{is_float} {x!r} {t!r} {pw!r} {alpha!r} {gamma!r}\n" for x, t in cases)
    r = subprocess.run([exe], input=lines, capture_output=True, text=True, check=True)
    got = torch.tensor([[float(v) for v in ln.split()] for ln in r.stdout.splitlines()],
                       dtype=torch.float64)
    assert torch.isfinite(got).all()
    x = torch.tensor([c[0] for c in cases], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    # BCE in its cancellation-free form (the reference's is torch's: -20 + 20.000000002)
    lb = (1 - t) * torch.nn.functional.softplus(x) + pw * t * torch.nn.functional.softplus(-x)
    (gb,) = torch.autograd.grad(lb.sum(), x)
    ls = reference.sigmoid_focal_loss(x, t, alpha, gamma)
    (gs,) = torch.autograd.grad(ls.sum(), x)
    want = torch.stack([lb.detach(), gb, ls.detach(), gs], 1)
    tol = 1e-12 if not is_float else 1e-5  # float: t = 0.99 itself rounds (1 - t off by 1e-6)
    # relative to each quantity's size, with an absolute floor for values that round to 0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * 1e-3 if is_float else 1e-300)
