// The stencil skeleton of the CPU kernels (docs/KERNELS.md, "Stencil"): images (P, Q, H, W) with
// any strides, a loss made of terms that start at each pixel (i, j) and read x[i, j], its lower
// neighbour x[i+1, j], its right neighbour x[i, j+1] and a weight w[i, j] broadcast by stride.
// First user: total variation (tv_kernel.cpp).
//
// A policy (A = acc_t<T>, V = Vectorized<A>) gives, for one vector of pixels, the terms' loss and
// their derivatives with respect to the three pixels they read:
//
//   struct MyPolicy {
//     template <bool kGrad>
//     void apply(const V& x, const V& down, const V& right, const V& w,
//                V& loss /* add to it */, V& d_self, V& d_down, V& d_right) const;
//   };
//
// Past the last row `down` is x itself, past the last column `right` is x itself (a difference
// that leaves the image is 0); w is 1 without a weight. The skeleton then writes the gradient
//
//   g[i, j] = scale * (d_self[i, j] + d_down[i-1, j] + d_right[i, j-1])
//
// (a derivative from outside the image is 0) through the gradient's strides, and the loss per
// image: loss[p * Q + q] = scale * (sum of the image's terms).
//
// Tiling: work items are (image, band of tv::band_rows(H, W) rows), in parallel (at::parallel_for).
// A band walks its rows top to bottom; every row of x (and of w) is read from memory once into a
// row buffer of A, converted and made contiguous there (any dtype, any strides: channels_last and
// non-contiguous images are read by stride), padded by one element (the last value repeated: a 0
// horizontal difference) and to whole vectors. The rows below a band's last row and above its
// first are its halo: the first is read for the vertical differences, and the terms of the row above
// are recomputed for their d_down (not summed). The derivatives of a row go to row buffers; one
// more sweep over them combines the gradient row. Memory traffic: x read once, the gradient
// written once, the weight read once; nothing image-sized is allocated.
//
// Determinism: each band's terms are summed lane-wise in A, then in lane order into a double; an
// image's band sums are added in band order. The band size depends on the image width alone, so
// the loss is bitwise the same for any thread count.
#pragma once

#include "vec.h"

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <fusedloss/common.h>
#include <fusedloss/tv.h>

#include <cstdint>
#include <vector>

namespace fusedloss::cpu::CPU_CAPABILITY {

// What the skeleton runs on: pointers, dtypes and strides (in elements) of (P, Q, H, W) tensors.
struct StencilArgs {
  int64_t P = 1, Q = 1, H = 0, W = 0;
  const void* x = nullptr;  // input, dtype T of the kernel
  int64_t xs[4] = {};
  const void* w = nullptr;  // weight or nullptr; any floating dtype `w_dtype`; stride 0 = broadcast
  c10::ScalarType w_dtype = c10::ScalarType::Float;
  int64_t ws[4] = {};
  void* g = nullptr;        // gradient (dtype T) or nullptr: loss only
  int64_t gs[4] = {};
  double scale = 1.0;       // multiplies the loss and the gradient ('mean': 1 / numel)
  void* loss = nullptr;     // (P * Q,) contiguous, acc_t<T>
};

namespace stencil_detail {

// dst[0 .. n) = src[k * stride] converted to A; dst[n .. padded) = dst[n - 1].
template <typename A, typename E>
inline void stage_row(A* dst, const E* src, int64_t stride, int64_t n, int64_t padded) {
  using IO = Io<E>;
  int64_t j = 0;
  if (stride == 1) {
    if constexpr (std::is_same_v<acc_t<E>, A>) {
      using V = Vectorized<A>;
      for (; j + IO::kPair <= n; j += IO::kPair) {
        V a, b;
        IO::load(src + j, a, b);
        a.store(dst + j);
        b.store(dst + j + V::size());
      }
    }
    for (; j < n; ++j) dst[j] = static_cast<A>(src[j]);
  } else if (stride == 0) {
    const A v = static_cast<A>(src[0]);
    for (; j < n; ++j) dst[j] = v;
  } else {
    for (; j < n; ++j) dst[j] = static_cast<A>(src[j * stride]);
  }
  const A last = dst[n - 1];
  for (j = n; j < padded; ++j) dst[j] = last;
}

// A weight row of any floating dtype (a per-row switch, outside the vector loop).
template <typename A>
inline void stage_weight_row(A* dst, const void* src, c10::ScalarType t, int64_t stride,
                             int64_t n, int64_t padded) {
  by_dtype(t, [&](auto tag) {
    using E = decltype(tag);
    stage_row(dst, static_cast<const E*>(src), stride, n, padded);
  });
}

// dst[k * stride] = src[k] rounded to T, k < n.
template <typename T, typename A>
inline void store_row(T* dst, int64_t stride, const A* src, int64_t n) {
  using IO = Io<T>;
  using V = Vectorized<A>;
  int64_t j = 0;
  if (stride == 1) {
    for (; j + IO::kPair <= n; j += IO::kPair) {
      IO::store(dst + j, V::loadu(src + j), V::loadu(src + j + V::size()));
    }
    for (; j < n; ++j) dst[j] = static_cast<T>(src[j]);
  } else {
    for (; j < n; ++j) dst[j * stride] = static_cast<T>(src[j]);
  }
}

}  // namespace stencil_detail

template <typename T, bool kGrad, bool kWeight, typename P>
void stencil2d(const P& policy, const StencilArgs& a) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t VS = V::size();
  const int64_t B = a.P * a.Q, H = a.H, W = a.W;
  A* loss_out = static_cast<A*>(a.loss);
  if (B == 0) return;
  if (H == 0 || W == 0) {
    for (int64_t b = 0; b < B; ++b) loss_out[b] = A(0);
    return;
  }
  const int64_t band = tv::band_rows(H, W);
  const int64_t nbands = (H + band - 1) / band;
  // W + 1 (the right neighbour of the last column) rounded up to whole vectors.
  const int64_t padded = ((W + 1 + VS - 1) / VS) * VS;
  const int64_t full = W / VS;               // whole vectors of real pixels
  const int64_t tail = W - full * VS;        // pixels in the last, partial vector
  std::vector<double> partial(B * nbands);
  const A scale = static_cast<A>(a.scale);
  const T* x = static_cast<const T*>(a.x);
  T* g = static_cast<T*>(a.g);

  // At least ~128K pixels per thread (tens of microseconds): a smaller image runs inline, since
  // waking a second thread costs more than it saves there, and on a busy machine a parallel region
  // waits for its slowest thread's next time slice (milliseconds: 80x the kernel at 0.9 MiB).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, band * W));
  at::parallel_for(0, B * nbands, grain, [&](int64_t t0, int64_t t1) {
    // Row buffers: x rows (ring of two: the current row and the one below), the weight row,
    // d_self (then the gradient row), d_down of this row and of the row above, d_right with one
    // leading 0 (d_right[j - 1] of column 0).
    std::vector<A> mem(padded * 7 + VS);
    A* xr[2] = {mem.data(), mem.data() + padded};
    A* wrow = mem.data() + 2 * padded;
    A* dself = mem.data() + 3 * padded;
    A* ddown[2] = {mem.data() + 4 * padded, mem.data() + 5 * padded};
    A* dright = mem.data() + 6 * padded + VS;  // dright[-1] exists
    const V one(1);

    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nbands, k = t % nbands;
      const int64_t p = b / a.Q, q = b % a.Q;
      const int64_t r0 = k * band, r1 = std::min(H, r0 + band);
      const T* xb = x + p * a.xs[0] + q * a.xs[1];
      const char* wb = nullptr;
      if constexpr (kWeight) {
        wb = static_cast<const char*>(a.w) +
             (p * a.ws[0] + q * a.ws[1]) * static_cast<int64_t>(c10::elementSize(a.w_dtype));
      }
      auto load_x = [&](A* dst, int64_t i) {
        stencil_detail::stage_row(dst, xb + i * a.xs[2], a.xs[3], W, padded);
      };
      auto load_w = [&](int64_t i) {
        if constexpr (kWeight) {
          stencil_detail::stage_weight_row(
              wrow, wb + i * a.ws[2] * static_cast<int64_t>(c10::elementSize(a.w_dtype)),
              a.w_dtype, a.ws[3], W, padded);
        }
      };
      // One row's terms: x0 the row, x1 the row below (x0 itself on the last row). Sum = whether
      // the terms count in this band's loss (the halo row above does not).
      auto row = [&](const A* x0, const A* x1, A* dd, bool sum, V& acc) {
        for (int64_t v = 0; v < full + (tail ? 1 : 0); ++v) {
          const int64_t j = v * VS;
          const V xv = V::loadu(x0 + j);
          const V w = kWeight ? V::loadu(wrow + j) : one;
          V l(0), ds, dn, dr;
          policy.template apply<kGrad>(xv, V::loadu(x1 + j), V::loadu(x0 + j + 1), w, l, ds, dn,
                                       dr);
          if (sum) acc = acc + (v < full ? l : V::set(V(0), l, tail));
          if constexpr (kGrad) {
            ds.store(dself + j);
            dn.store(dd + j);
            dr.store(dright + j);
          }
        }
      };

      V acc(0);
      int cur = 0;
      load_x(xr[cur], r0);
      if constexpr (kGrad) {
        if (r0 > 0) {  // halo above: the d_down of row r0 - 1
          load_x(xr[1], r0 - 1);
          load_w(r0 - 1);
          row(xr[1], xr[cur], ddown[1], false, acc);
        } else {
          std::fill(ddown[1], ddown[1] + padded, A(0));
        }
        dright[-1] = A(0);
      }
      for (int64_t i = r0; i < r1; ++i) {
        const int nxt = cur ^ 1;
        const bool last = i + 1 == H;
        if (!last) load_x(xr[nxt], i + 1);
        load_w(i);
        row(xr[cur], last ? xr[cur] : xr[nxt], ddown[0], true, acc);
        if constexpr (kGrad) {
          // g = scale * (d_self + d_down of the row above + d_right of the pixel to the left)
          for (int64_t j = 0; j < W; j += VS) {
            const V gv = (V::loadu(dself + j) + V::loadu(ddown[1] + j) +
                          V::loadu(dright + j - 1)) * V(scale);
            gv.store(dself + j);
          }
          stencil_detail::store_row(g + p * a.gs[0] + q * a.gs[1] + i * a.gs[2], a.gs[3], dself,
                                    W);
          std::swap(ddown[0], ddown[1]);
        }
        cur = nxt;
      }
      partial[t] = static_cast<double>(hsum(acc));
    }
  });

  for (int64_t b = 0; b < B; ++b) {
    double s = 0;
    for (int64_t k = 0; k < nbands; ++k) s += partial[b * nbands + k];
    loss_out[b] = static_cast<A>(s * a.scale);
  }
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
