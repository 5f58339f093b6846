"""What every Triton kernel of fusedloss shares: portable math, row tiles, launch limits and the
interpreter shims. A new loss imports these instead of copying them (docs/KERNELS.md).

Portable math. Triton's interpreter (TRITON_INTERPRET=1, how the tests run the kernels on CPU
tensors) cannot call libdevice, so ``_expm1`` and ``_tanh`` are written with ``tl.exp`` only and
keep full relative accuracy near 0. ``_round_bf16`` makes the interpreter round float32 ->
bfloat16 to nearest even as the GPU does (triton 3.9's interpreter truncates); kernels apply it
only under ``EMULATE_RTNE`` (the launchers pass ``EMULATE_RTNE=_INTERPRETED``).

Row tiles. A loss sees its input as (N, C, D) with any strides; a row is one (n, d) position and
C is the class axis. A program owns BLOCK_ROWS rows of one n (``_row_tile``); when D == 1 the rows
run along n instead (``_row_view``), so that the tile axis is the one with consecutive rows in both
the (N, C) and the (N, C, H*W) layouts. ``_tiles`` chooses (BLOCK_SIZE, BLOCK_ROWS, num_warps).

Aligned rows (``_row_split``, ``_body_chunk``, ``_body_offsets``, ``_edge_chunk``; host side
``_row_walk``, ``_rebase``, ``_aligned_like``): a row whose class axis is contiguous is walked as
a head of fewer than VEC columns, a body that starts on a 16-byte boundary, and a tail, so the
body gets 128-bit loads and stores whatever C is (GPT-2's 50257: every row starts somewhere
else). The launcher tells the kernel VEC (elements per 16 bytes, or 1: plain chunks) and, per
operand, whether its rows are aligned exactly like the input's (then VEC, else 1).

Errors. A kernel that validates an index reports the first bad value through a 2-element int64
error buffer under the interpreter (``_error_buffer`` / ``_report_error``: tl.device_assert is a
no-op there); the launcher raises from it. On the GPU the kernel is compiled with debug=True and
the assertion traps, as torch's own nll_loss does. No host sync either way on the GPU.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

# Tile-size knobs, read at every launch. MAX_BLOCK_SIZE caps the classes per chunk (tests set it to
# 64 so the class loop runs many times; FUSEDLOSS_TRITON_MAX_BLOCK overrides it from the
# environment); ROW_TILE is the element budget that decides how many rows share a program when C
# is small.
MAX_BLOCK_SIZE = int(os.environ.get("FUSEDLOSS_TRITON_MAX_BLOCK", "0")) or None
ROW_TILE = 4096
GPU_MAX_BLOCK_SIZE = 16384
INTERPRETER_MAX_BLOCK_SIZE = 1024

# CUDA's grid limits: x up to 2^31 - 1 programs, y and z up to 65535 (the interpreter checks none).
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535

# ----------------------------------------------------------------------------------------------
# Portable math (no libdevice)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _expm1(u, NUM_TERMS: tl.constexpr):
    """exp(u) - 1 with full relative accuracy: Taylor series (Horner) for |u| < 0.5, else exp - 1.

    NUM_TERMS = 8 is below float32 rounding at |u| = 0.5 (truncation 1e-8), 14 below float64's.
    Above 0.5, exp(u) - 1 loses at most a factor 1.6 of exp's relative error. NaN and +-inf pass
    through (expm1(-inf) = -1).
    """
    small = tl.abs(u) < 0.5
    us = tl.where(small, u, 0.0)
    r = 1.0
    # u (1 + u/2 (1 + u/3 (1 + ... (1 + u/NUM_TERMS)))); coefficients rounded once from float64.
    for i in tl.static_range(NUM_TERMS - 1):
        r = 1.0 + us * r * tl.full([], 1.0 / (NUM_TERMS - i), tl.float64).to(us.dtype)
    return tl.where(small, us * r, tl.exp(u) - 1.0)


@triton.jit
def _tanh(u, NUM_TERMS: tl.constexpr):
    """tanh(u) = sign(u) * -expm1(-2|u|) / (2 + expm1(-2|u|)): accurate for small |u| (no 1 - e^-2u
    cancellation), and exp never overflows (its argument is <= 0). tanh(+-inf) = +-1, NaN -> NaN."""
    em = _expm1(-2.0 * tl.abs(u), NUM_TERMS)
    t = -em / (2.0 + em)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), still as float32, so that the
    conversion that follows is exact. Only for the interpreter: triton 3.9's interpreter truncates
    float32 -> bfloat16, the GPU rounds to nearest even. NaN stays NaN, overflow goes to inf."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_rounded(ptr, value, mask, EMULATE_RTNE: tl.constexpr):
    """Store a float32/float64 value in ptr's dtype, rounding like the GPU under the interpreter."""
    if EMULATE_RTNE and ptr.dtype.element_ty == tl.bfloat16:
        value = _round_bf16(value)
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Row tiles
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows_of(row_block, num_row_blocks, D, BLOCK_ROWS: tl.constexpr):
    """The rows of tile row_block (int64): one n and BLOCK_ROWS consecutive d, and which d exist.
    num_row_blocks = cdiv(D, BLOCK_ROWS) tiles per n."""
    n = row_block // num_row_blocks
    d = (row_block % num_row_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    return n, d, d < D


@triton.jit
def _row_tile(num_row_blocks, D, BLOCK_ROWS: tl.constexpr):
    """This program's rows (one tile per program: grid = N' * num_row_blocks): see _rows_of."""
    return _rows_of(tl.program_id(0).to(tl.int64), num_row_blocks, D, BLOCK_ROWS)


# ----------------------------------------------------------------------------------------------
# The aligned row walk: head, body, tail
# ----------------------------------------------------------------------------------------------
# A row of C elements at element offset x_row. VEC == 1: one "body" of C columns, chunks k.. of
# BLOCK_SIZE, mask cols < C, nothing else (class stride may be anything; Triton vectorises on its
# own when the pointer, the row strides and C are multiples of 16). VEC > 1 (class stride 1):
# head = the columns before the first 16-byte boundary (< VEC), body = a multiple of VEC columns
# from there, walked in BLOCK_SIZE chunks whose start is hinted a multiple of VEC and whose mask
# bound is one (so the mask is constant over VEC lanes), then one small edge tile that holds the
# head and the tail. Every load is masked to [0, C); nothing outside a row is read.


@triton.jit
def _row_split(x_row, C, VEC: tl.constexpr):
    """(head, body) per row: x_row + head is a multiple of VEC, body a multiple of VEC, and the
    tail is [head + body, C). head may exceed C for a row shorter than its head (body = 0)."""
    if VEC > 1:
        head = (VEC - x_row % VEC) % VEC
        body = tl.maximum(C - head, 0) // VEC * VEC
    else:
        head = x_row * 0
        body = x_row * 0 + C
    return head, body


@triton.jit
def _body_stop(body, C, VEC: tl.constexpr):
    """Upper bound of the chunk loop over the body of the tile's rows."""
    if VEC > 1:
        return tl.max(body, axis=0).to(tl.int32)
    else:
        return C


@triton.jit
def _body_chunk(k, head, body, C, row_mask, BLOCK_SIZE: tl.constexpr, VEC: tl.constexpr):
    """The body chunk at k: (cols, j, col_mask, mask). cols: column indices (int64, (1, BLOCK_SIZE)
    when every row has the same, else (BLOCK_ROWS, BLOCK_SIZE)); j = k + arange, the position in
    the body; col_mask: which columns exist (for per-class operands); mask: row_mask & col_mask."""
    j = k + tl.arange(0, BLOCK_SIZE)
    if VEC > 1:
        cols = head[:, None] + j[None, :]
        mask = row_mask[:, None] & (j[None, :] < body[:, None])
        col_mask = mask
    else:
        cols = j.to(tl.int64)[None, :]
        col_mask = (j < C)[None, :]
        mask = row_mask[:, None] & col_mask
    return cols, j, col_mask, mask


@triton.jit
def _body_offsets(row_off, head, j, cols, stride_c, OP_VEC: tl.constexpr):
    """Element offsets of a body chunk in one operand whose rows start at row_off. OP_VEC > 1: the
    operand has class stride 1 and its rows are aligned like the input's (row_off + head is a
    multiple of OP_VEC), which is what lets its loads and stores use 128-bit vectors."""
    if OP_VEC > 1:
        return tl.multiple_of(row_off + head, OP_VEC)[:, None] + j[None, :]
    else:
        return row_off[:, None] + cols * stride_c


@triton.jit
def _edge_chunk(head, body, C, row_mask, VEC: tl.constexpr):
    """(cols, mask) of the head and tail of each row in one (BLOCK_ROWS, 2 VEC) tile: lanes < VEC
    are columns 0.. of the head, lanes >= VEC columns head + body.. of the tail."""
    lane = tl.arange(0, 2 * VEC)
    is_head = (lane < VEC)[None, :]
    tail = (head + body)[:, None] + (lane - VEC)[None, :]
    cols = tl.where(is_head, lane[None, :].to(tl.int64), tail)
    inside = tl.where(is_head, lane[None, :] < head[:, None], tail < C) & (cols < C)
    return cols, row_mask[:, None] & inside


@triton.jit
def _report_error(err_ptr, bad, value, REPORT_ERRORS: tl.constexpr):
    """Interpreter only (REPORT_ERRORS): record that some row is bad and one of its values in the
    launcher's error buffer (err[0] = 1, err[1] = value); bad and value are (BLOCK_ROWS,)."""
    if REPORT_ERRORS:
        zero = (value * 0).to(tl.int64)
        tl.store(err_ptr + zero, zero + 1, mask=bad)
        tl.store(err_ptr + 1 + zero, value.to(tl.int64), mask=bad)


# Decorated above, under the TRITON_INTERPRET value of import time: launches must match it.
_INTERPRETED = type(_row_tile).__name__ == "InterpretedFunction"

if _INTERPRETED:  # numpy runs the kernels: padding rows compute log(0) and inf - inf, harmlessly
    import warnings

    import numpy as _np

    @contextlib.contextmanager
    def _quiet():
        with _np.errstate(divide="ignore", invalid="ignore", over="ignore"), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
            yield
else:
    _quiet = contextlib.nullcontext


# ----------------------------------------------------------------------------------------------
# Launcher helpers (host side)
# ----------------------------------------------------------------------------------------------


def _acc_dtype(dtype):
    """The accumulation dtype of a kernel on `dtype` data: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    """``_acc_dtype`` as the triton dtype passed to a kernel's ACC_DTYPE."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _expm1_terms(dtype):
    """Taylor terms of ``_expm1`` for the accumulation dtype of `dtype` data."""
    return 14 if dtype == torch.float64 else 8


def _check_device(t, op="fusedloss"):
    if t.device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError(
            f"{op}: fusedloss triton kernels need CUDA tensors; CPU tensors run only under the "
            "triton interpreter (set TRITON_INTERPRET=1 before importing fusedloss.kernels)")


def _block_cap(cap=None):
    """The largest BLOCK_SIZE a launch may use: the knob, else `cap` (a kernel's spill-free size on
    the GPU), else the default; 1024 under the interpreter (numpy tiles)."""
    if MAX_BLOCK_SIZE:
        return MAX_BLOCK_SIZE
    if _INTERPRETED:
        return INTERPRETER_MAX_BLOCK_SIZE
    return cap or GPU_MAX_BLOCK_SIZE


def _tiles(C, D, cap=None, max_warps=32):
    """(BLOCK_SIZE, BLOCK_ROWS, num_warps) for C classes and D rows along the tile axis.

    BLOCK_SIZE covers C up to ``_block_cap(cap)`` (a kernel passes the largest block that compiles
    without spills for its feature set: see .ci/check_triton.py); small C gets several rows per
    program, about ROW_TILE elements in all. num_warps gives each thread about 16 elements of a
    chunk (a 128-bit vector of bfloat16 twice, of float32 four times), at most max_warps."""
    block = min(triton.next_power_of_2(max(C, 1)), triton.next_power_of_2(_block_cap(cap)))
    rows = min(triton.next_power_of_2(max(D, 1)), max(1, ROW_TILE // block))
    num_warps = min(max_warps, max(4, block * rows // 512))
    return block, rows, num_warps


def _row_view(N, D, stride_n, stride_d):
    """Strides (stride_n, stride_d) of the (N', D') row grid: D == 1 runs the tile along n."""
    return (0, stride_n) if D == 1 else (stride_n, stride_d)


def _vec(dtype):
    """Elements of `dtype` in 16 bytes: the width of a 128-bit load."""
    return max(1, 16 // dtype.itemsize)


def _rebase(t, vec):
    """(tensor to pass, offset): `t`'s data seen from the nearest 16-byte boundary at or before its
    first element, and that element's offset from it. Triton specialises a pointer on 16-byte
    alignment; a view whose first element is not aligned (``logits[1:]`` with V odd) would lose
    every vector load without this. Only when the memory below exists (the storage offset covers
    it); the kernel adds the offset to every row and never reads below it."""
    ptr = t.data_ptr()
    size = t.element_size()
    if vec <= 1 or ptr % 16 == 0 or ptr % size:
        return t, 0
    k = (ptr % 16) // size
    if t.storage_offset() < k:
        return t, 0
    return t.as_strided((1,), (1,), t.storage_offset() - k), k


def _aligned_like(offset, strides, ref_offset, ref_strides, vec):
    """True when every row of an operand starts at the same position modulo `vec` as the same row
    of the reference (the input): then the input's head/body/tail split aligns it too."""
    return (offset - ref_offset) % vec == 0 and all(
        (a - b) % vec == 0 for a, b in zip(strides, ref_strides))


def _check_grid(grid, op):
    """Refuse a grid beyond CUDA's limits with an error that says so (the interpreter would run it
    and the GPU launch fail)."""
    limits = (MAX_GRID_X, MAX_GRID_YZ, MAX_GRID_YZ)
    for axis, (g, lim) in enumerate(zip(grid, limits)):
        if g > lim:
            raise RuntimeError(f"{op}: launch grid {tuple(grid)} exceeds CUDA's limit of {lim} "
                               f"programs along axis {'xyz'[axis]}")
    return grid


def _error_buffer(device, report):
    """The interpreter's error buffer (2 int64: flag, value), or None when not reporting."""
    return torch.zeros(2, dtype=torch.int64, device=device) if report else None


def _raise_if_error(err, make_error):
    """Interpreter only: raise make_error() if the kernel recorded a bad value (CPU tensors, so
    reading the flag is no device sync)."""
    if err is not None and err[0].item():
        raise make_error()


def _row_walk(t, C, row_strides, class_stride):
    """(tensor to pass, offset, VEC) of the row walk over an (N, C, D) operand t whose rows start
    at multiples of row_strides. VEC = 1 (plain chunks) when the class stride is not 1, or when
    triton proves 16-byte alignment by itself (pointer, row strides and C multiples of 16: its
    launch specialisation); else the head/body/tail walk with VEC elements per 16 bytes, from the
    16-byte boundary at or before t's first element (``_rebase``)."""
    vec = _vec(t.dtype)
    if class_stride != 1 or vec == 1:
        return t, 0, 1
    if t.data_ptr() % 16 == 0 and C % 16 == 0 and all(s % 16 == 0 for s in row_strides):
        return t, 0, 1
    base, offset = _rebase(t, vec)
    return base, offset, vec
