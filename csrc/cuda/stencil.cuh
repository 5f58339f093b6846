// The CUDA stencil skeleton (docs/KERNELS.md, "Stencil"): images (P, Q, H, W) with any strides and
// a loss made of terms that start at each pixel (i, j), reading x[i, j], x[i+1, j], x[i, j+1] and a
// weight w[i, j] broadcast by stride. The same policy interface as the CPU skeleton
// (csrc/cpu/stencil.h), on scalars of the accumulation type:
//
//   struct Policy {
//     template <bool kGrad>
//     __device__ void apply(A x, A down, A right, A w, A& loss /* add */, A& d_self, A& d_down,
//                           A& d_right) const;
//   };
//
// (past the last row `down` is x, past the last column `right` is x: a difference leaving the
// image is 0; w is 1 without a weight). Gradient g[i, j] = scale * (d_self[i, j] + d_down[i-1, j]
// + d_right[i, j-1]).
//
// Launch: one thread per column, kStencilThreads columns per block, one band of tv::band_rows(H, W)
// rows (the CPU's bands) per block, one image per block: a 1-D grid of P*Q x bands x column tiles.
// A thread walks its column down the band, keeping x[i, j] and d_down of the row above in
// registers (the band's first row recomputes the halo row above), and recomputes the terms of its
// left neighbour for d_right[i, j-1] (no shared memory, no barrier in the walk). Each block sums its
// terms (block_sum, a fixed tree) times scale into its own slot of `partial`; the host adds an
// image's slots in order. Deterministic, no atomics. 64-bit offsets.
#pragma once

#include <fusedloss/tv.h>

#include <cstdint>

#include "common.cuh"

namespace fusedloss {
namespace cuda {

constexpr int kStencilThreads = 256;

struct StencilParams {
  int64_t Q, H, W;
  int64_t xs[4];
  int64_t ws[4];
  int64_t gs[4];
  int64_t bands, col_tiles, band;
};

template <typename T, typename WT, typename A, bool kGrad, bool kWeight, typename P>
__global__ void __launch_bounds__(kStencilThreads)
    stencil2d_kernel(const T* __restrict__ x, const WT* __restrict__ w, T* __restrict__ g,
                     A* __restrict__ partial, StencilParams sp, A scale, P policy) {
  const int64_t blk = blockIdx.x;
  const int64_t tiles = sp.bands * sp.col_tiles;
  const int64_t b = blk / tiles, t = blk - b * tiles;
  const int64_t p = b / sp.Q, q = b - p * sp.Q;
  const int64_t k = t / sp.col_tiles, ct = t - k * sp.col_tiles;
  const int64_t H = sp.H, W = sp.W;
  const int64_t r0 = k * sp.band;
  const int64_t r1 = r0 + sp.band < H ? r0 + sp.band : H;
  const int64_t j = ct * kStencilThreads + threadIdx.x;
  const bool col = j < W;
  const T* xb = x + p * sp.xs[0] + q * sp.xs[1];
  const WT* wb = kWeight ? w + p * sp.ws[0] + q * sp.ws[1] : nullptr;
  // x[i, jj] (jj in [0, W), i in [0, H)), as A
  auto ld = [&](int64_t i, int64_t jj) -> A {
    return static_cast<A>(xb[i * sp.xs[2] + jj * sp.xs[3]]);
  };
  auto wt = [&](int64_t i, int64_t jj) -> A {
    if constexpr (kWeight) {
      return static_cast<A>(wb[i * sp.ws[2] + jj * sp.ws[3]]);
    } else {
      return A(1);
    }
  };
  // The terms that start at (i, jj) given x[i, jj] = xc; returns them through the references.
  auto terms = [&](int64_t i, int64_t jj, A xc, A& loss, A& ds, A& dd, A& dr, A& xdown) {
    xdown = i + 1 < H ? ld(i + 1, jj) : xc;
    const A xr = jj + 1 < W ? ld(i, jj + 1) : xc;
    policy.template apply<kGrad>(xc, xdown, xr, wt(i, jj), loss, ds, dd, dr);
  };

  A acc = A(0);
  if (col) {
    A xc = ld(r0, j);
    A xl = j > 0 ? ld(r0, j - 1) : A(0);
    A dd_up = A(0);
    if constexpr (kGrad) {
      if (r0 > 0) {  // the halo row above: its d_down
        A l = A(0), ds, dr, xd;
        terms(r0 - 1, j, ld(r0 - 1, j), l, ds, dd_up, dr, xd);
      }
    }
    for (int64_t i = r0; i < r1; ++i) {
      A ds = A(0), dd = A(0), dr = A(0), xd;
      terms(i, j, xc, acc, ds, dd, dr, xd);
      if constexpr (kGrad) {
        A dr_left = A(0), xld = A(0);
        if (j > 0) {
          A l = A(0), ds_l, dd_l;
          terms(i, j - 1, xl, l, ds_l, dd_l, dr_left, xld);
        }
        const A gv = ((ds + dd_up) + dr_left) * scale;
        g[p * sp.gs[0] + q * sp.gs[1] + i * sp.gs[2] + j * sp.gs[3]] = static_cast<T>(gv);
        dd_up = dd;
        xl = xld;
      }
      xc = xd;
    }
  }
  __shared__ BlockReduceStorage<SumState<A>, kStencilThreads> sh;
  const A total = block_sum<A, kStencilThreads>(acc, sh);
  if (threadIdx.x == 0) partial[blk] = total * scale;
}

}  // namespace cuda
}  // namespace fusedloss
