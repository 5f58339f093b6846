"""Helpers shared by tests/test_sigmoid_focal.py and tests/test_bce.py (the per-element losses)."""

from __future__ import annotations

import pytest
import torch

import fusedloss


def skip_unless(op, backend):
    info = fusedloss.backends(op)[backend]
    if not info["available"]:
        pytest.skip(f"{backend}: {info['why']}")


def grads_of(fn, x, *args, upstream=None, **kwargs):
    """(loss, d loss / d x) of fn(x, *args, **kwargs) on a fresh leaf copy of x."""
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    (g,) = torch.autograd.grad(loss, x, torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), g


def thread_counts():
    return sorted({1, max(2, torch.get_num_threads())})
