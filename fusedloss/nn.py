"""nn.Module wrappers, named and shaped like torch.nn's."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import functional as F

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "SigmoidFocalLoss", "SoftmaxFocalLoss",
           "BCEWithLogitsLoss", "TotalVariationLoss"]


class _CrossEntropyOptions(torch.nn.Module):
    """The cross-entropy arguments both modules keep. ``weight`` is a buffer, as in torch, so it
    follows ``.to()``."""

    def __init__(self, weight: Optional[Tensor], ignore_index: int, reduction: str,
                 label_smoothing: float, z_loss: float, softcap: Optional[float], backend: str):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.backend = backend

    def _extra(self) -> list[str]:
        return []

    def extra_repr(self) -> str:
        extras = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            extras.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            extras.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        return ", ".join(extras + self._extra())


class CrossEntropyLoss(_CrossEntropyOptions):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` (same constructor arguments, same results), with
    fusedloss's extras: ``z_loss``, ``softcap``, ``return_lse``, ``inplace_backward``, ``backend``.
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: Optional[float] = None, return_lse: bool = False,
                 inplace_backward: bool = False, backend: str = "auto"):
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        super().__init__(weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                         backend)
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor):
        return F.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                               self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                               return_lse=self.return_lse, inplace_backward=self.inplace_backward,
                               backend=self.backend)

    def _extra(self) -> list[str]:
        return ["inplace_backward=True"] if self.inplace_backward else []


class LinearCrossEntropyLoss(_CrossEntropyOptions):
    """``lm_head`` + cross-entropy in one op that never materialises the logits.

    Takes the projection weight at call time, so a tied embedding (``emb.weight``) works::

        loss_fn = fusedloss.nn.LinearCrossEntropyLoss(ignore_index=-100)
        loss = loss_fn(hidden, model.lm_head.weight, labels)   # hidden (..., H), labels (...)
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__(weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                         backend)
        self.chunk_size = chunk_size

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None) -> Tensor:
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                      weight=self.weight, reduction=self.reduction,
                                      ignore_index=self.ignore_index,
                                      label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                                      softcap=self.softcap, chunk_size=self.chunk_size,
                                      backend=self.backend)

    def _extra(self) -> list[str]:
        return [] if self.chunk_size is None else [f"chunk_size={self.chunk_size}"]


class TotalVariationLoss(torch.nn.Module):
    """Total variation of images ``(..., H, W)`` (:func:`fusedloss.total_variation`), with an
    optional per-pixel weight map given at call time::

        tv = fusedloss.nn.TotalVariationLoss(norm="l1", reduction="mean")
        loss = tv(image)                # or tv(image, weight_map), weight (N, 1, H, W)
    """

    def __init__(self, norm: str = "l1", eps: float = 0.0, reduction: str = "mean", *,
                 backend: str = "auto"):
        super().__init__()
        self.norm = norm
        self.eps = eps
        self.reduction = reduction
        self.backend = backend

    def forward(self, input: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        return F.total_variation(input, weight, norm=self.norm, eps=self.eps,
                                 reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        extras = [f"norm={self.norm!r}", f"reduction={self.reduction!r}"]
        if self.eps:
            extras.append(f"eps={self.eps}")
        return ", ".join(extras)
class SigmoidFocalLoss(torch.nn.Module):
    """Module form of :func:`fusedloss.sigmoid_focal_loss` (torchvision's function as a module):
    ``alpha``, ``gamma``, ``reduction`` (default 'none', as torchvision) and ``backend`` fixed at
    construction; an optional ``weight`` broadcastable to the input, kept as a buffer."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none", *,
                 weight: Optional[Tensor] = None, backend: str = "auto"):
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction
        self.register_buffer("weight", weight)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.sigmoid_focal_loss(input, target, self.alpha, self.gamma, self.reduction,
                                    weight=self.weight, backend=self.backend)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class BCEWithLogitsLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.BCEWithLogitsLoss`` (same constructor arguments, ``weight`` and
    ``pos_weight`` registered as buffers as torch does, same results), plus ``backend``."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, reduce=None,
                 reduction: str = "mean", pos_weight: Optional[Tensor] = None, *,
                 backend: str = "auto"):
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(input, target, self.weight, self.reduction,
                                                  self.pos_weight, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class SoftmaxFocalLoss(torch.nn.Module):
    """Multi-class focal loss over class dimension 1 (``fusedloss.softmax_focal_loss``): logits
    ``(N, C)`` or ``(N, C, d1, ..., dk)``, int64 targets, per-class ``weight`` (alpha) as a buffer
    that follows ``.to()``, ``ignore_index``, ``reduction``."""

    def __init__(self, gamma: float = 2.0, weight: Optional[Tensor] = None,
                 ignore_index: int = -100, reduction: str = "mean", *, backend: str = "auto"):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.softmax_focal_loss(input, target, self.gamma, self.weight, self.ignore_index,
                                    self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}")


# Dice / Tversky / Dice+CE --------------------------------------------------------------------

__all__ += ["DiceLoss", "TverskyLoss", "DiceCELoss"]


def _nonnegative(weight: Optional[Tensor], name: str) -> Optional[Tensor]:
    """A class weight checked once, at construction (any device: one read, not per call)."""
    if weight is not None and weight.numel() and not bool((weight >= 0).all()):
        raise ValueError(f"{name} must be non-negative (and not NaN), got {weight.tolist()}")
    return weight


class _DiceOptions(torch.nn.Module):
    """The arguments every Dice-family module keeps; ``weight`` is a buffer (follows ``.to()``)."""

    def __init__(self, weight, ignore_index, reduction, include_background, batch, smooth_nr,
                 smooth_dr, activation, backend):
        super().__init__()
        self.register_buffer("weight", _nonnegative(weight, "weight"))
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.include_background = include_background
        self.batch = batch
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr
        self.activation = activation
        self.backend = backend

    def _options(self) -> dict:
        return {"include_background": self.include_background, "batch": self.batch,
                "smooth_nr": self.smooth_nr, "smooth_dr": self.smooth_dr,
                "activation": self.activation, "backend": self.backend}

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, include_background={self.include_background}, "
                f"batch={self.batch}, activation={self.activation!r}")


class DiceLoss(_DiceOptions):
    """:func:`fusedloss.dice_loss` as a module: MONAI's ``DiceLoss(softmax=True,
    to_onehot_y=True, ...)`` on logits ``(N, C, d1, ..., dk)`` and int64 class indices
    ``(N, d1, ..., dk)`` (no channel dim), without a one-hot tensor. ``weight`` ``(C,)`` by class
    id (``weight[0]`` unused with ``include_background=False``)."""

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", *, include_background: bool = True,
                 squared_pred: bool = False, batch: bool = False, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, activation: str = "softmax", backend: str = "auto"):
        super().__init__(weight, ignore_index, reduction, include_background, batch, smooth_nr,
                         smooth_dr, activation, backend)
        self.squared_pred = squared_pred

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.dice_loss(input, target, self.weight, self.ignore_index, self.reduction,
                           squared_pred=self.squared_pred, **self._options())


class TverskyLoss(_DiceOptions):
    """:func:`fusedloss.tversky_loss` as a module (MONAI's ``TverskyLoss(softmax=True,
    to_onehot_y=True, ...)``): ``alpha`` weights false positives, ``beta`` false negatives."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, weight: Optional[Tensor] = None,
                 ignore_index: int = -100, reduction: str = "mean", *,
                 include_background: bool = True, batch: bool = False, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, activation: str = "softmax", backend: str = "auto"):
        super().__init__(weight, ignore_index, reduction, include_background, batch, smooth_nr,
                         smooth_dr, activation, backend)
        self.alpha = alpha
        self.beta = beta

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.tversky_loss(input, target, self.alpha, self.beta, self.weight,
                              self.ignore_index, self.reduction, **self._options())

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, " + super().extra_repr()


class DiceCELoss(_DiceOptions):
    """:func:`fusedloss.dice_ce_loss` as a module (MONAI's ``DiceCELoss(softmax=True,
    to_onehot_y=True, ...)``; its single ``weight`` is ``weight`` and ``ce_weight`` here, both
    kept as buffers): ``lambda_dice * Dice + lambda_ce * cross-entropy``, one read of the logits
    for both terms. ``reduction`` 'mean' or 'sum'."""

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", *, include_background: bool = True,
                 squared_pred: bool = False, batch: bool = False, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 ce_weight: Optional[Tensor] = None, label_smoothing: float = 0.0,
                 backend: str = "auto"):
        super().__init__(weight, ignore_index, reduction, include_background, batch, smooth_nr,
                         smooth_dr, "softmax", backend)
        self.squared_pred = squared_pred
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.register_buffer("ce_weight", _nonnegative(ce_weight, "ce_weight"))
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.dice_ce_loss(input, target, self.weight, self.ignore_index, self.reduction,
                              squared_pred=self.squared_pred, lambda_dice=self.lambda_dice,
                              lambda_ce=self.lambda_ce, ce_weight=self.ce_weight,
                              label_smoothing=self.label_smoothing, **self._options())

    def extra_repr(self) -> str:
        return (f"lambda_dice={self.lambda_dice}, lambda_ce={self.lambda_ce}, "
                + super().extra_repr())


# help() and IDEs fall back to torch.nn.Module's "Initialize internal Module state" and "Define the
# computation performed at every call" where a method has no docstring of its own.
_CALLS = {
    "CrossEntropyLoss": ("cross_entropy", "input, target"),
    "LinearCrossEntropyLoss": ("linear_cross_entropy", "input, linear_weight, target, linear_bias"),
    "SigmoidFocalLoss": ("sigmoid_focal_loss", "input, target"),
    "SoftmaxFocalLoss": ("softmax_focal_loss", "input, target"),
    "BCEWithLogitsLoss": ("binary_cross_entropy_with_logits", "input, target"),
    "TotalVariationLoss": ("total_variation", "input, weight"),
    "DiceLoss": ("dice_loss", "input, target"),
    "TverskyLoss": ("tversky_loss", "input, target"),
    "DiceCELoss": ("dice_ce_loss", "input, target"),
}
for _name, (_fn, _args) in _CALLS.items():
    _cls = globals()[_name]
    _cls.__init__.__doc__ = (f"Keep the options of :func:`fusedloss.{_fn}` for every call (the "
                             f"arguments are described in the class docstring).")
    _cls.forward.__doc__ = (f":func:`fusedloss.{_fn}` of ``{_args}`` with this module's "
                            f"options.")
del _name, _fn, _args, _cls
