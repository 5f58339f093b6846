"""Vocab-parallel cross-entropy over ``torch.distributed`` (tensor-parallel ``lm_head``).

Each rank of a process group holds the logits of a contiguous slice of the vocabulary, slices in
rank order. :func:`vocab_parallel_cross_entropy` returns what ``fusedloss.cross_entropy`` returns
on the gathered logits, without ever gathering them: per row, only a handful of numbers cross the
network, and the backward needs no communication at all.

Communication per call: two ``all_reduce`` of O(N + world_size) floats, both on the input's
device, so it works with gloo (CPU tensors) and NCCL (CUDA tensors):

1. ``MAX`` of ``[lse_local (N), slice sizes (2 * world_size)]``: the row maxima of the local
   logsumexps and, riding along for free, every rank's slice width (each rank writes its own
   width into its own slots, the others hold 0). Slices may therefore have any widths, including
   0, and nothing is read back to the host (no ``.item()``, no host sync on a GPU).
2. ``SUM`` of ``[exp(lse_local - max), x_y (0 off this rank's slice), row sum of the logits
   (only with label smoothing)]``, an ``(N, 2)`` or ``(N, 3)`` tensor.

The global ``lse = max + log(sum exp(lse_local - max))``; per row (0 for ignored rows)::

    loss = (1 - ls) (lse - x_y) + (ls / V) (V lse - sum_c x_c) + z_loss lse^2

The backward is local: ``d loss_r / d x_j = g_r (A exp(x_j - lse) - ls / V - (1 - ls) [j == y])``
with ``A = 1 + 2 z_loss lse``, the target column written as ``A expm1(x_y - lse) + A - (1 - ls) -
ls / V`` so that ``p_y - 1`` keeps its accuracy for confident predictions.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _backend
from ._checks import (
    acc_dtype,
    check_float_tensor,
    check_int,
    check_label_smoothing,
    check_reduction,
    check_same_device,
    check_tensor,
    check_z_loss,
)

__all__ = ["vocab_parallel_cross_entropy"]

# Slice widths travel as two float32-exact digits (hi * 2**24 + lo), so any width is exact.
_DIGIT = 1 << 24
# Rows per backward chunk are chosen so a chunk holds about this many float32 gradients.
_BWD_CHUNK_ELEMS = 1 << 24
# Local target of rows whose class is not on this rank (and of ignored rows).
_NOT_LOCAL = -1


def vocab_parallel_cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    group: Optional["dist.ProcessGroup"] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Tensor:
    """Cross-entropy over logits whose vocabulary is split across the ranks of ``group``.

    Args:
        input: ``(N, V_local)`` float logits of this rank's vocabulary slice. Rank ``r`` of
            ``group`` holds classes ``[start_r, start_r + V_r)`` with ``start_r = V_0 + ... +
            V_{r-1}``; the widths ``V_r`` may differ between ranks (and may be 0).
        target: ``(N,)`` int64 *global* class ids in ``[0, V)`` or ``ignore_index``, the same on
            every rank.
        group: the process group (default: the world).
        ignore_index, reduction, label_smoothing, z_loss: as in ``fusedloss.cross_entropy``
            (``label_smoothing`` spreads over the full vocabulary ``V = sum_r V_r``).

    Returns:
        The same value on every rank: ``fusedloss.cross_entropy(full_logits, target, ...)`` of
        the logits gathered along dim 1, in the input's dtype ('none': shape ``(N,)``). Its
        gradient with respect to ``input`` is this rank's slice of the full gradient, computed
        locally (backward does no communication). Every rank must call this function with the
        same ``N``, ``target`` and arguments (it runs collectives).

    Example (tensor-parallel ``lm_head``: rank ``r`` holds rows ``[start_r, start_r + V_r)`` of
    the output projection)::

        import torch.distributed as dist
        from fusedloss.distributed import vocab_parallel_cross_entropy

        dist.init_process_group("nccl")                      # or "gloo" for CPU tensors
        # hidden: (B, T, H), replicated; lm_head_shard: (V_r, H) of this rank
        logits = hidden.flatten(0, 1) @ lm_head_shard.T      # (B*T, V_r), never gathered
        loss = vocab_parallel_cross_entropy(logits, labels.flatten(), ignore_index=-100)
        loss.backward()                                      # grads for this rank's shard only

    Numerics follow ``fusedloss.cross_entropy``: float32 accumulation (float64 for float64
    input), NaN for a 'mean' whose targets are all ignored, no host synchronisation. The local
    logsumexp runs through the fused kernel of the backend that ``backend="auto"`` picks for the
    input's device (``torch.logsumexp`` when that is the reference).
    """
    check_float_tensor(input, "input")
    check_tensor(target, "target")
    check_same_device(target, "target", input)
    if input.dim() != 2:
        raise ValueError(f"input must have shape (N, V_local), got shape {tuple(input.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be an int64 tensor of global class ids, got dtype "
                        f"{target.dtype}")
    if target.dim() != 1 or target.shape[0] != input.shape[0]:
        raise ValueError(f"target must have shape ({input.shape[0]},) for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    ignore_index = check_int(ignore_index, "ignore_index")
    check_reduction(reduction)
    label_smoothing = check_label_smoothing(label_smoothing)
    z_loss = check_z_loss(z_loss)
    if not dist.is_available():
        raise RuntimeError("vocab_parallel_cross_entropy needs torch.distributed, which this "
                           "build of torch lacks")
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives non-members
        raise ValueError("group: this process is not a member of the given process group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("vocab_parallel_cross_entropy needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group)")
    if dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the given process group")

    backend = ("reference" if input.shape[1] == 0 else
               _backend.resolve_for("auto", input, "logsumexp"))
    loss, valid = _VocabParallelCrossEntropy.apply(input, target, group, ignore_index,
                                                   label_smoothing, z_loss, backend)
    if reduction == "none":
        return loss.to(input.dtype)
    out = loss.sum()
    if reduction == "mean":
        out = out / valid.sum(dtype=out.dtype)  # 0 / 0 = NaN when every row is ignored
    return out.to(input.dtype)


def _local_lse(input: Tensor, backend: str, acc: torch.dtype) -> Tensor:
    """Per-row logsumexp of this rank's logits, (N,) in ``acc``."""
    n, v = input.shape
    if v == 0:
        return torch.full((n,), float("-inf"), dtype=acc, device=input.device)
    if backend == "reference":
        return torch.logsumexp(input.to(acc), dim=1)
    # The softmax-row skeleton's lse-only kernel: one read of the logits.
    return torch.ops.fusedloss.logsumexp_fwd(input.unsqueeze(2), 0.0, backend).reshape(n)


def _check_targets(target: Tensor, vocab: Tensor, ignore_index: int) -> None:
    ok = ((target >= 0) & (target < vocab)) | (target == ignore_index)
    if target.device.type == "cpu":  # no device to wait for: a clear error naming the index
        if not bool(ok.all()):
            bad = target[~ok][0].item()
            raise IndexError(f"vocab_parallel_cross_entropy: target {bad} is out of bounds for a "
                             f"vocabulary of {int(vocab)} classes (ignore_index={ignore_index})")
    else:  # a device-side assertion, as torch's nll_loss does; no host sync
        torch._assert_async(ok.all(), "vocab_parallel_cross_entropy: target out of bounds")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row losses (acc dtype) and the non-ignored mask; backward is local."""

    @staticmethod
    def forward(ctx, input, target, group, ignore_index, label_smoothing, z_loss, backend):
        n, v_local = input.shape
        acc = acc_dtype(input.dtype)
        dev = input.device
        rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        ls, z = label_smoothing, z_loss

        # 1) MAX: the local logsumexps and, in this rank's two slots, its slice width.
        lse_local = _local_lse(input, backend, acc)
        red_max = torch.zeros(n + 2 * world, dtype=acc, device=dev)
        red_max[:n] = lse_local
        red_max[n + 2 * rank] = v_local // _DIGIT
        red_max[n + 2 * rank + 1] = v_local % _DIGIT
        dist.all_reduce(red_max, op=dist.ReduceOp.MAX, group=group)
        m = red_max[:n]
        digits = red_max[n:].view(world, 2).to(torch.int64)
        widths = digits[:, 0] * _DIGIT + digits[:, 1]
        start = widths[:rank].sum()  # 0-d int64 tensors on the device: no host sync
        vocab = widths.sum()

        valid = target != ignore_index
        _check_targets(target, vocab, ignore_index)
        t_local = target - start
        local = valid & (t_local >= 0) & (t_local < v_local)
        t_local = torch.where(local, t_local, _NOT_LOCAL)
        idx = t_local.clamp(0, max(v_local - 1, 0)).unsqueeze(1)
        if v_local > 0:
            x_y = torch.where(local, input.gather(1, idx).squeeze(1).to(acc), 0.0)
        else:
            x_y = torch.zeros(n, dtype=acc, device=dev)

        # 2) SUM: exp(lse_local - max), the target logit, and the row sum for label smoothing.
        # An infinite max is replaced by 0, as torch.logsumexp does (all -inf rows give -inf).
        m_safe = torch.where(m.abs() == float("inf"), 0.0, m)
        cols = [torch.exp(lse_local - m_safe), x_y]
        if ls > 0:
            cols.append(input.sum(dim=1, dtype=acc))
        red_sum = torch.stack(cols, dim=1)
        dist.all_reduce(red_sum, op=dist.ReduceOp.SUM, group=group)
        lse = m_safe + torch.log(red_sum[:, 0])
        x_y_all = red_sum[:, 1]

        loss = (1.0 - ls) * (lse - x_y_all)
        if ls > 0:
            loss = loss + ls * lse - (ls / vocab.to(acc)) * red_sum[:, 2]
        if z > 0:
            loss = loss + z * lse * lse
        loss = torch.where(valid, loss, 0.0)

        ctx.save_for_backward(input, lse, t_local, valid, vocab)
        ctx.ls, ctx.z = ls, z
        ctx.mark_non_differentiable(valid)
        return loss, valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_valid):
        input, lse, t_local, valid, vocab = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        return (_local_grad(input, lse, t_local, valid, vocab, grad_loss, ctx.ls, ctx.z),) + \
            (None,) * 6


def _local_grad(input: Tensor, lse: Tensor, t_local: Tensor, valid: Tensor, vocab: Tensor,
                grad_loss: Tensor, ls: float, z: float) -> Tensor:
    """This rank's slice of d(sum_r g_r loss_r)/d(input), in chunks of rows so that half-precision
    input never needs a float32 copy of all of its logits."""
    n, v_local = input.shape
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    if n == 0 or v_local == 0:
        return out
    acc = lse.dtype
    g = grad_loss.to(acc)
    g_a = g * (1.0 + 2.0 * z * lse) if z > 0 else g  # g A
    g_s = g * (ls / vocab.to(acc)) if ls > 0 else None  # g ls / V
    local = t_local >= 0
    idx = t_local.clamp(min=0).unsqueeze(1)
    same = input.dtype == acc
    step = max(1, _BWD_CHUNK_ELEMS // v_local)
    for r0 in range(0, n, step):
        r = slice(r0, min(n, r0 + step))
        if same:
            buf = out[r]
            buf.copy_(input[r])
        else:
            buf = input[r].to(acc)
        buf.sub_(lse[r].unsqueeze(1)).exp_().mul_(g_a[r].unsqueeze(1))  # g A p_j
        if g_s is not None:
            buf.sub_(g_s[r].unsqueeze(1))
        # Target column: g (A (p_y - 1) + A - (1 - ls) - ls / V), p_y - 1 = expm1(x_y - lse).
        x_y = input[r].gather(1, idx[r]).squeeze(1).to(acc)
        g_y = g_a[r] * torch.expm1(x_y - lse[r]) + (g_a[r] - (1.0 - ls) * g[r])
        if g_s is not None:
            g_y = g_y - g_s[r]
        cur = buf.gather(1, idx[r]).squeeze(1)
        buf.scatter_(1, idx[r], torch.where(local[r], g_y, cur).unsqueeze(1))
        buf.masked_fill_(~valid[r].unsqueeze(1), 0.0)  # ignored rows: exactly 0, even for NaN
        if not same:
            out[r].copy_(buf)
    return out
