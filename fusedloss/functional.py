"""The public loss functions: check arguments, choose a backend, call the op, reduce.

Signatures and semantics: docs/DESIGN.md section 3; ``fusedloss.reference`` is their executable
spec.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from . import _backend, reference
from . import _checks as C
from .ops import bce as _bce_ops
from .ops import cross_entropy as _ce_ops
from .ops import dice as _dice_ops
from .ops import linear_cross_entropy as _lce_ops
from .ops import sigmoid_focal as _sigmoid_focal_ops
from .ops import softmax_focal as _softmax_focal_ops
from .ops import tv as _tv_ops
from .ops._common import ElementwiseLossEager as _EwEager

__all__ = ["cross_entropy", "linear_cross_entropy", "sigmoid_focal_loss", "softmax_focal_loss",
           "binary_cross_entropy_with_logits", "total_variation"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # csrc/registration.cpp's cross_entropy_loss


def _fused_backend(op: str, backend: str, input: Tensor, *others: Optional[Tensor]):
    """The fused backend that runs this call of ``op``, or None when the reference must: asked for
    (``backend="reference"``, or the automatic fallback without a fused kernel), or forward-mode
    AD / a torch.func transform active on ``input`` or ``others`` (the fused kernels have no
    derivative rules for those; the reference's plain torch ops have them all). Every loss starts
    with its argument checks (``fusedloss._checks``) and then this."""
    name = _backend.resolve_for(backend, input, op)
    if name == "reference" or _forward_ad_active(input, *others):
        return None
    return name


_C_OPS: dict[str, object] = {}


def _c_op(name: str):
    """``torch.ops.fusedloss_C.<name>.default``, looked up once: calling the overload directly
    skips the overload packet's per-call schema matching (about 1 us, at small shapes 5% of a
    fused step)."""
    op = _C_OPS.get(name)
    if op is None:
        op = _C_OPS[name] = getattr(torch.ops.fusedloss_C, name).default
    return op


def _eager_c_op(name: str) -> bool:
    """The cpu and cuda backends outside torch.compile run a loss as one fusedloss_C call, autograd
    included (csrc/autograd/): at small shapes the per-call cost of Python pieces is more than the
    kernel. torch.compile and the triton backend trace or call the Python custom ops instead."""
    return name != "triton" and not torch.compiler.is_compiling()


def _reduce_rows(loss: Tensor, reduction: str, out_shape, mean_factor: Optional[Tensor],
                 count: int, dtype: torch.dtype) -> Tensor:
    """The reduction of per-row losses that the kernels already multiplied by ``mean_factor``
    ('mean'): 'none' reshapes, 'sum' and 'mean' sum (torch's NaN for the 'mean' of ``count == 0``
    rows); then the loss dtype."""
    if reduction == "none":
        loss = loss.reshape(out_shape)
    else:
        loss = loss.sum()
        if reduction == "mean" and count == 0:
            loss = _empty_mean(loss, mean_factor)
    return loss if loss.dtype == dtype else loss.to(dtype)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
):
    """Fused ``torch.nn.functional.cross_entropy`` (log-softmax + NLL in one pass).

    Same arguments and results as torch for class-index targets with input ``(N, C)``,
    ``(N, C, d1, ..., dk)`` or ``(C,)``, and class-probability targets of input's shape, plus:

    - ``z_loss``: adds ``z_loss * w[y] * lse**2`` to each non-ignored row (PaLM's z-loss).
    - ``softcap``: logits become ``softcap * tanh(x / softcap)`` first (Gemma 2).
    - ``return_lse``: also return the per-row logsumexp (float32, no gradient).
    - ``inplace_backward``: the gradient is stored in ``input``'s memory during the forward;
      ``input`` must not be used afterwards (the logits of an ``lm_head``).
    - ``backend``: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    The gradient is computed in the forward when ``input`` requires grad, so backward is a scale
    by the upstream gradient (skipped when it is 1). Loss is returned in input's dtype; all math
    is float32 (float64 for float64 input).
    """
    prob = C.cross_entropy_args(input, target, weight, ignore_index, reduction, label_smoothing,
                                z_loss, softcap)
    needs_grad = input.requires_grad and torch.is_grad_enabled()
    if inplace_backward and needs_grad:
        C.check_inplace_backward(input)
    name = _fused_backend("cross_entropy", backend, input)
    if name is None:
        # Forward-mode AD and torch.func transforms need derivative rules the fused kernels do not
        # have: the reference computes the same loss with plain torch ops, which support them all.
        return reference.cross_entropy(input, target, weight, ignore_index, reduction,
                                       label_smoothing, z_loss=z_loss, softcap=softcap,
                                       return_lse=return_lse, inplace_backward=inplace_backward)
    if prob and target.requires_grad:
        raise NotImplementedError("fusedloss.cross_entropy: a gradient with respect to "
                                  "probability targets is not supported; detach target or use "
                                  "backend='reference'")
    out_dtype = C.cross_entropy_dtype(input, target, prob)
    cap = 0.0 if softcap is None else float(softcap)
    if _eager_c_op(name):
        # The whole call in csrc/autograd/cross_entropy.cpp; the rest of this function is the same
        # computation from Python pieces, for torch.compile and the triton backend.
        op = _c_op("cross_entropy_loss_inplace" if needs_grad and inplace_backward
                   else "cross_entropy_loss")
        loss, lse = op(input, target, weight, ignore_index, _REDUCTIONS[reduction],
                       float(label_smoothing), float(z_loss), cap, out_dtype)
        return (loss, lse) if return_lse else loss

    unbatched = input.dim() == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    n, c = input.shape[0], input.shape[1]
    spatial = tuple(input.shape[2:])
    d = _numel(spatial)
    x = input.reshape(n, c, d)
    acc = C.acc_dtype(input.dtype)
    if prob:
        tgt = target.to(input.dtype).reshape(n, c, d)
    else:
        tgt = target.reshape(n, d)
        if tgt.dtype != torch.int64 or not tgt.is_contiguous():  # uint8 (torch accepts Byte)
            tgt = tgt.to(torch.int64, memory_format=torch.contiguous_format)
    w = None if weight is None else weight.to(acc).contiguous()

    mean_factor = None
    if reduction == "mean":
        mean_factor = _mean_factor(tgt, w, ignore_index, n * d, c, prob, acc, name)

    args = (tgt, w, mean_factor, ignore_index, float(label_smoothing), float(z_loss), cap, name)
    if needs_grad and inplace_backward:
        loss, lse = _ce_ops.CrossEntropyInplace.apply(x, *args)
    elif torch.compiler.is_compiling():
        loss, lse, _ = _ce_ops.cross_entropy_fwd(x, *args[:-1], needs_grad, name)
    elif needs_grad:
        loss, lse = _ce_ops.CrossEntropyEager.apply(x, *args)
    else:
        loss, lse, _ = _backend.kernels("cross_entropy", name).cross_entropy_fwd(
            x, *args[:-1], False)

    out_shape = () if unbatched else (n,) + spatial
    loss = _reduce_rows(loss, reduction, out_shape, mean_factor, n * d, out_dtype)
    if return_lse:
        return loss, lse.reshape(out_shape)
    return loss


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` without ever holding
    more than ``chunk_size x V`` logits (the ``lm_head`` + loss of an LLM in one op).

    ``input`` is ``(..., H)``, ``linear_weight`` ``(V, H)``, ``target`` ``(...)`` class indices.
    Tokens whose target is ``ignore_index`` are dropped before the matmul. ``chunk_size=None``
    picks the number of tokens per chunk so that a chunk of logits takes about as much memory as
    ``linear_weight`` (at least 1 token); any positive value works. Gradients flow to ``input``,
    ``linear_weight`` and ``linear_bias``; half-precision weight gradients accumulate in float32
    and are cast once at the end. Other arguments as in :func:`cross_entropy`.
    """
    prob = C.linear_cross_entropy_args(input, linear_weight, target, linear_bias, weight,
                                       reduction, chunk_size)
    # cross_entropy's own arguments, checked on an empty stand-in of the logits
    C.cross_entropy_args(input.new_empty(0, linear_weight.shape[0]),
                         torch.empty(0, dtype=torch.int64, device=input.device), weight,
                         ignore_index, reduction, label_smoothing, z_loss, softcap)
    name = _fused_backend("linear_cross_entropy", backend, input, linear_weight, linear_bias)
    if name is None:
        return reference.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, chunk_size=chunk_size)
    if prob:
        raise NotImplementedError("fusedloss.linear_cross_entropy: class-probability targets "
                                  "need the full logits; use backend='reference' or "
                                  "cross_entropy on the logits")
    batch_shape = tuple(input.shape[:-1])
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1)
    n, v = x.shape[0], linear_weight.shape[0]
    acc = C.acc_dtype(input.dtype)
    w = None if weight is None else weight.to(acc).contiguous()
    if chunk_size is None:
        budget = linear_weight.numel() * linear_weight.element_size()
        chunk_size = max(1, budget // max(1, v * input.element_size()))
    mean_factor = (_mean_factor(t, w, ignore_index, n, v, False, acc, name)
                   if reduction == "mean" else None)
    needs_grad = torch.is_grad_enabled() and any(
        a is not None and a.requires_grad for a in (input, linear_weight, linear_bias))
    # 'none' gets a different upstream gradient per token: its backward recomputes.
    compute_grad = needs_grad and reduction != "none"
    loss, _, _, _, _ = _lce_ops.linear_cross_entropy_fwd(
        x, linear_weight, linear_bias, t, w, mean_factor, ignore_index, float(label_smoothing),
        float(z_loss), 0.0 if softcap is None else float(softcap), int(chunk_size), compute_grad,
        name)
    return _reduce_rows(loss, reduction, batch_shape, mean_factor, n, input.dtype)


def _empty_mean(total: Tensor, mean_factor: Tensor) -> Tensor:
    """torch's NaN for the 'mean' of an empty batch (0 * 1/0), with the gradients of the empty
    sum (zeros, as torch's: a weight gradient must not become NaN)."""
    return total + (total * mean_factor).detach()


def _forward_ad_active(*tensors: Optional[Tensor]) -> bool:
    """Forward-mode AD (a dual tensor) or a torch.func transform (jvp, vmap, grad) is active."""
    # Not peek_interpreter_stack(): dynamo keeps an interpreter on that stack while it traces, so
    # under torch.compile every loss took the reference (a compiled graph of plain torch ops).
    if torch._C._are_functorch_transforms_active():
        return True
    if _forward_ad._current_level < 0:  # no dual level entered: the common case, one compare
        return False
    return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _mean_factor(target: Tensor, weight: Optional[Tensor], ignore_index: int, rows: int,
                 n_classes: int, prob: bool, acc: torch.dtype, backend: str) -> Tensor:
    """The 'mean' factor, 1 / (the 'mean' denominator), as a 0-d tensor computed on the device
    (no host sync); the kernels multiply every row's loss and gradient by it:
    the row count for probability targets, else the sum of w[y] over non-ignored rows (0 when
    all are ignored, giving torch's NaN)."""
    if prob:
        return torch.full((), 1.0 / rows if rows else float("inf"), dtype=acc,
                          device=target.device)
    if _eager_c_op(backend):
        # fusedloss._C: one call instead of three small ops (it runs on every 'mean' loss)
        return _c_op("cross_entropy_mean_factor")(target, weight, ignore_index, acc)
    valid = target != ignore_index
    if weight is None:
        total = valid.sum(dtype=acc)
    else:
        # Clamped only so this gather stays in bounds; the kernel rejects bad targets.
        wy = weight.gather(0, target.clamp(0, max(n_classes - 1, 0)).reshape(-1))
        total = torch.where(valid.reshape(-1), wy, 0).sum(dtype=acc)
    return total.reciprocal()


def total_variation(
    input: Tensor,
    weight: Optional[Tensor] = None,
    *,
    norm: str = "l1",
    eps: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Total variation of images ``input`` ``(..., H, W)`` in one pass (docs/DESIGN.md section 3).

    Vertical differences ``x[..., i+1, j] - x[..., i, j]`` and horizontal ones
    ``x[..., i, j+1] - x[..., i, j]``; ``norm="l1"`` sums their absolute values (anisotropic),
    ``"l2_squared"`` their squares, ``"isotropic"`` the per-pixel ``sqrt(dv**2 + dh**2 + eps)``
    (a difference past the last row or column counts as 0; gradient 0 where the norm is 0).
    ``weight`` (broadcastable to the input, e.g. ``(N, 1, H, W)`` for ``(N, C, H, W)``, read by
    stride) multiplies the terms that start at each pixel (BasicSR's convention).
    ``reduction``: ``'none'`` gives one value per image (``input.shape[:-2]``), ``'sum'``,
    ``'mean'`` the sum over ``input.numel()``. Any strides (channels_last included); float32,
    bfloat16, float16 accumulate in float32, float64 in float64. The gradient is computed in the
    forward when ``input`` requires grad; a gradient for ``weight`` is not supported (use
    ``backend="reference"``).
    """
    eps = C.total_variation_args(input, weight, norm, eps, reduction)
    name = _fused_backend("tv", backend, input, weight)
    if name is None:
        return reference.total_variation(input, weight, norm=norm, eps=eps, reduction=reduction)
    grad_mode = torch.is_grad_enabled()
    if weight is not None and weight.requires_grad and grad_mode:
        raise NotImplementedError("fusedloss.total_variation: a gradient with respect to weight "
                                  "is not supported; detach weight or use backend='reference'")
    numel = input.numel()
    scale = 1.0 / numel if reduction == "mean" and numel else 1.0
    loss, _ = _tv_ops.tv_fwd(input, weight, _tv_ops.NORMS[norm], eps, scale,
                             input.requires_grad and grad_mode, name)
    if reduction != "none":
        loss = loss.sum()
        if reduction == "mean" and numel == 0:
            loss = loss / 0.0  # the NaN of an empty mean, as the reference's sum / numel
    return loss if loss.dtype == input.dtype else loss.to(input.dtype)
# Per-element losses (the elementwise skeleton) -----------------------------------------------

_EW_MAX_DIMS = 8  # the kernels' dimension cap (csrc/cpu/elementwise.h); more: the reference


def _ew_reference(input: Tensor, *others: Optional[Tensor]) -> bool:
    """A per-element loss call the reference runs although a fused backend was chosen: a gradient
    wanted for target, weight or pos_weight (torch gives one; the fused kernels compute the
    input's only), or an input of more than _EW_MAX_DIMS dimensions."""
    if input.dim() > _EW_MAX_DIMS:
        return True
    if not torch.is_grad_enabled():
        return False
    return any(o is not None and o.requires_grad for o in others)


def _ew_loss_scale(input: Tensor, reduction: int) -> float:
    """The 'mean' factor 1/numel, known on the host (inf for an empty input: torch's NaN)."""
    if reduction != 1:
        return 1.0
    n = input.numel()
    return 1.0 / n if n else float("inf")


def _ew_run(name: str, backend: str, input: Tensor, custom_op, args: tuple, reduction: int):
    """The op of a per-element loss (``kernel(input, *args, compute_grad)`` on the backend):
    the custom op under torch.compile, else the kernel directly (with the eager autograd when the
    input needs a gradient). Returns the loss in the input's dtype."""
    needs_grad = input.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        loss, _ = custom_op(input, *args, needs_grad, backend)
    else:
        kernel = getattr(_backend.kernels(name, backend), f"{name}_fwd")
        if needs_grad:
            loss = _EwEager.apply(input, name, kernel, backend, *args)
        else:
            loss, _ = kernel(input, *args, False)
    return loss if loss.dtype == input.dtype else loss.to(input.dtype)


def sigmoid_focal_loss(
    input: Tensor,
    target: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    weight: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Fused ``torchvision.ops.sigmoid_focal_loss`` (soft targets allowed; ``alpha < 0`` disables
    the alpha term; default reduction 'none'; 'mean' over all elements), plus an optional
    ``weight`` broadcastable to the input that multiplies each element's loss (read by stride,
    never expanded).

    One pass over the input in log space (``q**gamma = exp(gamma * log q)``): no finite logit
    gives inf or NaN in the loss or the gradient, in any dtype, for any ``gamma >= 0``. The
    gradient is computed in the forward when ``input`` requires grad. A gradient for ``target``
    or ``weight`` (when they require grad) comes from the reference, which computes the call.
    """
    alpha, gamma = C.sigmoid_focal_loss_args(input, target, alpha, gamma, reduction, weight)
    name = _fused_backend("sigmoid_focal", backend, input, target, weight)
    if name is None or _ew_reference(input, target, weight):
        return reference.sigmoid_focal_loss(input, target, alpha, gamma, reduction, weight=weight)
    red = _REDUCTIONS[reduction]
    args = (target, weight, alpha, gamma, _ew_loss_scale(input, red), red)
    return _ew_run("sigmoid_focal", name, input, _sigmoid_focal_ops.sigmoid_focal_fwd, args, red)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    pos_weight: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Fused ``torch.nn.functional.binary_cross_entropy_with_logits``: the same arguments and
    results (the ValueError on a size mismatch, ``weight`` and ``pos_weight`` broadcast, 'mean'
    over all elements), one pass over the input with the gradient computed in the forward;
    ``weight`` and ``pos_weight`` are read by stride, never expanded. A gradient for ``target``,
    ``weight`` or ``pos_weight`` (when they require grad) comes from the reference, which computes
    the call."""
    C.binary_cross_entropy_with_logits_args(input, target, weight, reduction, pos_weight)
    name = _fused_backend("bce", backend, input, target, weight, pos_weight)
    if name is None or _ew_reference(input, target, weight, pos_weight):
        return reference.binary_cross_entropy_with_logits(input, target, weight, reduction,
                                                          pos_weight)
    red = _REDUCTIONS[reduction]
    args = (target, weight, pos_weight, _ew_loss_scale(input, red), red)
    return _ew_run("bce", name, input, _bce_ops.bce_fwd, args, red)
def softmax_focal_loss(
    input: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> Tensor:
    """Multi-class (softmax) focal loss, ``-w[y] (1 - p_y)**gamma log p_y`` per element, fused:
    one online-softmax pass and the gradient pass, no one-hot, no saved softmax.

    ``input`` ``(N, C)`` or ``(N, C, d1, ..., dk)`` with any strides (channels_last too);
    ``target`` int64 ``(N, d1, ..., dk)``; ``weight`` ``(C,)`` per-class weights (the per-class
    alpha); ``ignore_index`` positions give 0; ``'mean'`` divides by the sum of ``w[y]`` over
    non-ignored positions, as ``cross_entropy`` (which ``gamma=0`` equals). The gradient is
    computed in the forward when ``input`` requires grad; 'mean' and 'sum' keep no per-position
    loss. ``backend``: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.
    """
    gamma = C.softmax_focal_loss_args(input, target, gamma, weight, ignore_index, reduction)
    name = _fused_backend("softmax_focal", backend, input)
    if name is None:
        return reference.softmax_focal_loss(input, target, gamma, weight, ignore_index,
                                            reduction)
    needs_grad = input.requires_grad and torch.is_grad_enabled()
    n, c = input.shape[0], input.shape[1]
    spatial = tuple(input.shape[2:])
    d = _numel(spatial)
    x = input.reshape(n, c, d)
    tgt = target.reshape(n, d)
    if not tgt.is_contiguous():
        tgt = tgt.contiguous()
    acc = C.acc_dtype(input.dtype)
    w = None if weight is None else weight.to(acc).contiguous()
    mean_factor = None
    if reduction == "mean":
        mean_factor = _mean_factor(tgt, w, ignore_index, n * d, c, False, acc, name)
    reduce = reduction != "none"
    args = (tgt, w, mean_factor, gamma, int(ignore_index), reduce)
    if needs_grad or torch.compiler.is_compiling():
        loss, _ = _softmax_focal_ops.softmax_focal_fwd(x, *args, needs_grad, name)
    else:
        loss, _ = _backend.kernels("softmax_focal", name).softmax_focal_fwd(x, *args, False)
    return _reduce_rows(loss, reduction, (n,) + spatial, mean_factor, n * d, input.dtype)


# Dice / Tversky / Dice+CE: per-(n, c) sums from the device op, the loss in plain torch ------------

__all__ += ["dice_loss", "tversky_loss", "dice_ce_loss"]


def _dice_sums(name: str, input: Tensor, target: Tensor, ignore_index: int, sigmoid: bool,
               squared_pred: bool, with_ce: bool, with_smoothing: bool) -> Tensor:
    """The (N, C, 5) sums (I, P, G, NLL, SM; docs/KERNELS.md, "dice") of the canonical (N, C, D)
    view of the logits (a view whenever the spatial dims merge: channels_last stays channels_last,
    class stride 1, nothing copied)."""
    n, c = input.shape[0], input.shape[1]
    d = _numel(input.shape[2:])
    x = input.reshape(n, c, d)
    if sigmoid:
        tgt = target.reshape(n, c, d)
        if tgt.dtype != input.dtype:
            tgt = tgt.to(input.dtype)
    else:
        tgt = target.reshape(n, d)
    args = (tgt, int(ignore_index), sigmoid, squared_pred, with_ce, with_smoothing)
    if torch.compiler.is_compiling():  # the custom ops, traced
        sums, _ = _dice_ops.dice_sums(x, *args, name)
    elif input.requires_grad and torch.is_grad_enabled():  # eager: no custom-op dispatch
        sums = _dice_ops.DiceSumsEager.apply(x, *args, name)
    else:  # an eval loss: the kernel alone
        sums, _ = _backend.kernels("dice", name).dice_fwd(x, *args)
    return sums


def _dice_epilogue(sums: Tensor, weight: Optional[Tensor], include_background: bool, batch: bool,
                   smooth_nr: float, smooth_dr: float, tversky: Optional[tuple], reduction: str,
                   ce: Optional[tuple], dtype: torch.dtype) -> Tensor:
    """The loss of every Dice-family function from the (N, C, 5) sums, in plain torch on those
    small tensors (its autograd gives the sums' upstream gradient; no host sync).

    ``tversky``: None (Dice) or (alpha, beta). ``ce``: None or (lambda_dice, lambda_ce,
    ce_weight, label_smoothing): then ``lambda_dice * dice + lambda_ce * cross_entropy``, the
    cross-entropy from the class sums (torch's weighted 'mean' and label-smoothing formula)::

        'mean' = [(1 - ls) sum_c w_c NLL_c + (ls / C) sum_c w_c SM_c] / sum_c w_c G_c
    """
    acc = sums.dtype
    total = sums.sum(0) if batch or ce is not None else None  # (C, 5): batch sums first
    s = total if batch else sums
    inter, pred, ground = s[..., 0], s[..., 1], s[..., 2]
    if tversky is None:
        f = 1.0 - (2.0 * inter + smooth_nr) / (pred + ground + smooth_dr)
    else:
        alpha, beta = tversky
        f = 1.0 - (inter + smooth_nr) / (inter + alpha * (pred - inter)
                                         + beta * (ground - inter) + smooth_dr)
    if weight is not None:
        f = f * weight.to(acc)
    if not include_background:
        f = f[..., 1:]
    loss = f if reduction == "none" else f.mean() if reduction == "mean" else f.sum()
    if ce is not None:
        lambda_dice, lambda_ce, ce_weight, label_smoothing = ce
        nll, count, smooth = total[:, 3], total[:, 2], total[:, 4]
        if ce_weight is not None:
            w = ce_weight.to(acc)
            nll, count, smooth = nll * w, count * w, smooth * w
        ce_loss = nll.sum()
        if label_smoothing > 0:
            ce_loss = ((1.0 - label_smoothing) * ce_loss
                       + (label_smoothing / sums.shape[1]) * smooth.sum())
        if reduction == "mean":
            ce_loss = ce_loss / count.sum()  # 0/0 = NaN when every position is ignored (torch)
        loss = lambda_dice * loss + lambda_ce * ce_loss
    return loss if loss.dtype == dtype else loss.to(dtype)


def _dice_reference(name: Optional[str], sigmoid: bool, target: Tensor) -> bool:
    """The reference runs the call: no fused backend, or (sigmoid mode) a target that wants a
    gradient (the fused kernels give the input's only)."""
    return name is None or (sigmoid and target.requires_grad and torch.is_grad_enabled())


def dice_loss(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    include_background: bool = True,
    squared_pred: bool = False,
    batch: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    activation: str = "softmax",
    backend: str = "auto",
) -> Tensor:
    """Dice loss from logits ``(N, C, d1, ..., dk)`` and int64 class indices ``(N, d1, ..., dk)``
    without a one-hot tensor or a saved softmax: MONAI's ``DiceLoss(softmax=True,
    to_onehot_y=True, ...)`` numbers (``fusedloss.reference.dice_loss`` states the formula).

    Per ``(n, c)`` (per ``c`` with ``batch``), over positions whose target is not
    ``ignore_index``: ``1 - (2 I + smooth_nr) / (P + G + smooth_dr)``. ``weight`` ``(C,)`` by
    class id (``weight[0]`` unused without the background; MONAI takes ``C - 1`` values there);
    ``reduction='none'``: ``(N, C')`` or ``(C',)`` with ``batch``. ``activation="sigmoid"``:
    multi-label, float targets of the input's shape (converted to the input's dtype). Any strides
    (channels_last read in place). One read of the logits in the forward (per-(n, c) sums and the
    per-position logsumexp), one in the backward.
    """
    smooth_nr, smooth_dr, sigmoid = C.dice_loss_args(
        input, target, weight, ignore_index, reduction, include_background, squared_pred, batch,
        smooth_nr, smooth_dr, activation)
    name = _fused_backend("dice", backend, input, target, weight)
    if _dice_reference(name, sigmoid, target):
        return reference.dice_loss(
            input, target, weight, ignore_index, reduction, include_background=include_background,
            squared_pred=squared_pred, batch=batch, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
            activation=activation)
    sums = _dice_sums(name, input, target, ignore_index, sigmoid, squared_pred, False, False)
    return _dice_epilogue(sums, weight, include_background, batch, smooth_nr, smooth_dr, None,
                          reduction, None, input.dtype)


def tversky_loss(
    input: Tensor,
    target: Tensor,
    alpha: float = 0.5,
    beta: float = 0.5,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    include_background: bool = True,
    batch: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    activation: str = "softmax",
    backend: str = "auto",
) -> Tensor:
    """Tversky loss on the Dice kernels, MONAI's ``TverskyLoss(softmax=True, to_onehot_y=True,
    ...)``: ``1 - (I + smooth_nr) / (I + alpha (P - I) + beta (G - I) + smooth_dr)`` per
    ``(n, c)`` (false positives weighted by ``alpha``, false negatives by ``beta``; 0.5 and 0.5
    is Dice). Other arguments as :func:`dice_loss` (``weight`` is fusedloss's addition)."""
    alpha, beta, smooth_nr, smooth_dr, sigmoid = C.tversky_loss_args(
        input, target, alpha, beta, weight, ignore_index, reduction, include_background, batch,
        smooth_nr, smooth_dr, activation)
    name = _fused_backend("dice", backend, input, target, weight)
    if _dice_reference(name, sigmoid, target):
        return reference.tversky_loss(
            input, target, alpha, beta, weight, ignore_index, reduction,
            include_background=include_background, batch=batch, smooth_nr=smooth_nr,
            smooth_dr=smooth_dr, activation=activation)
    sums = _dice_sums(name, input, target, ignore_index, sigmoid, False, False, False)
    return _dice_epilogue(sums, weight, include_background, batch, smooth_nr, smooth_dr,
                          (alpha, beta), reduction, None, input.dtype)


def dice_ce_loss(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    include_background: bool = True,
    squared_pred: bool = False,
    batch: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    activation: str = "softmax",
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    ce_weight: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """``lambda_dice * dice_loss(...) + lambda_ce * cross_entropy(input, target,
    weight=ce_weight, ignore_index, label_smoothing)`` with one read of the logits for both terms
    (MONAI's ``DiceCELoss(softmax=True, to_onehot_y=True, ...)``: pass its ``weight`` as both
    ``weight`` and ``ce_weight``). ``reduction`` 'mean' or 'sum'; softmax only."""
    smooth_nr, smooth_dr, lambda_dice, lambda_ce, label_smoothing = C.dice_ce_loss_args(
        input, target, weight, ignore_index, reduction, include_background, squared_pred, batch,
        smooth_nr, smooth_dr, activation, lambda_dice, lambda_ce, ce_weight, label_smoothing)
    name = _fused_backend("dice", backend, input, target, weight, ce_weight)
    if name is None:
        return reference.dice_ce_loss(
            input, target, weight, ignore_index, reduction, include_background=include_background,
            squared_pred=squared_pred, batch=batch, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
            activation=activation, lambda_dice=lambda_dice, lambda_ce=lambda_ce,
            ce_weight=ce_weight, label_smoothing=label_smoothing)
    sums = _dice_sums(name, input, target, ignore_index, False, squared_pred, True,
                      label_smoothing > 0)
    return _dice_epilogue(sums, weight, include_background, batch, smooth_nr, smooth_dr, None,
                          reduction, (lambda_dice, lambda_ce, ce_weight, label_smoothing),
                          input.dtype)
