"""The plain-torch oracle of the Dice device ops (docs/KERNELS.md, "dice"): the per-(n, c) sums
that ``dice_fwd`` returns and the gradient that ``dice_bwd`` returns, in float64. Every backend's
kernel tests compare with it; it is also a fake backend for testing the Python epilogue alone."""

from __future__ import annotations

import torch


def dice_sums_oracle(input, target, ignore_index, sigmoid, squared_pred, with_ce, with_smoothing):
    """(sums (N, C, 5), lse (N, D) or (0,)) in float64; see csrc/include/fusedloss/dice.h."""
    x = input.double()
    n, c, d = x.shape
    sums = x.new_zeros(n, c, 5)
    if sigmoid:
        p, g = torch.sigmoid(x), target.double()
        lse = x.new_empty(0)
    else:
        valid = target != ignore_index
        y = torch.where(valid, target, 0)
        lse = torch.logsumexp(x, dim=1)  # (N, D)
        p = torch.exp(x - lse[:, None]) * valid[:, None]
        g = torch.nn.functional.one_hot(y, c).permute(0, 2, 1).double() * valid[:, None]
        nll = lse[:, None] - x  # (N, C, D)
        if with_ce:
            sums[..., 3] = (nll * g).sum(-1)
        if with_smoothing:
            sums[..., 4] = (nll * valid[:, None]).sum(-1)
    sums[..., 0] = (p * g).sum(-1)
    sums[..., 1] = (p * p if squared_pred else p).sum(-1)
    sums[..., 2] = (g * g if squared_pred else g).sum(-1)
    return sums, lse


def dice_grad_oracle(grad_sums, input, target, ignore_index, sigmoid, squared_pred, with_ce,
                     with_smoothing):
    """d(sum(sums * grad_sums))/d(input) in float64."""
    x = input.detach().double().requires_grad_(True)
    sums, _ = dice_sums_oracle(x, target, ignore_index, sigmoid, squared_pred, with_ce,
                               with_smoothing)
    (g,) = torch.autograd.grad((sums * grad_sums.double()).sum(), x)
    return g
