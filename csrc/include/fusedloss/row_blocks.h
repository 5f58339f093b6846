// The fixed blocks of rows of the softmax-row skeleton's reduced output, the same on every
// backend (CPU, CUDA, Triton, and the Python fake kernels: fusedloss/ops/_common.py row_blocks).
//
// A policy with a per-row loss may return, instead of one loss per row ((N, D): as large as a
// quarter of the logits when C = 4), its sums over fixed blocks of consecutive rows: a 'mean' or
// 'sum' then needs a few floats, and it is deterministic: each block is summed in row order by
// one thread (CPU) or program (GPU), the block sums are added by the caller in block order,
// whatever the thread count or the grid.
#pragma once

#include <cstdint>

#include "common.h"

namespace fusedloss {

// Rows per block of the reduced output: a power of two, 1024 for up to 64 classes, fewer for
// more classes (about 64K logits a block, at least 1 row), at least 64 when D > 1 (the CPU
// spatial path's vector tiles of consecutive d never straddle two blocks).
FL_HOST_DEVICE int64_t loss_block_rows(int64_t C, int64_t D) {
  int64_t k = 1024;
  while (k > 1 && k * C > 65536) k >>= 1;
  if (D > 1 && k < 64) k = 64;
  return k;
}

// The blocks: D == 1: K consecutive rows (along n); D > 1: (n, K consecutive d), block
// n * ceil(D / K) + d / K. Either way a block is a run of consecutive rows r = n * D + d.
FL_HOST_DEVICE int64_t loss_blocks_along(int64_t D, int64_t K) { return (D + K - 1) / K; }

FL_HOST_DEVICE int64_t loss_blocks(int64_t N, int64_t C, int64_t D) {
  const int64_t K = loss_block_rows(C, D);
  return D == 1 ? (N + K - 1) / K : N * loss_blocks_along(D, K);
}

// Block b's rows [r0, r1).
FL_HOST_DEVICE void loss_block_range(int64_t b, int64_t N, int64_t C, int64_t D, int64_t* r0,
                                     int64_t* r1) {
  const int64_t K = loss_block_rows(C, D);
  if (D == 1) {
    *r0 = b * K;
    *r1 = (b + 1) * K < N ? (b + 1) * K : N;
  } else {
    const int64_t per = loss_blocks_along(D, K);
    const int64_t n = b / per, j = b - n * per;
    *r0 = n * D + j * K;
    *r1 = n * D + ((j + 1) * K < D ? (j + 1) * K : D);
  }
}

}  // namespace fusedloss
