// Index and launch arithmetic of the CUDA kernels, as plain C++ with no CUDA or ATen types: the
// same inline functions run on the device (through common.cuh) and on the host, where
// tests/test_cuda_sources.py compiles them with g++ and checks them against brute force.
//
//   ceil_div, next_pow2, prev_pow2        integer helpers (non-negative arguments)
//   split_row                             a row's unaligned head, 16-byte-aligned body, tail
//   same_alignment                        two rows whose bodies line up (one split for both)
//   capped_grid                           a 1-D grid for a grid-stride loop, within CUDA's limits
//   plan_softmax_rows                     which softmax-row kernel and what launch shape
#pragma once

#include <cstdint>

#include "fusedloss/common.h"  // FL_HOST_DEVICE

namespace fusedloss {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kVecBytes = 16;                  // one 128-bit access
constexpr int64_t kMaxGridX = 2147483647;      // gridDim.x limit (2^31 - 1)
constexpr int64_t kMaxGridYZ = 65535;          // gridDim.y / gridDim.z limit (unused: 1-D grids)

// a / b rounded up, for a >= 0, b > 0 (no overflow near INT64_MAX).
FL_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return a / b + (a % b != 0 ? 1 : 0);
}

// Smallest power of two >= v (1 for v <= 1).
FL_HOST_DEVICE constexpr int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Largest power of two <= v (1 for v <= 1).
FL_HOST_DEVICE constexpr int64_t prev_pow2(int64_t v) {
  int64_t p = 1;
  while (p <= v / 2) p <<= 1;
  return p;
}

// A row of n elements of elem_bytes each starting at byte address addr, split as
//   [0, head)            scalar accesses (before the first 16-byte boundary)
//   [head, tail)         nvec vectors of kVecBytes / elem_bytes elements, each 16-byte aligned
//   [tail, n)            scalar accesses (fewer than one vector)
// The body is every aligned 16-byte window that lies inside the row. An address that is not a
// multiple of elem_bytes (never from torch; a raw pointer could) gets no body: all scalar.
struct RowSplit {
  int64_t head;
  int64_t nvec;
  int64_t tail;
};

FL_HOST_DEVICE RowSplit split_row(uint64_t addr, int64_t n, int64_t elem_bytes) {
  RowSplit s{n, 0, n};
  if (n <= 0) return RowSplit{0, 0, 0};
  if (addr % static_cast<uint64_t>(elem_bytes) != 0) return s;
  const int64_t vec = kVecBytes / elem_bytes;
  const int64_t mis = static_cast<int64_t>(addr % kVecBytes);
  int64_t head = mis == 0 ? 0 : (kVecBytes - mis) / elem_bytes;
  if (head > n) head = n;
  s.head = head;
  s.nvec = (n - head) / vec;
  s.tail = head + s.nvec * vec;
  return s;
}

// Two rows (of the same element type) have the same split when their addresses agree modulo 16.
FL_HOST_DEVICE bool same_alignment(uint64_t a, uint64_t b) {
  return a % kVecBytes == b % kVecBytes;
}

// Blocks for a grid-stride loop over `work` items, `per_block` items per block per step: enough to
// cover the work in one step when that fits, capped by max_blocks (e.g. SMs x resident blocks) and
// by gridDim.x's limit. 0 for no work (launch nothing).
FL_HOST_DEVICE int64_t capped_grid(int64_t work, int64_t per_block, int64_t max_blocks) {
  if (work <= 0) return 0;
  int64_t g = ceil_div(work, per_block);
  if (max_blocks > 0 && g > max_blocks) g = max_blocks;
  if (g > kMaxGridX) g = kMaxGridX;
  return g < 1 ? 1 : g;
}

// The softmax-row kernels (softmax_rows.cuh) and how each is launched.
enum class RowsKernel : int { Warp = 0, Block = 1, Strided = 2 };

constexpr int kRowsWarpThreads = 256;     // Warp: 8 rows (warps) per block
constexpr int kRowsStridedThreads = 256;  // Strided: TX rows x TY class slices
constexpr int kRowsBlockMaxThreads = 512;  // Block: 128..512 threads per row
constexpr int64_t kRowsWarpMaxVecs = 8 * kWarpSize;  // Warp handles rows of up to 8 vectors a lane

struct RowsLaunch {
  RowsKernel kind;
  int64_t grid;  // blocks (1-D), 1 <= grid <= kMaxGridX; 0 when rows == 0
  int tx;        // blockDim.x
  int ty;        // blockDim.y (Strided only; 1 otherwise)
};

// rows: number of rows; C: classes; vec: elements per 16-byte vector;
// class_contiguous: the input's class stride is 1; grad_strided_classes: a gradient is written
// and its class stride is not 1.
FL_HOST_DEVICE RowsLaunch plan_softmax_rows(int64_t rows, int64_t C, int64_t vec,
                                            bool class_contiguous, bool grad_strided_classes) {
  RowsLaunch l{RowsKernel::Strided, 0, 1, 1};
  // A gradient with strided classes (channels-last input, new contiguous grad) and small C goes to
  // the strided kernel, whose stores are coalesced across rows and whose row reads stay in L1.
  const bool contiguous =
      class_contiguous && C >= kWarpSize && (!grad_strided_classes || C > 256);
  if (contiguous) {
    const int64_t nvec = ceil_div(C, vec);
    if (nvec <= kRowsWarpMaxVecs) {
      l.kind = RowsKernel::Warp;
      l.tx = kRowsWarpThreads;
      l.grid = capped_grid(rows, kRowsWarpThreads / kWarpSize, 0);
    } else {
      // ~8 vectors per thread, 128..512 threads.
      int64_t t = next_pow2(ceil_div(nvec, 8));
      if (t < 128) t = 128;
      if (t > kRowsBlockMaxThreads) t = kRowsBlockMaxThreads;
      l.kind = RowsKernel::Block;
      l.tx = static_cast<int>(t);
      l.grid = capped_grid(rows, 1, 0);
    }
  } else {
    // More class slices per row for many classes, and more still when rows are few.
    const int64_t max_ty = rows <= 8192 ? 16 : 8;
    int64_t ty = prev_pow2(C / 16 > 1 ? C / 16 : 1);
    if (ty > max_ty) ty = max_ty;
    l.kind = RowsKernel::Strided;
    l.ty = static_cast<int>(ty);
    l.tx = static_cast<int>(kRowsStridedThreads / ty);
    l.grid = capped_grid(rows, l.tx, 0);
  }
  return l;
}

}  // namespace cuda
}  // namespace fusedloss
