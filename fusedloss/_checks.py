"""Argument checks shared by the fast path (``fusedloss.functional``) and the spec
(``fusedloss.reference``), so that both raise the same clear error naming the argument.

Each ``check_*`` raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or value)
and returns the checked value; each ``*_args`` checks every argument of one public function. They
run on every call: the common values are recognised inline and only the rest goes through the full
checks. Under ``torch.compile(dynamic=True)`` they use comparisons only (which trace as guards).
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "mean", "sum")
TV_NORMS = ("l1", "l2_squared", "isotropic")


def check_reduction(reduction, name="reduction"):
    """Raise ValueError unless ``reduction`` is 'none', 'mean' or 'sum'."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{name} must be one of 'none', 'mean', 'sum', got {reduction!r}")
    return reduction


def check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float_tensor(x, name):
    """TypeError unless ``x`` is a float16/bfloat16/float32/float64 tensor."""
    check_tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a float16, bfloat16, float32 or float64 tensor, got dtype {x.dtype}"
        )
    return x


def check_same_device(x, name, ref, ref_name="input"):
    if x.device != ref.device:
        raise ValueError(
            f"{name} must be on the same device as {ref_name}, got {x.device} and {ref.device}"
        )
    return x


def check_real(value, name, *, low=None, low_inclusive=True, high=None, high_inclusive=True):
    """Check a Python real number (not bool, finite) against optional bounds; return it as float.

    Under ``torch.compile(dynamic=True)`` a float argument arrives as a ``torch.SymFloat``: it is
    checked with comparisons only (which trace as guards; ``math.isfinite`` does not trace)."""
    if type(value) is float or type(value) is int:  # the common case, without abc checks
        value = float(value)
    elif isinstance(value, torch.SymFloat):
        pass
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    else:
        value = float(value)
    if not (-math.inf < value < math.inf):  # also False for NaN
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {op} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise ValueError(f"{name} must be {op} {high}, got {value}")
    return value


def check_int(value, name):
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_label_smoothing(label_smoothing):
    return check_real(label_smoothing, "label_smoothing", low=0.0, high=1.0)


def check_z_loss(z_loss):
    return check_real(z_loss, "z_loss", low=0.0)


def check_gamma(gamma):
    return check_real(gamma, "gamma", low=0.0)


def check_softcap(softcap):
    """None, or a finite real number > 0."""
    if softcap is None:
        return None
    return check_real(softcap, "softcap", low=0.0, low_inclusive=False)


def check_chunk_size(chunk_size):
    if chunk_size is None:
        return None
    chunk_size = check_int(chunk_size, "chunk_size")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    return chunk_size


def check_class_weight(weight, num_classes, input, name="weight"):
    """None, or a floating 1-D tensor of ``num_classes`` elements on input's device."""
    if weight is None:
        return None
    check_float_tensor(weight, name)
    check_same_device(weight, name, input)
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(
            f"{name} must be a 1-D tensor with one value per class ({num_classes}), "
            f"got shape {tuple(weight.shape)}"
        )
    return weight


def check_broadcast_weight(weight, input, name="weight"):
    """None, or a floating tensor that broadcasts to input's shape (without enlarging it)."""
    if weight is None:
        return None
    check_float_tensor(weight, name)
    check_same_device(weight, name, input)
    try:
        shape = torch.broadcast_shapes(weight.shape, input.shape)
    except RuntimeError:
        shape = None
    if shape != input.shape:
        raise ValueError(
            f"{name} of shape {tuple(weight.shape)} must be broadcastable to the input's shape "
            f"{tuple(input.shape)}"
        )
    return weight


def cross_entropy_args(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                       softcap):
    """Check cross_entropy's arguments; return True for class-probability targets.

    Class-index targets: int64, shape ``(N, d1, ..., dk)`` for input ``(N, C, d1, ..., dk)``,
    or 0-d for an unbatched input ``(C,)``. Class-probability targets: floating, input's shape.
    """
    # Runs on every call: the common values are recognised inline, the rest (and every error)
    # goes through the full checks.
    if not (isinstance(input, torch.Tensor) and input.dtype in FLOAT_DTYPES):
        check_float_tensor(input, "input")
    if not isinstance(target, torch.Tensor):
        check_tensor(target, "target")
    if not (target.is_cpu and input.is_cpu) and target.device != input.device:
        check_same_device(target, "target", input)
    shape = input.shape
    if len(shape) == 0:
        raise ValueError("input must have at least 1 dimension (C,) or (N, C, ...), "
                         "got a 0-d tensor")
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    if num_classes == 0:
        raise ValueError(f"input must have at least one class, got shape {tuple(shape)}")
    if reduction not in REDUCTIONS:
        check_reduction(reduction)
    if type(ignore_index) is not int:
        check_int(ignore_index, "ignore_index")
    if not (type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0):
        check_label_smoothing(label_smoothing)
    if not (type(z_loss) is float and 0.0 <= z_loss < math.inf):
        check_z_loss(z_loss)
    if softcap is not None:
        check_softcap(softcap)
    if target.dtype.is_floating_point:
        check_float_tensor(target, "target")
        if target.shape != input.shape:
            raise ValueError(
                "target with class probabilities (floating dtype) must have the input's shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
        probs = True
    elif target.dtype in (torch.int64, torch.uint8):  # torch accepts Long or Byte
        expected = shape[:0] if len(shape) == 1 else shape[:1] + shape[2:]
        if target.shape != expected:
            expected = tuple(expected)
            raise ValueError(
                f"target with class indices must have shape {expected} for input of shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
        probs = False
    else:
        raise TypeError(
            "target must be int64 or uint8 (class indices) or floating (class probabilities), "
            f"got dtype {target.dtype}"
        )
    if probs and ignore_index >= 0:  # torch: a negative ignore_index is accepted and unused
        raise ValueError(f"ignore_index ({ignore_index}) is not supported for class-probability "
                         "(floating) targets")
    if weight is not None:
        check_class_weight(weight, num_classes, input)
    return probs


def check_inplace_backward(input):
    """inplace_backward writes the gradient into input's memory: refuse what torch refuses for an
    in-place op (a leaf that requires grad, or a view of one) and memory where several elements
    share one location (an expanded tensor), on every backend. For an input that requires grad."""
    if input.is_leaf:
        raise RuntimeError("fusedloss.cross_entropy(inplace_backward=True): input is a leaf "
                           "tensor that requires grad; the gradient cannot overwrite it (torch "
                           "forbids in-place ops on it). Pass logits produced by an op, or use "
                           "inplace_backward=False")
    if torch.compiler.is_compiling():
        return  # views and memory overlap are not visible to the tracer; eager checks them
    base = input._base if input._is_view() else None
    if base is not None and base.is_leaf and base.requires_grad:
        raise RuntimeError("fusedloss.cross_entropy(inplace_backward=True): input is a view of a "
                           "leaf tensor that requires grad; the gradient cannot overwrite it "
                           "(torch forbids in-place ops on it). Use inplace_backward=False")
    if torch._debug_has_internal_overlap(input) == 1:
        raise RuntimeError("fusedloss.cross_entropy(inplace_backward=True): input has elements "
                           "that share one memory location (an expanded or otherwise "
                           "overlapping tensor), so the gradient cannot be written into it. "
                           "Pass input.contiguous() or use inplace_backward=False")


def linear_cross_entropy_args(input, linear_weight, target, linear_bias, weight, reduction,
                              chunk_size):
    """Check linear_cross_entropy's own arguments (the rest are cross_entropy's); return True
    for class-probability targets."""
    check_float_tensor(input, "input")
    check_float_tensor(linear_weight, "linear_weight")
    check_tensor(target, "target")
    check_same_device(linear_weight, "linear_weight", input)
    check_same_device(target, "target", input)
    if input.dim() < 1:
        raise ValueError("input must have shape (..., H), got a 0-d tensor")
    if linear_weight.dim() != 2:
        raise ValueError(
            f"linear_weight must have shape (V, H), got shape {tuple(linear_weight.shape)}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(
            f"linear_weight must have the input's dtype {input.dtype}, got {linear_weight.dtype}"
        )
    vocab, hidden = linear_weight.shape
    if input.shape[-1] != hidden:
        raise ValueError(
            f"input's last dimension ({input.shape[-1]}) must equal linear_weight's second "
            f"dimension ({hidden})"
        )
    if linear_bias is not None:
        check_float_tensor(linear_bias, "linear_bias")
        check_same_device(linear_bias, "linear_bias", input)
        if linear_bias.dtype != input.dtype:
            raise TypeError(
                f"linear_bias must have the input's dtype {input.dtype}, got {linear_bias.dtype}"
            )
        if tuple(linear_bias.shape) != (vocab,):
            raise ValueError(
                f"linear_bias must have shape ({vocab},), got {tuple(linear_bias.shape)}"
            )
    batch_shape = tuple(input.shape[:-1])
    if target.dtype.is_floating_point:
        check_float_tensor(target, "target")
        if tuple(target.shape) != batch_shape + (vocab,):
            raise ValueError(
                f"target with class probabilities must have shape {batch_shape + (vocab,)}, "
                f"got {tuple(target.shape)}"
            )
    elif target.dtype == torch.int64:
        if tuple(target.shape) != batch_shape:
            raise ValueError(
                f"target with class indices must have shape {batch_shape} (input.shape[:-1]), "
                f"got {tuple(target.shape)}"
            )
    else:
        raise TypeError(
            "target must be int64 (class indices) or floating (class probabilities), "
            f"got dtype {target.dtype}"
        )
    check_class_weight(weight, vocab, input)
    check_chunk_size(chunk_size)
    check_reduction(reduction)
    return target.dtype.is_floating_point




def sigmoid_focal_loss_args(input, target, alpha, gamma, reduction, weight):
    """sigmoid_focal_loss's arguments; returns (alpha, gamma) as floats."""
    check_float_tensor(input, "input")
    check_float_tensor(target, "target")
    check_same_device(target, "target", input)
    if target.shape != input.shape:
        raise ValueError(
            f"target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
        )
    alpha = check_real(alpha, "alpha")
    gamma = check_gamma(gamma)
    check_reduction(reduction)
    check_broadcast_weight(weight, input)
    return alpha, gamma


def softmax_focal_loss_args(input, target, gamma, weight, ignore_index, reduction):
    """softmax_focal_loss's arguments; returns gamma as a float."""
    check_float_tensor(input, "input")
    if input.dim() < 2:
        raise ValueError(
            f"input must have shape (N, C) or (N, C, d1, ..., dk), got {tuple(input.shape)}"
        )
    check_tensor(target, "target")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be an int64 tensor of class indices, "
                        f"got dtype {target.dtype}")
    gamma = check_gamma(gamma)
    cross_entropy_args(input, target, weight, ignore_index, reduction, 0.0, 0.0, None)
    return gamma


def binary_cross_entropy_with_logits_args(input, target, weight, reduction, pos_weight):
    """binary_cross_entropy_with_logits's arguments (torch's ValueError on a size mismatch)."""
    check_float_tensor(input, "input")
    check_tensor(target, "target")
    if target.size() != input.size():
        raise ValueError(
            f"Target size ({target.size()}) must be the same as input size ({input.size()})"
        )
    check_float_tensor(target, "target")
    check_same_device(target, "target", input)
    check_reduction(reduction)
    check_broadcast_weight(weight, input, "weight")
    check_broadcast_weight(pos_weight, input, "pos_weight")


def total_variation_args(input, weight, norm, eps, reduction):
    """total_variation's arguments; returns eps as a float."""
    check_float_tensor(input, "input")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (..., H, W), got {tuple(input.shape)}")
    if not isinstance(norm, str) or norm not in TV_NORMS:
        raise ValueError(f"norm must be one of 'l1', 'l2_squared', 'isotropic', got {norm!r}")
    eps = check_real(eps, "eps", low=0.0)
    if eps != 0.0 and norm != "isotropic":
        raise ValueError(f"eps applies to norm='isotropic' only, got eps={eps} with norm={norm!r}")
    check_reduction(reduction)
    check_broadcast_weight(weight, input)
    return eps


def acc_dtype(dtype):
    """The accumulation dtype of every path: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cross_entropy_dtype(input, target, probs):
    """The loss dtype torch's cross_entropy gives: input's, promoted with a class-probability
    target's, and float32 under autocast (where cross_entropy is a float32 op)."""
    device_type = "cpu" if input.is_cpu else input.device.type  # (.device costs: per call)
    if torch.is_autocast_enabled(device_type) and input.dtype != torch.float64:
        return torch.promote_types(torch.float32, target.dtype) if probs else torch.float32
    return torch.promote_types(input.dtype, target.dtype) if probs else input.dtype




# Dice / Tversky / Dice+CE -------------------------------------------------------------------

DICE_ACTIVATIONS = ("softmax", "sigmoid")


def check_nonnegative_weight(weight, name="weight"):
    """A class weight must be >= 0 (MONAI's rule). Its values are read only where that needs no
    host sync: a CPU tensor outside torch.compile (the modules check theirs at construction)."""
    if weight is None or not weight.is_cpu or torch.compiler.is_compiling():
        return weight
    if weight.numel() and not bool((weight >= 0).all()):
        raise ValueError(f"{name} must be non-negative (and not NaN), got {weight.tolist()}")
    return weight


def _dice_common_args(input, target, weight, ignore_index, reduction, include_background,
                      batch, smooth_nr, smooth_dr, activation):
    """The arguments every Dice-family function shares; returns (smooth_nr, smooth_dr,
    sigmoid: bool)."""
    check_float_tensor(input, "input")
    check_tensor(target, "target")
    check_same_device(target, "target", input)
    if input.dim() < 3:
        raise ValueError("input must have shape (N, C, d1, ..., dk) with at least one spatial "
                         f"dimension, got {tuple(input.shape)}")
    if not isinstance(activation, str) or activation not in DICE_ACTIVATIONS:
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    num_classes = input.shape[1]
    sigmoid = activation == "sigmoid"
    if sigmoid:
        if num_classes < 1:
            raise ValueError(f"input must have at least one channel, got {tuple(input.shape)}")
        if not target.dtype.is_floating_point:
            raise TypeError("target must be a floating tensor of the input's shape with "
                            f"activation='sigmoid', got dtype {target.dtype}")
        check_float_tensor(target, "target")
        if target.shape != input.shape:
            raise ValueError(f"target must have the input's shape {tuple(input.shape)} with "
                             f"activation='sigmoid', got {tuple(target.shape)}")
    else:
        if num_classes < 2:
            raise ValueError("input must have at least 2 classes for activation='softmax' (use "
                             f"activation='sigmoid' for one channel), got {tuple(input.shape)}")
        if target.dtype != torch.int64:
            raise TypeError(f"target must be an int64 tensor of class indices with "
                            f"activation='softmax', got dtype {target.dtype}")
        expected = input.shape[:1] + input.shape[2:]
        if target.shape != expected:
            raise ValueError(f"target with class indices must have shape {tuple(expected)} for "
                             f"input of shape {tuple(input.shape)}, got {tuple(target.shape)}")
    check_int(ignore_index, "ignore_index")
    check_reduction(reduction)
    check_bool(include_background, "include_background")
    check_bool(batch, "batch")
    if not include_background and num_classes < 2:
        raise ValueError("include_background=False drops class 0 and needs at least 2 channels, "
                         f"got input of shape {tuple(input.shape)}")
    smooth_nr = check_real(smooth_nr, "smooth_nr", low=0.0)
    smooth_dr = check_real(smooth_dr, "smooth_dr", low=0.0)
    check_class_weight(weight, num_classes, input)
    check_nonnegative_weight(weight)
    return smooth_nr, smooth_dr, sigmoid


def dice_loss_args(input, target, weight, ignore_index, reduction, include_background,
                   squared_pred, batch, smooth_nr, smooth_dr, activation):
    """dice_loss's arguments; returns (smooth_nr, smooth_dr, sigmoid)."""
    out = _dice_common_args(input, target, weight, ignore_index, reduction, include_background,
                            batch, smooth_nr, smooth_dr, activation)
    check_bool(squared_pred, "squared_pred")
    return out


def tversky_loss_args(input, target, alpha, beta, weight, ignore_index, reduction,
                      include_background, batch, smooth_nr, smooth_dr, activation):
    """tversky_loss's arguments; returns (alpha, beta, smooth_nr, smooth_dr, sigmoid)."""
    out = _dice_common_args(input, target, weight, ignore_index, reduction, include_background,
                            batch, smooth_nr, smooth_dr, activation)
    alpha = check_real(alpha, "alpha", low=0.0)
    beta = check_real(beta, "beta", low=0.0)
    return (alpha, beta) + out


def dice_ce_loss_args(input, target, weight, ignore_index, reduction, include_background,
                      squared_pred, batch, smooth_nr, smooth_dr, activation, lambda_dice,
                      lambda_ce, ce_weight, label_smoothing):
    """dice_ce_loss's arguments; returns (smooth_nr, smooth_dr, lambda_dice, lambda_ce,
    label_smoothing)."""
    if isinstance(activation, str) and activation == "sigmoid":
        raise ValueError("dice_ce_loss supports activation='softmax' only (MONAI's DiceCELoss "
                         "uses BCE for a single channel; use dice_loss(activation='sigmoid') "
                         "plus binary_cross_entropy_with_logits)")
    if isinstance(reduction, str) and reduction == "none":
        raise ValueError("reduction='none' is not supported by dice_ce_loss (the Dice term is "
                         "per (n, c), the cross-entropy per position); use 'mean' or 'sum'")
    smooth_nr, smooth_dr, _ = dice_loss_args(
        input, target, weight, ignore_index, reduction, include_background, squared_pred, batch,
        smooth_nr, smooth_dr, activation)
    lambda_dice = check_real(lambda_dice, "lambda_dice", low=0.0)
    lambda_ce = check_real(lambda_ce, "lambda_ce", low=0.0)
    check_class_weight(ce_weight, input.shape[1], input, "ce_weight")
    check_nonnegative_weight(ce_weight, "ce_weight")
    label_smoothing = check_label_smoothing(label_smoothing)
    return smooth_nr, smooth_dr, lambda_dice, lambda_ce, label_smoothing
