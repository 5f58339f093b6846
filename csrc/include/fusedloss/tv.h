// Total variation: the math of one pixel's terms, shared by the CPU (csrc/cpu/tv_kernel.cpp, on
// scalars and on at::vec vectors) and CUDA (csrc/cuda/tv.cu) kernels. Plain C++, no ATen types.
//
// The terms that start at pixel (i, j) read dv = x[i+1, j] - x[i, j] and dh = x[i, j+1] - x[i, j]
// (0 past the last row / column) and the weight w = w[i, j]:
//
//   l1:          w |dv| + w |dh|                 (anisotropic)
//   l2_squared:  w dv^2 + w dh^2
//   isotropic:   w sqrt(dv^2 + dh^2 + eps)
//
// Each pixel's terms are a function of (dv, dh) only, so its derivatives are two numbers, the
// "fluxes" fv = d terms / d dv and fh = d terms / d dh:
//
//   l1:          fv = w sgn(dv), fh = w sgn(dh)   (sgn(0) = 0, sgn(NaN) = NaN)
//   l2_squared:  fv = 2 w dv,    fh = 2 w dh
//   isotropic:   fv = w dv / n,  fh = w dh / n    (0 where n = 0)
//
// and the gradient of the whole image at (i, j) collects the fluxes of the terms that read x[i, j]:
// its own (as x[i, j] enters dv and dh with a minus sign) and those that start at its upper and
// left neighbours:
//
//   g[i, j] = fv[i-1, j] + fh[i, j-1] - fv[i, j] - fh[i, j]   (a flux outside the image is 0)
//
// Math type `V` is a float/double or a vector of them; the operations it needs come from `Ops`
// (ScalarOps below for scalars; the CPU kernel passes its own for at::vec vectors), so that the
// CPU vector code, the CPU scalar code and the CUDA kernels run these same lines.
#pragma once

#include <fusedloss/common.h>

namespace fusedloss::tv {

// norm argument of the device op (csrc/registration.cpp's tv_fwd), in _checks.TV_NORMS's order.
enum Norm : int { kL1 = 0, kL2Squared = 1, kIsotropic = 2 };

template <typename T>
struct ScalarOps {
  static FL_HOST_DEVICE T abs(T x) { return x < T(0) ? -x : x; }
  // sgn with sgn(0) = 0 and NaN kept: x > 0 ? 1 : x < 0 ? -1 : x
  static FL_HOST_DEVICE T sgn(T x) { return x > T(0) ? T(1) : (x < T(0) ? T(-1) : x); }
  // n = sqrt(n2) and inv = 1 / n, or 0 where n == 0 (the isotropic gradient at a flat pixel)
  static FL_HOST_DEVICE void norm(T n2, T& n, T& inv) {
    n = ::sqrt(n2);
    inv = n == T(0) ? T(0) : T(1) / n;
  }
};

#if defined(__CUDA_ARCH__)
// float on the device: one rsqrt.approx (2 ulp) for both. sqrt.rn and rcp.rn expand to a
// slow-path subroutine call whose calling convention made the isotropic gradient kernels spill.
template <>
FL_HOST_DEVICE void ScalarOps<float>::norm(float n2, float& n, float& inv) {
  const float r = rsqrtf(n2);
  const bool zero = n2 == 0.0f;
  n = zero ? 0.0f : n2 * r;
  inv = zero ? 0.0f : r;
}
#endif

// One pixel's terms: adds them to `loss` and, with Grad, sets the fluxes fv, fh. `w` is the
// pixel's weight (1 without one), eps >= 0 (isotropic only).
template <int kNorm, bool kGrad, typename Ops, typename V>
FL_HOST_DEVICE void pixel(const V& dv, const V& dh, const V& w, const V& eps, V& loss, V& fv,
                          V& fh) {
  if constexpr (kNorm == kL1) {
    loss = loss + w * (Ops::abs(dv) + Ops::abs(dh));
    if constexpr (kGrad) {
      fv = w * Ops::sgn(dv);
      fh = w * Ops::sgn(dh);
    }
  } else if constexpr (kNorm == kL2Squared) {
    loss = loss + w * (dv * dv + dh * dh);
    if constexpr (kGrad) {
      const V w2 = w + w;
      fv = w2 * dv;
      fh = w2 * dh;
    }
  } else {
    V n, inv;
    Ops::norm(dv * dv + dh * dh + eps, n, inv);
    loss = loss + w * n;
    if constexpr (kGrad) {
      const V c = w * inv;
      fv = c * dv;
      fh = c * dh;
    }
  }
}

// Rows per band of the stencil's tiling: a fixed function of the image width (never of the
// thread count), so that per-image sums of per-band partials are bitwise reproducible. About
// 32K pixels per band, at least 8 rows (each band re-reads one halo row).
FL_HOST_DEVICE long long band_rows(long long H, long long W) {
  long long r = W > 0 ? (32768 + W - 1) / W : H;
  if (r < 8) r = 8;
  return r < H ? r : (H > 0 ? H : 1);
}

}  // namespace fusedloss::tv
