"""pytest-benchmark view of every loss: fusedloss against the reference and torch eager, forward
plus backward, one group per (loss, shape), so that pytest-benchmark's table compares the three
side by side:

    pip install pytest-benchmark
    pytest bench/ --benchmark-only                 # every loss
    pytest bench/ --benchmark-only -k softmax_focal --benchmark-columns=median,min,rounds

Not part of the test command (tests/ is its testpath). ``python -m bench`` is the full
benchmark (peers, memory, interleaved timing, checks); these are the shapes a user can time
inside their own pytest setup. Shapes are moderate so the reference finishes in seconds on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import reference

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(shape, dtype=torch.float32):
    return (torch.randn(shape, device=DEVICE) * 3).to(dtype)


def _classes(shape, c):
    return torch.randint(0, c, shape, device=DEVICE)


def _torchvision_sigmoid_focal(x, t, alpha=0.25, gamma=2.0, reduction="mean"):
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma * (alpha * t + (1 - alpha) * (1 - t))
    return loss.mean()


def _softmax_focal_eager(x, t, gamma=2.0):
    lp = torch.log_softmax(x, 1).gather(1, t.unsqueeze(1)).squeeze(1)
    return (-(-torch.expm1(lp)) ** gamma * lp).mean()


def _tv_eager(x, norm="l1"):
    dv = x[..., 1:, :] - x[..., :-1, :]
    dh = x[..., :, 1:] - x[..., :, :-1]
    return (dv.abs().sum() + dh.abs().sum()) / x.numel()


# loss -> (shape label, make inputs, {provider: fn(*inputs)})
CASES = {
    "cross_entropy": ("4096x32000", lambda: (_logits((4096, 32000)), _classes((4096,), 32000)),
                      {"fusedloss": fusedloss.cross_entropy, "reference": reference.cross_entropy,
                       "torch eager": F.cross_entropy}),
    "bce": ("16x1x512x512", lambda: (_logits((16, 1, 512, 512)),
                                     (torch.rand(16, 1, 512, 512, device=DEVICE) > 0.5).float()),
            {"fusedloss": fusedloss.binary_cross_entropy_with_logits,
             "reference": reference.binary_cross_entropy_with_logits,
             "torch eager": F.binary_cross_entropy_with_logits}),
    "sigmoid_focal": ("4x20000x80", lambda: (_logits((4, 20000, 80)),
                                             (torch.rand(4, 20000, 80, device=DEVICE) > 0.99)
                                             .float()),
                      {"fusedloss": lambda x, t: fusedloss.sigmoid_focal_loss(
                          x, t, reduction="mean"),
                       "reference": lambda x, t: reference.sigmoid_focal_loss(
                          x, t, reduction="mean"),
                       "torch eager": _torchvision_sigmoid_focal}),
    "softmax_focal": ("4x19x256x256", lambda: (_logits((4, 19, 256, 256)),
                                               _classes((4, 256, 256), 19)),
                      {"fusedloss": fusedloss.softmax_focal_loss,
                       "reference": reference.softmax_focal_loss,
                       "torch eager": _softmax_focal_eager}),
    "tv": ("8x3x512x512", lambda: (_logits((8, 3, 512, 512)),),
           {"fusedloss": fusedloss.total_variation, "reference": reference.total_variation,
            "torch eager": _tv_eager}),
}
if hasattr(fusedloss, "dice_loss"):
    CASES["dice"] = ("4x19x256x256", lambda: (_logits((4, 19, 256, 256)),
                                              _classes((4, 256, 256), 19)),
                     {"fusedloss": fusedloss.dice_loss, "reference": reference.dice_loss})

PARAMS = [pytest.param(loss, prov, id=f"{loss}-{prov}")
          for loss, (_, _, provs) in CASES.items() for prov in provs]


@pytest.mark.parametrize("loss, provider", PARAMS)
def test_fwd_bwd(benchmark, loss, provider):
    label, make, provs = CASES[loss]
    fn = provs[provider]
    inputs = make()
    x = inputs[0].requires_grad_(True)
    rest = inputs[1:]

    def step():
        x.grad = None
        fn(x, *rest).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{loss} {label} fwd+bwd ({DEVICE})"
    benchmark.extra_info.update(loss=loss, provider=provider, shape=label, device=DEVICE)
    benchmark.pedantic(step, warmup_rounds=1, rounds=5 if provider == "reference" else 10)
