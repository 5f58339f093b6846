// CPU vector infrastructure shared by every csrc/cpu/*_kernel.cpp: accumulation types, loads and
// stores per dtype as pairs of accumulation vectors, the exp of the softmax kernels, NaN-propagating
// max, horizontal sums, streaming stores, and the dtype / bool dispatch of the kernel entry points.
//
// Only for files compiled once per instruction set (setup.py compiles every *_kernel.cpp with
// -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 and the ISA's flags). Everything here lives in namespace
// fusedloss::cpu::CPU_CAPABILITY, so the three copies of each inline function are distinct symbols
// (no ODR clash between a copy compiled with AVX-512 and one without); the binding files (compiled
// once, without AVX flags) must not include it.
#pragma once

#ifndef CPU_CAPABILITY
#error "csrc/cpu/vec.h is for *_kernel.cpp files, compiled once per ISA (-DCPU_CAPABILITY=...)"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <fusedloss/common.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace fusedloss::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Accumulation type of an element type: float, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

template <typename A>
constexpr A kLowest = std::numeric_limits<A>::lowest();
template <typename A>
constexpr A kNaN = std::numeric_limits<A>::quiet_NaN();
template <typename A>
constexpr A kInf = std::numeric_limits<A>::infinity();

// ---------------------------------------------------------------------------------------------
// exp of arguments <= 0 (every exp of the softmax kernels is of x - max). It need not propagate
// NaN: rows with a NaN logit are caught through their lse instead (the lane max does propagate
// NaN). float, AVX-512: n = round(x log2 e), r = x - n ln2 (Cody-Waite), exp(r) by ATen's
// degree-5 polynomial (|r| <= ln2/2: <= 2e-7 relative), times 2^n by scalef; 0 below -87 (no
// denormals). Fewer instructions than Vectorized::exp_u20, which the other copies use (ATen's
// <= 20 ulp version of the same polynomial); Sleef's 1-ulp exp for double.
#if defined(CPU_CAPABILITY_AVX512)
inline Vectorized<float> vexp(const Vectorized<float>& v) {
  const __m512 x = v;
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.00828929059f), r, _mm512_set1_ps(0.0418978221f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166676521f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.499991506f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.999999701f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}
#else
inline Vectorized<float> vexp(const Vectorized<float>& v) { return v.exp_u20(); }
#endif
inline Vectorized<double> vexp(const Vectorized<double>& v) { return v.exp(); }

// expm1, scalar or lane-wise (Sleef's 1-ulp expm1), for code written once for both.
inline float vexpm1(float x) { return fusedloss::fl_expm1(x); }
inline double vexpm1(double x) { return fusedloss::fl_expm1(x); }
template <typename A>
inline Vectorized<A> vexpm1(const Vectorized<A>& v) {
  return v.expm1();
}

// max that propagates NaN (lane-wise).
template <typename V>
inline V vmax(const V& a, const V& b) {
  return at::vec::maximum(a, b);
}

// Sum of the lanes, in lane order.
template <typename V>
inline typename V::value_type hsum(const V& v) {
  alignas(64) typename V::value_type buf[V::size()];
  v.store(buf);
  typename V::value_type s = 0;
  for (int64_t i = 0; i < V::size(); ++i) s += buf[i];
  return s;
}

// Lane-wise ce::dev_rebase (csrc/include/fusedloss/cross_entropy.h): a partial sum
// a = sum v (m - x) holding weight om = sum v, moved from the max m to mn >= m. Adds nothing where
// om is 0 or the max did not rise (m may be -inf: 0 * inf would be NaN).
template <typename V>
inline V rebase(const V& a, const V& om, const V& m, const V& mn) {
  const V zero(0);
  return a + V::blendv(zero, om * (mn - m), (om != zero) & (mn > m));
}

// ---------------------------------------------------------------------------------------------
// Non-temporal ("streaming") stores of whole vectors, to kVecBytes-aligned addresses. An output
// far larger than the caches that the kernel does not read again: streamed, its lines skip the
// read-for-ownership an ordinary store does first (a third of the traffic) and do not evict what
// is being read. Every thread that streamed calls stream_fence() before its work ends.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kVecBytes = 64;
inline void stream_vec(float* p, const Vectorized<float>& v) { _mm512_stream_ps(p, v); }
inline void stream_vec(double* p, const Vectorized<double>& v) { _mm512_stream_pd(p, v); }
template <typename T>  // BFloat16, Half
inline void stream_vec(T* p, const Vectorized<T>& v) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
}
inline void stream_fence() { _mm_sfence(); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kVecBytes = 32;
inline void stream_vec(float* p, const Vectorized<float>& v) { _mm256_stream_ps(p, v); }
inline void stream_vec(double* p, const Vectorized<double>& v) { _mm256_stream_pd(p, v); }
template <typename T>
inline void stream_vec(T* p, const Vectorized<T>& v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
}
inline void stream_fence() { _mm_sfence(); }
#else
constexpr int64_t kVecBytes = 0;  // no streaming: the generic copy stores as usual
template <typename T, typename V>
inline void stream_vec(T* p, const V& v) {
  v.store(p);
}
inline void stream_fence() {}
#endif

// Streaming pays off only for an output well beyond the last-level cache.
constexpr int64_t kStreamMinBytes = int64_t(32) << 20;

// Whether p may take streaming stores (this copy streams, and p is vector-aligned).
inline bool stream_aligned(const void* p) {
  return kVecBytes > 0 && reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

// ---------------------------------------------------------------------------------------------
// Loads and stores of T memory as pairs of accumulation vectors. A "pair" (Io<T>::kPair =
// 2 * V::size() elements) is one Vectorized<BFloat16/Half>, converted to two Vectorized<float>;
// for float and double it is two vectors. load_n / store_n: the first n < kPair elements (the
// rest of the loaded pair is 0). stream: store with non-temporal stores (p vector-aligned).

template <typename T>
struct IoBase {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t kVec = V::size();
  static constexpr int64_t kPair = 2 * kVec;
  static inline void load_n(const T* p, int64_t n, V& a, V& b) {
    alignas(64) A buf[kPair];
    for (int64_t i = 0; i < kPair; ++i) buf[i] = i < n ? static_cast<A>(p[i]) : A(0);
    a = V::loadu(buf);
    b = V::loadu(buf + kVec);
  }
  static inline void store_n(T* p, int64_t n, const V& a, const V& b) {
    alignas(64) A buf[kPair];
    a.store(buf);
    b.store(buf + kVec);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
  }
  // Element stride s (any, 0 included): gather / scatter the first n <= kPair elements.
  static inline void load_strided(const T* p, int64_t s, int64_t n, V& a, V& b) {
    alignas(64) A buf[kPair];
    for (int64_t i = 0; i < kPair; ++i) buf[i] = i < n ? static_cast<A>(p[i * s]) : A(0);
    a = V::loadu(buf);
    b = V::loadu(buf + kVec);
  }
  static inline void store_strided(T* p, int64_t s, int64_t n, const V& a, const V& b) {
    alignas(64) A buf[kPair];
    a.store(buf);
    b.store(buf + kVec);
    for (int64_t i = 0; i < n; ++i) p[i * s] = static_cast<T>(buf[i]);
  }
};

template <typename T>
struct Io : IoBase<T> {  // float, double
  using V = typename IoBase<T>::V;
  static constexpr int64_t kVec = IoBase<T>::kVec;
  static inline void load(const T* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + kVec);
  }
  static inline void store(T* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + kVec);
  }
  static inline void stream(T* p, const V& a, const V& b) {
    stream_vec(p, a);
    stream_vec(p + kVec, b);
  }
};

template <typename T>
struct IoReduced : IoBase<T> {  // BFloat16, Half
  using V = Vectorized<float>;
  static_assert(Vectorized<T>::size() == 2 * Vectorized<float>::size(), "pair layout");
  static inline void load(const T* p, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
  static inline void store(T* p, const V& a, const V& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  static inline void stream(T* p, const V& a, const V& b) {
    stream_vec(p, at::vec::convert_from_float<T>(a, b));
  }
};
template <>
struct Io<c10::BFloat16> : IoReduced<c10::BFloat16> {};
template <>
struct Io<c10::Half> : IoReduced<c10::Half> {};

// ---------------------------------------------------------------------------------------------
// Dispatch.

// Calls f(std::true_type()) or f(std::false_type()): a run-time flag as a compile-time one.
template <typename F>
inline void with_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type());
  } else {
    f(std::false_type());
  }
}

// Calls f(std::integral_constant<int, i>()) for i in [0, N): a run-time mode as a compile-time one.
template <int N, int I = 0, typename F>
inline void with_mode(int i, F&& f) {
  if constexpr (I + 1 >= N) {
    f(std::integral_constant<int, I>());
  } else if (i == I) {
    f(std::integral_constant<int, I>());
  } else {
    with_mode<N, I + 1>(i, std::forward<F>(f));
  }
}

// Calls f(T()) (a value of the element type, as a tag: `using T = decltype(tag);`) for the
// supported floating dtypes; a clear error for any other.
template <typename F>
inline void by_dtype(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::ScalarType::Float:
      return f(float());
    case c10::ScalarType::Double:
      return f(double());
    case c10::ScalarType::BFloat16:
      return f(c10::BFloat16());
    case c10::ScalarType::Half:
      return f(c10::Half());
    default:
      TORCH_CHECK(false, "fusedloss CPU kernels: unsupported dtype ", t);
  }
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
