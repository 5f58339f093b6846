"""The executable specification of every fusedloss loss.

Slow, plainly written PyTorch: torch ops only, gradients from autograd, no custom kernels. Every
fused backend (Triton, CUDA, CPU) must agree with these functions; the tests tie these functions
to torch (``F.cross_entropy``, ``F.linear_cross_entropy``, ``F.binary_cross_entropy_with_logits``)
and to the peers' published formulas.

Numerics: half-precision (float16, bfloat16) and float32 inputs are computed in float32, float64
inputs in float64; the loss is returned in the input's dtype, as torch does. Gradients reach the
input (and ``weight`` etc. where they require grad) through autograd; every formula is written so
that autograd gives finite gradients for finite inputs (``torch.where`` guards instead of
``0 * inf``).

Argument checks live in ``fusedloss._checks``, shared with the fast path (``fusedloss.functional``),
so that both raise the same errors; this module imports nothing else from fusedloss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _checks as C

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "binary_cross_entropy_with_logits",
    "total_variation",
]

# ---------------------------------------------------------------------------------------------
# Small shared pieces
# ---------------------------------------------------------------------------------------------


def _reduce(loss, reduction, denominator=None):
    """'none' -> loss; 'sum' -> loss.sum(); 'mean' -> loss.sum() / denominator (default numel)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if denominator is None:
        denominator = loss.numel()
    return total / denominator


def _to_rows(input, target, probs):
    """Move the class dimension last and flatten: (N, C, d...) -> (M, C) rows.

    Returns (rows, row_targets, out_shape) where out_shape is the per-element loss shape:
    (N, d1, ..., dk), or () for an unbatched input (C,).
    """
    num_classes = input.shape[-1] if input.dim() == 1 else input.shape[1]
    if input.dim() == 1:
        rows = input.reshape(1, num_classes)
        tgt = target.reshape(1, num_classes) if probs else target.reshape(1)
        return rows, tgt, ()
    rows = input.movedim(1, -1).reshape(-1, num_classes)
    tgt = target.movedim(1, -1).reshape(-1, num_classes) if probs else target.reshape(-1)
    out_shape = (input.shape[0],) + tuple(input.shape[2:])
    return rows, tgt, out_shape


def _check_target_values(target, valid, num_classes):
    """Out-of-range class indices: a clear IndexError on CPU (gather asserts on other devices)."""
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = valid & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"Target {value} is out of bounds for {num_classes} classes.")


def _index_rows(rows, target, weight, ignore_index):
    """For class-index rows: (logp (M, C), logp_y (M,), valid (M,), w_y (M,))."""
    num_classes = rows.shape[-1]
    valid = target != ignore_index
    _check_target_values(target, valid, num_classes)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    logp = torch.log_softmax(rows, dim=-1)
    logp_y = logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    if weight is None:
        w_y = torch.ones_like(logp_y)
    else:
        w_y = weight[safe_target]
    return logp, logp_y, valid, w_y


# ---------------------------------------------------------------------------------------------
# cross_entropy
# ---------------------------------------------------------------------------------------------


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, z_loss=0.0, softcap=None, return_lse=False,
                  inplace_backward=False):
    r"""Cross-entropy over class dimension 1: ``torch.nn.functional.cross_entropy`` plus extras.

    Let ``x`` be the logits of one row (the class vector at one position), ``C`` the number of
    classes, ``x <- softcap * tanh(x / softcap)`` when ``softcap`` is given,
    ``lse = logsumexp(x)``, ``logp = x - lse``, ``w`` the class weights (all 1 when ``weight`` is
    None), ``ls = label_smoothing``.

    Class-index targets ``y`` (int64; rows with ``y == ignore_index`` are ignored)::

        loss_row = (1 - ls) * w[y] * (-logp[y]) + (ls / C) * sum_c w[c] * (-logp[c])
                   + z_loss * w[y] * lse**2                  (0 for ignored rows)
        'mean' = sum(loss_row) / sum(w[y] over non-ignored rows)    (NaN when all are ignored)

    Class-probability targets ``t`` (floating, the input's shape; ignore_index does not apply)::

        t' = t * (1 - ls) + ls / C
        loss_row = -sum_c w[c] * t'[c] * logp[c] + z_loss * lse**2
        'mean' = sum(loss_row) / number of rows  (N * d1 * ... * dk; not the weights)

    'sum' sums the rows; 'none' returns them with shape ``(N, d1, ..., dk)`` (``()`` for an
    unbatched input ``(C,)``).

    ``return_lse=True`` returns ``(loss, lse)``: the per-row logsumexp of the (softcapped) logits
    for every row, ignored ones included, in float32 (float64 for float64 input), with the shape
    of the 'none' loss, detached. ``inplace_backward`` only matters for fused kernels (they may
    write the gradient into ``input``'s memory); the reference accepts and ignores it.

    Gradients into ignored rows are 0, also in the all-ignored 'mean' case whose value is NaN
    (torch gives the same); a non-ignored row whose class weight is 0 in a batch whose weights sum
    to 0 gets a NaN gradient, as in torch.
    """
    probs = C.cross_entropy_args(input, target, weight, ignore_index, reduction,
                                      label_smoothing, z_loss, softcap)
    C.check_bool(return_lse, "return_lse")
    C.check_bool(inplace_backward, "inplace_backward")
    if inplace_backward and input.requires_grad and torch.is_grad_enabled():
        C.check_inplace_backward(input)
    label_smoothing = float(label_smoothing)
    z_loss = float(z_loss)

    if target.dtype == torch.uint8:
        target = target.long()
    acc = C.acc_dtype(input.dtype)
    rows, tgt, out_shape = _to_rows(input, target, probs)
    rows = rows.to(acc)
    num_classes = rows.shape[-1]
    if softcap is not None:
        rows = softcap * torch.tanh(rows / softcap)
    w = None if weight is None else weight.to(acc)
    lse = torch.logsumexp(rows, dim=-1)

    if probs:
        logp = torch.log_softmax(rows, dim=-1)
        t = tgt.to(acc)
        if label_smoothing > 0:
            t = t * (1.0 - label_smoothing) + label_smoothing / num_classes
        wt = t if w is None else t * w
        loss_rows = -(wt * logp).sum(dim=-1)
        if z_loss > 0:
            loss_rows = loss_rows + z_loss * lse * lse
        denominator = loss_rows.shape[0]
    else:
        logp, logp_y, valid, w_y = _index_rows(rows, tgt, w, ignore_index)
        loss_rows = w_y * (-logp_y)
        if label_smoothing > 0:
            smooth = -(logp if w is None else logp * w).sum(dim=-1)
            loss_rows = ((1.0 - label_smoothing) * loss_rows
                         + (label_smoothing / num_classes) * smooth)
        if z_loss > 0:
            loss_rows = loss_rows + z_loss * w_y * lse * lse
        zero = torch.zeros_like(loss_rows)
        loss_rows = torch.where(valid, loss_rows, zero)
        denominator = torch.where(valid, w_y, zero).sum()

    loss = _reduce(loss_rows.reshape(out_shape), reduction, denominator)
    loss = loss.to(C.cross_entropy_dtype(input, target, probs))
    if return_lse:
        return loss, lse.detach().reshape(out_shape)
    return loss


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy
# ---------------------------------------------------------------------------------------------


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                         softcap=None, chunk_size=None):
    r"""``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` with the class
    dimension last.

    ``input`` ``(..., H)``, ``linear_weight`` ``(V, H)``, ``linear_bias`` ``(V,)`` or None.
    ``target``: int64 class indices of shape ``input.shape[:-1]`` (``ignore_index`` applies), or
    floating class probabilities of shape ``(*input.shape[:-1], V)``. The logits are computed in
    float32 (float64 for float64 input); 'none' returns shape ``input.shape[:-1]`` (the target's
    shape for class indices). ``weight``, ``reduction``, ``ignore_index``, ``label_smoothing``,
    ``z_loss`` and ``softcap`` mean what they mean in :func:`cross_entropy`. ``chunk_size`` (how
    many rows of logits a fused kernel may hold at once) is accepted and ignored here.
    """
    C.linear_cross_entropy_args(input, linear_weight, target, linear_bias, weight,
                                     reduction, chunk_size)
    vocab = linear_weight.shape[0]
    batch_shape = tuple(input.shape[:-1])
    # the remaining arguments are checked by cross_entropy

    acc = C.acc_dtype(input.dtype)
    logits = input.to(acc) @ linear_weight.to(acc).T
    if linear_bias is not None:
        logits = logits + linear_bias.to(acc)
    if input.dim() == 1:
        rows, tgt = logits, target
    else:
        rows = logits.reshape(-1, vocab)
        tgt = target.reshape(-1, vocab) if target.dtype.is_floating_point else target.reshape(-1)
    loss = cross_entropy(rows, tgt, weight, ignore_index, reduction, label_smoothing,
                         z_loss=z_loss, softcap=softcap)
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    return loss.to(input.dtype)


# ---------------------------------------------------------------------------------------------
# sigmoid_focal_loss
# ---------------------------------------------------------------------------------------------


def sigmoid_focal_loss(input, target, alpha=0.25, gamma=2.0, reduction="none", *, weight=None):
    r"""torchvision's ``sigmoid_focal_loss`` (soft targets allowed) with an optional ``weight``.

    Per element, with logit ``x``, target ``t`` in [0, 1], ``p = sigmoid(x)``::

        ce   = BCEWithLogits(x, t) = t * softplus(-x) + (1 - t) * softplus(x)
        p_t  = p * t + (1 - p) * (1 - t);   q = 1 - p_t = t * sigmoid(-x) + (1 - t) * sigmoid(x)
        loss = q**gamma * ce
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))      if alpha >= 0 (alpha < 0: no term)
        loss = loss * weight                                    if weight is given (broadcast)

    Computed in log space so that no finite logit gives inf or NaN in the value or the gradient:
    softplus(-x) = -logsigmoid(x), and
    ``log q = logaddexp(log t + logsigmoid(-x), log(1 - t) + logsigmoid(x))`` (for a hard target
    this is exactly ``logsigmoid(-z)`` with ``z = (2t - 1) x``), ``q**gamma = exp(gamma * log q)``;
    ``gamma = 0`` gives the factor 1 exactly. Reductions: 'none' (default), 'mean' over all
    elements, 'sum'. ``target`` must have the input's shape and a floating dtype; target values
    are not range-checked (outside [0, 1] the result is not torchvision's).
    """
    alpha, gamma = C.sigmoid_focal_loss_args(input, target, alpha, gamma, reduction, weight)

    acc = C.acc_dtype(input.dtype)
    x = input.to(acc)
    t = target.to(acc)
    log_p = F.logsigmoid(x)         # log sigmoid(x)
    log_1mp = F.logsigmoid(-x)      # log (1 - sigmoid(x))
    ce = -(t * log_p + (1.0 - t) * log_1mp)
    loss = ce
    if gamma != 0.0:
        neg_inf = torch.full_like(t, -math.inf)
        pos = t > 0
        below_one = t < 1
        log_t = torch.where(pos, torch.log(torch.where(pos, t, torch.ones_like(t))), neg_inf)
        log_1mt = torch.where(
            below_one, torch.log1p(-torch.where(below_one, t, torch.zeros_like(t))), neg_inf
        )
        log_q = torch.logaddexp(log_t + log_1mp, log_1mt + log_p)
        loss = torch.exp(gamma * log_q) * loss
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    if weight is not None:
        loss = loss * weight.to(acc)
    return _reduce(loss, reduction).to(input.dtype)


# ---------------------------------------------------------------------------------------------
# softmax_focal_loss
# ---------------------------------------------------------------------------------------------


def softmax_focal_loss(input, target, gamma=2.0, weight=None, ignore_index=-100, reduction="mean"):
    r"""Multi-class focal loss over class dimension 1, without a one-hot tensor.

    ``input`` ``(N, C)`` or ``(N, C, d1, ..., dk)``; ``target`` int64 ``(N, d1, ..., dk)``.
    Per element with ``logp = log_softmax(x)``, ``y`` the target class, ``w`` the class weights
    (1 when None) and ``q = 1 - p_y = -expm1(logp[y])`` (stable when p_y is near 1)::

        loss = -w[y] * q**gamma * logp[y]        (0 where y == ignore_index)
        'mean' = sum(loss) / sum(w[y] over non-ignored elements)   (NaN when all are ignored)

    ``gamma = 0`` gives exactly the reference :func:`cross_entropy`. ``q**gamma`` is guarded so
    that ``q = 0`` (p_y == 1) gives a 0 gradient rather than ``inf * 0``.
    """
    gamma = C.softmax_focal_loss_args(input, target, gamma, weight, ignore_index, reduction)

    acc = C.acc_dtype(input.dtype)
    rows, tgt, out_shape = _to_rows(input, target, probs=False)
    rows = rows.to(acc)
    w = None if weight is None else weight.to(acc)
    _, logp_y, valid, w_y = _index_rows(rows, tgt, w, ignore_index)
    loss_rows = w_y * (-logp_y)
    if gamma != 0.0:
        q = -torch.expm1(logp_y)
        nonzero = q > 0
        factor = torch.where(
            nonzero, torch.where(nonzero, q, torch.ones_like(q)) ** gamma, torch.zeros_like(q)
        )
        loss_rows = loss_rows * factor
    zero = torch.zeros_like(loss_rows)
    loss_rows = torch.where(valid, loss_rows, zero)
    denominator = torch.where(valid, w_y, zero).sum()
    return _reduce(loss_rows.reshape(out_shape), reduction, denominator).to(input.dtype)


# ---------------------------------------------------------------------------------------------
# binary_cross_entropy_with_logits
# ---------------------------------------------------------------------------------------------


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean",
                                     pos_weight=None):
    r"""torch's ``binary_cross_entropy_with_logits``.

    Per element with logit ``x``, target ``t`` (soft labels allowed, not range-checked),
    ``pw = pos_weight`` (broadcast against the trailing dimensions, e.g. (C, 1, 1) for
    (B, C, H, W)) and ``w = weight`` (broadcastable to the input)::

        loss = w * [(1 - t) * x - (1 + (pw - 1) * t) * logsigmoid(x)]

    without pos_weight: ``w * [(1 - t) * x - logsigmoid(x)]``. 'mean' divides by the number of
    elements (not by the weights). ValueError when ``target.size() != input.size()``.
    """
    C.binary_cross_entropy_with_logits_args(input, target, weight, reduction, pos_weight)

    acc = C.acc_dtype(input.dtype)
    x = input.to(acc)
    t = target.to(acc)
    log_sig = F.logsigmoid(x)
    if pos_weight is None:
        loss = (1.0 - t) * x - log_sig
    else:
        log_weight = 1.0 + (pos_weight.to(acc) - 1.0) * t
        loss = (1.0 - t) * x - log_weight * log_sig
    if weight is not None:
        loss = loss * weight.to(acc)
    return _reduce(loss, reduction).to(input.dtype)


# ---------------------------------------------------------------------------------------------
# total_variation
# ---------------------------------------------------------------------------------------------


def total_variation(input, weight=None, *, norm="l1", eps=0.0, reduction="mean"):
    r"""Total variation of images ``input`` ``(..., H, W)``.

    ``dv[i, j] = x[i+1, j] - x[i, j]`` (i < H-1), ``dh[i, j] = x[i, j+1] - x[i, j]`` (j < W-1)::

        "l1":         sum_ij w[i, j] * |dv[i, j]|  +  sum_ij w[i, j] * |dh[i, j]|   (anisotropic)
        "l2_squared": sum_ij w[i, j] * dv[i, j]**2 +  sum_ij w[i, j] * dh[i, j]**2
        "isotropic":  sum_ij w[i, j] * sqrt(dv[i, j]**2 + dh[i, j]**2 + eps)
                      over all H x W pixels, a difference past the last row/column counting as 0

    ``weight`` (broadcastable to the input, default 1) multiplies the terms that start at pixel
    (i, j). For "isotropic" the gradient of the per-pixel norm is taken as 0 where the norm is 0;
    ``eps >= 0`` applies to "isotropic" only. ``reduction``: 'none' gives one value per image,
    shape ``input.shape[:-2]``; 'sum'; 'mean' divides the sum by ``input.numel()``.
    """
    eps = C.total_variation_args(input, weight, norm, eps, reduction)

    acc = C.acc_dtype(input.dtype)
    x = input.to(acc)
    w = None if weight is None else weight.to(acc).expand(input.shape)
    dv = x[..., 1:, :] - x[..., :-1, :]       # (..., H-1, W), starts at (i, j)
    dh = x[..., :, 1:] - x[..., :, :-1]       # (..., H, W-1), starts at (i, j)

    if norm in ("l1", "l2_squared"):
        tv_v = dv.abs() if norm == "l1" else dv * dv
        tv_h = dh.abs() if norm == "l1" else dh * dh
        if w is not None:
            tv_v = tv_v * w[..., :-1, :]
            tv_h = tv_h * w[..., :, :-1]
        per_image = tv_v.sum(dim=(-2, -1)) + tv_h.sum(dim=(-2, -1))
    else:
        dv_full = F.pad(dv, (0, 0, 0, 1))     # zero row after the last
        dh_full = F.pad(dh, (0, 1, 0, 0))     # zero column after the last
        nonzero = (dv_full != 0) | (dh_full != 0)
        # sqrt(dv**2 + dh**2) with a 0 gradient at 0 (hypot avoids under/overflow)
        r = torch.where(
            nonzero,
            torch.hypot(torch.where(nonzero, dv_full, torch.ones_like(dv_full)),
                        torch.where(nonzero, dh_full, torch.zeros_like(dh_full))),
            torch.zeros_like(dv_full),
        )
        n = r if eps == 0.0 else torch.hypot(r, torch.full_like(r, math.sqrt(eps)))
        if w is not None:
            n = n * w
        per_image = n.sum(dim=(-2, -1))

    if reduction == "none":
        out = per_image
    elif reduction == "sum":
        out = per_image.sum()
    else:
        out = per_image.sum() / input.numel()
    return out.to(input.dtype)


# ---------------------------------------------------------------------------------------------
# dice_loss, tversky_loss, dice_ce_loss
# ---------------------------------------------------------------------------------------------

__all__ += ["dice_loss", "tversky_loss", "dice_ce_loss"]


def _dice_sums(input, target, ignore_index, sigmoid, squared_pred, batch):
    """(I, P, G), each (N, C) (or (C,) with ``batch``), in the accumulation dtype: the softmax
    (or sigmoid) ``p`` and the one-hot ``g`` of the target, summed over the non-ignored
    positions."""
    acc = C.acc_dtype(input.dtype)
    n, c = input.shape[0], input.shape[1]
    d = math.prod(input.shape[2:])
    x = input.to(acc).reshape(n, c, d)
    if sigmoid:
        p = torch.sigmoid(x)
        g = target.to(acc).reshape(n, c, d)
    else:
        t = target.reshape(n, d)
        valid = t != ignore_index
        _check_target_values(t, valid, c)
        y = torch.where(valid, t, torch.zeros_like(t))
        mask = valid.unsqueeze(1).to(acc)                          # (N, 1, D)
        p = torch.softmax(x, dim=1) * mask
        g = F.one_hot(y, c).movedim(-1, 1).to(acc) * mask         # (N, C, D)
    inter = (p * g).sum(-1)
    pred = (p * p if squared_pred else p).sum(-1)
    ground = (g * g if squared_pred else g).sum(-1)
    if batch:
        inter, pred, ground = inter.sum(0), pred.sum(0), ground.sum(0)
    return inter, pred, ground


def _dice_reduce(f, weight, include_background, reduction):
    """Per-class loss ``f`` (..., C) times ``weight[c]``, class 0 dropped without the
    background, then the reduction over every remaining entry."""
    if weight is not None:
        f = f * weight.to(f.dtype)
    if not include_background:
        f = f[..., 1:]
    if reduction == "mean":
        return f.mean()
    if reduction == "sum":
        return f.sum()
    return f


def _dice(input, target, weight, ignore_index, reduction, include_background, squared_pred,
          batch, smooth_nr, smooth_dr, sigmoid):
    inter, pred, ground = _dice_sums(input, target, ignore_index, sigmoid, squared_pred, batch)
    f = 1.0 - (2.0 * inter + smooth_nr) / (pred + ground + smooth_dr)
    return _dice_reduce(f, weight, include_background, reduction)


def dice_loss(input, target, weight=None, ignore_index=-100, reduction="mean", *,
              include_background=True, squared_pred=False, batch=False, smooth_nr=1e-5,
              smooth_dr=1e-5, activation="softmax"):
    r"""Dice loss from logits ``(N, C, d1, ..., dk)`` (k >= 1) and int64 class indices
    ``(N, d1, ..., dk)``, as MONAI's ``DiceLoss(softmax=True, to_onehot_y=True, ...)`` computes
    it on the target unsqueezed to ``(N, 1, d1, ..., dk)``.

    ``p = softmax(input, dim=1)``, ``g = one_hot(target)``; over the positions whose target is not
    ``ignore_index``, per ``(n, c)`` (per ``c``, summed over n too, with ``batch=True``)::

        I = sum p * g      P = sum p (p**2 with squared_pred)      G = sum g (g**2: the same)
        loss[n, c] = 1 - (2 I + smooth_nr) / (P + G + smooth_dr)

    A class absent from both the target and the prediction gives ``1 - smooth_nr / smooth_dr``.
    ``weight`` ``(C,)`` (>= 0), indexed by class id, multiplies ``loss[:, c]``;
    ``include_background=False`` drops class 0 (and ``weight[0]``, which is unused: MONAI takes
    ``C - 1`` weights there). ``reduction``: ``'none'`` returns ``(N, C')`` (``(C',)`` with
    ``batch``; ``C' = C`` or ``C - 1``), ``'mean'`` its mean, ``'sum'`` its sum.

    ``activation="sigmoid"`` (multi-label): ``p = sigmoid(input)``, ``target`` floating of the
    input's shape (soft labels allowed), ``ignore_index`` unused. Math in float32 (float64 for
    float64 input); the loss in the input's dtype.
    """
    smooth_nr, smooth_dr, sigmoid = C.dice_loss_args(
        input, target, weight, ignore_index, reduction, include_background, squared_pred, batch,
        smooth_nr, smooth_dr, activation)
    loss = _dice(input, target, weight, ignore_index, reduction, include_background,
                 squared_pred, batch, smooth_nr, smooth_dr, sigmoid)
    return loss.to(input.dtype)


def tversky_loss(input, target, alpha=0.5, beta=0.5, weight=None, ignore_index=-100,
                 reduction="mean", *, include_background=True, batch=False, smooth_nr=1e-5,
                 smooth_dr=1e-5, activation="softmax"):
    r"""Tversky loss, MONAI's ``TverskyLoss(softmax=True, to_onehot_y=True, ...)``: with I, P, G
    of :func:`dice_loss` (false positives ``P - I``, false negatives ``G - I``)::

        loss[n, c] = 1 - (I + smooth_nr) / (I + alpha (P - I) + beta (G - I) + smooth_dr)

    ``alpha = beta = 0.5`` is the Dice loss. ``weight`` (not in MONAI's TverskyLoss), the
    reductions, ``batch``, ``include_background``, ``ignore_index`` and ``activation`` as in
    :func:`dice_loss`.
    """
    alpha, beta, smooth_nr, smooth_dr, sigmoid = C.tversky_loss_args(
        input, target, alpha, beta, weight, ignore_index, reduction, include_background, batch,
        smooth_nr, smooth_dr, activation)
    inter, pred, ground = _dice_sums(input, target, ignore_index, sigmoid, False, batch)
    f = 1.0 - (inter + smooth_nr) / (inter + alpha * (pred - inter) + beta * (ground - inter)
                                     + smooth_dr)
    return _dice_reduce(f, weight, include_background, reduction).to(input.dtype)


def dice_ce_loss(input, target, weight=None, ignore_index=-100, reduction="mean", *,
                 include_background=True, squared_pred=False, batch=False, smooth_nr=1e-5,
                 smooth_dr=1e-5, activation="softmax", lambda_dice=1.0, lambda_ce=1.0,
                 ce_weight=None, label_smoothing=0.0):
    r"""Dice + cross-entropy, MONAI's ``DiceCELoss(softmax=True, to_onehot_y=True, ...)``::

        loss = lambda_dice * dice_loss(input, target, weight, ignore_index, reduction, ...)
             + lambda_ce * F.cross_entropy(input, target, weight=ce_weight,
                                           ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, reduction=reduction)

    ``reduction`` 'mean' or 'sum' (the two terms have different shapes: 'none' is a ValueError),
    softmax only (``activation="sigmoid"`` is a ValueError; MONAI uses BCE for one channel).
    MONAI's single ``weight`` is both terms' class weight: pass it as ``weight`` and ``ce_weight``
    (each with C entries; MONAI drops ``weight[0]`` of the Dice term without the background, as
    ``include_background=False`` does here).
    """
    smooth_nr, smooth_dr, lambda_dice, lambda_ce, label_smoothing = C.dice_ce_loss_args(
        input, target, weight, ignore_index, reduction, include_background, squared_pred, batch,
        smooth_nr, smooth_dr, activation, lambda_dice, lambda_ce, ce_weight, label_smoothing)
    acc = C.acc_dtype(input.dtype)
    dice = _dice(input, target, weight, ignore_index, reduction, include_background,
                 squared_pred, batch, smooth_nr, smooth_dr, False)
    ce = F.cross_entropy(input.to(acc), target, None if ce_weight is None else ce_weight.to(acc),
                         ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
    return (lambda_dice * dice + lambda_ce * ce).to(input.dtype)
