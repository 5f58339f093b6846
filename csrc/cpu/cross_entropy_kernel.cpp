// Cross-entropy CPU kernels (docs/KERNELS.md), compiled once per instruction set by setup.py with
// -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (see cpu_isa.h); the bindings are in cross_entropy.cpp.
//
// Three paths, by the layout of the (N, C, D) input:
//  - rows: class stride 1 (the (N, C) logits of a language model). Per row, pass 1 reads the row
//    from memory once, in L1-sized chunks, each chunk twice: its max (lane-wise, NaN-propagating),
//    then exp(x - max) into several independent sum accumulators (plus the sums label smoothing
//    or probability targets need). With class-index targets the exp values are kept in a
//    per-thread row buffer (it stays in L2), so pass 2 writes the gradient with one multiply per
//    element: one exp per element in all. A softcapped row is first staged as softcapped float
//    logits in a per-thread row buffer, so the tanh is evaluated once per element.
//  - spatial: spatial stride 1 and D > 1 (segmentation logits (N, C, H*W)). A tile of consecutive
//    positions is one vector pair; the tile's C x pair logits are staged in a small buffer
//    (converted, softcapped) and every lane runs its own softmax over c.
//  - any other strides go through the rows path, with the rows that are not contiguous gathered
//    into (or, for the gradient, scattered from) per-thread row buffers.
// All math in float (double for double input); the per-row formulas are the shared header's.
#include "cross_entropy_kernel.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <fusedloss/cross_entropy.h>

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#ifndef CPU_CAPABILITY
#error "cross_entropy_kernel.cpp is compiled once per ISA by setup.py (-DCPU_CAPABILITY=...)"
#endif

namespace fusedloss::cpu::CPU_CAPABILITY {
namespace {

// A row's logsumexp, kept as its max m and log(sum exp(x - m)) too: p_c = exp((x_c - m) - log_s)
// and lse - x_y = (m - x_y) + log_s keep their digits for large logits, where lse = m + log_s
// itself is rounded to the precision of |m|.
template <typename A>
struct Lse {
  A m, log_s, lse;
};

template <typename A>
inline Lse<A> make_lse_log(A m, A log_s) {
  if (std::isnan(m) || m == std::numeric_limits<A>::infinity()) {
    return {kNaN<A>, kNaN<A>, kNaN<A>};  // NaN logit (the max propagates it), or +inf (as torch)
  }
  return {m, log_s, m + log_s};  // all -inf row: lowest + log(0) = -inf
}

template <typename A>
inline Lse<A> make_lse(A m, A s) {
  return make_lse_log(m, std::log(s));
}

// Merge lane-wise partial states (max m_l, sum s_l of exp(x - m_l)) into the row's.
template <typename A>
inline Lse<A> merge_lanes(const Vectorized<A>& m, const Vectorized<A>& s) {
  constexpr int64_t n = Vectorized<A>::size();
  alignas(64) A mb[n];
  m.store(mb);
  A M = kLowest<A>;
  for (int64_t l = 0; l < n; ++l) M = nan_max(M, mb[l]);
  if (std::isnan(M) || M == std::numeric_limits<A>::infinity()) return make_lse(M, A(0));
  return make_lse(M, hsum(s * vexp(m - Vectorized<A>(M))));  // all -inf row: S = 0
}

// Elements per chunk of pass 1: read twice (max, then exp-sum) while in L1.
constexpr int64_t kChunk = 2048;

// Lane-wise weight sums (counts without weight) of the smoothing sum's omega, which are the same
// for every row, so pass 1 does not add them up: entry k (VS values) holds the columns before
// pass 1's chunk k, the last entry the whole row. Lane l holds the columns c with c % VS == l.
template <typename A>
std::vector<A> lane_weights(int64_t C, const A* w) {
  using V = Vectorized<A>;
  constexpr int64_t VS = V::size(), P = 2 * VS;
  const int64_t Cf = C - C % P;
  std::vector<A> t;
  t.reserve(((C + kChunk - 1) / kChunk + 2) * VS);
  V acc(0);
  auto emit = [&]() {
    const size_t k = t.size();
    t.resize(k + VS);
    acc.store(t.data() + k);
  };
  for (int64_t c0 = 0; c0 < Cf; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, Cf);
    emit();
    if (w) {
      for (int64_t c = c0; c < c1; c += VS) acc = acc + V::loadu(w + c);
    } else {
      acc = acc + V(A((c1 - c0) / VS));
    }
  }
  if (Cf < C) {  // the tail: fewer than P columns
    emit();
    alignas(64) A buf[VS];
    acc.store(buf);
    for (int64_t c = Cf; c < C; ++c) buf[c % VS] += w ? w[c] : A(1);
    acc = V::loadu(buf);
  }
  emit();  // the whole row
  return t;
}

// ---------------------------------------------------------------------------------------------
// Rows path, class-index targets.

enum SumMode { kNoSum = 0, kSumX = 1, kSumWX = 2 };

// Per-thread scratch of the rows path: the exp(x - m_chunk) values of pass 1 and each chunk's
// (lane-wise) max, so that pass 2 needs no exp per element: p_c = e_c * exp(m_chunk - m - log_s).
template <typename A>
struct RowScratch {
  std::vector<A> e, m;
  void reserve(int64_t C) {
    constexpr int64_t P = 2 * Vectorized<A>::size();
    e.resize((C + P - 1) / P * P);
    m.resize(((C + kChunk - 1) / kChunk + 1) * Vectorized<A>::size());
  }
};

// Pass 1 over a contiguous row of C logits (already softcapped if softcap is on): the row's lse;
// for label smoothing `sum` gets sum_c (M - x_c) (kSumX) or sum_c w_c (M - x_c) (kSumWX), M the
// row max, from lane sums relative to the lane max, rebased with lane_w (lane_weights) when the
// max rises; each chunk is summed on its own, then added (fewer rounding steps). With STORE, e
// gets exp(x_c - m_chunk) (zero past C, up to a whole pair) and mc each chunk's max (a vector).
template <int MODE, bool STORE, typename X, typename A = acc_t<X>>
Lse<A> pass1_index(const X* x, int64_t C, const A* w, const A* lane_w, A& sum, A* e, A* mc) {
  using IO = Io<X>;
  using V = Vectorized<A>;
  constexpr int64_t P = IO::kPair;
  constexpr int64_t VS = V::size();
  V m(kLowest<A>);  // finite start: a lane that only sees -inf keeps s = 0 instead of NaN
  V s0(0), s1(0), s2(0), s3(0);
  V a0(0), a1(0), a2(0), a3(0);  // this chunk's smoothing sums
  V at(0);                       // the smoothing sum of the chunks before
  auto rescale = [&](const V& mn) {  // new running max: rescale the sums
    const V f = vexp(m - mn);
    s0 = s0 * f;
    s1 = s1 * f;
    s2 = s2 * f;
    s3 = s3 * f;
    if constexpr (MODE != kNoSum) {
      at = rebase(at, V::loadu(lane_w), m, mn);
      lane_w += VS;
      a0 = a1 = a2 = a3 = V(0);
    }
    m = mn;
    if constexpr (STORE) {
      m.store(mc);
      mc += VS;
    }
  };
  // One pair at column c: exp(x - m) into the sums sa, sb (and e), m - v into the smoothing sums
  // aa, ab, weighted by load_w's pair (in the tail x is v masked to -inf past C, v is m there).
  auto add_pair = [&](int64_t c, const V& x0, const V& x1, const V& v0, const V& v1, V& sa,
                      V& sb, V& aa, V& ab, auto&& load_w) {
    const V e0 = vexp(x0 - m), e1 = vexp(x1 - m);
    sa = sa + e0;
    sb = sb + e1;
    if constexpr (STORE) {
      e0.store(e + c);
      e1.store(e + c + VS);
    }
    if constexpr (MODE == kSumX) {
      aa = aa + (m - v0);
      ab = ab + (m - v1);
    } else if constexpr (MODE == kSumWX) {
      V w0, w1;
      load_w(c, w0, w1);
      aa = at::vec::fmadd(w0, m - v0, aa);
      ab = at::vec::fmadd(w1, m - v1, ab);
    }
  };
  auto load_w = [&](int64_t c, V& w0, V& w1) {
    w0 = V::loadu(w + c);
    w1 = V::loadu(w + c + VS);
  };
  const int64_t Cf = C - C % P;
  for (int64_t c0 = 0; c0 < Cf; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, Cf);
    V m0 = m, m1 = m;
    int64_t c = c0;
    for (; c + 2 * P <= c1; c += 2 * P) {
      V v0, v1, v2, v3;
      IO::load(x + c, v0, v1);
      IO::load(x + c + P, v2, v3);
      m0 = vmax(m0, vmax(v0, v1));
      m1 = vmax(m1, vmax(v2, v3));
    }
    if (c < c1) {
      V v0, v1;
      IO::load(x + c, v0, v1);
      m0 = vmax(m0, vmax(v0, v1));
    }
    rescale(vmax(m0, m1));
    for (c = c0; c + 2 * P <= c1; c += 2 * P) {
      V v0, v1, v2, v3;
      IO::load(x + c, v0, v1);
      IO::load(x + c + P, v2, v3);
      add_pair(c, v0, v1, v0, v1, s0, s1, a0, a1, load_w);
      add_pair(c + P, v2, v3, v2, v3, s2, s3, a2, a3, load_w);
    }
    if (c < c1) {
      V v0, v1;
      IO::load(x + c, v0, v1);
      add_pair(c, v0, v1, v0, v1, s0, s1, a0, a1, load_w);
    }
    if constexpr (MODE != kNoSum) at = at + ((a0 + a1) + (a2 + a3));
  }
  if (Cf < C) {  // tail of < P elements, its own chunk; zero-filled, masked to -inf for the softmax
    const int64_t n = C - Cf;
    const int64_t n0 = std::min<int64_t>(n, VS);
    V v0, v1;
    IO::load_n(x + Cf, n, v0, v1);
    const V ninf(-std::numeric_limits<A>::infinity());
    const V x0 = V::set(ninf, v0, n0);
    const V x1 = V::set(ninf, v1, n - n0);
    rescale(vmax(m, vmax(x0, x1)));
    add_pair(Cf, x0, x1, V::set(m, v0, n0), V::set(m, v1, n - n0), s0, s1, a0, a1,
             [&](int64_t c, V& w0, V& w1) { Io<A>::load_n(w + c, n, w0, w1); });
    if constexpr (MODE != kNoSum) at = at + (a0 + a1);
  }
  const Lse<A> L = merge_lanes<A>(m, (s0 + s1) + (s2 + s3));
  if constexpr (MODE != kNoSum) sum = hsum(rebase(at, V::loadu(lane_w), m, V(L.m)));
  return L;
}

// Pass 2 from pass 1's scratch: g_c = coef_a * p_c - coef_s * (WS ? w_c : 1), times
// 1 - (x_c / cap)^2 when CAPPED (x is then the softcapped logit). The target column is fixed by
// the caller.
template <bool CAPPED, bool WS, typename X, typename O, typename A>
void pass2_index(const X* x, const A* e, const A* mc, O* g, int64_t C, const A* w,
                 const Lse<A>& lse, A coef_a, A coef_s, A cap, bool stream) {
  using V = Vectorized<A>;
  constexpr int64_t P = Io<O>::kPair;
  constexpr int64_t VS = V::size();
  static_assert(Io<X>::kPair == P, "same pair width");
  const V vm(lse.m), vls(lse.log_s), va(coef_a), vs(coef_s), vcap(cap), one(1);
  V f;  // coef_a * exp(m_chunk - m - log_s), lane-wise
  auto grad = [&](int64_t c, const V& xv, const V& wv) {
    V r = V::loadu(e + c) * f;
    if constexpr (WS) {
      r = r - vs * wv;
    } else {
      r = r - vs;
    }
    if constexpr (CAPPED) {
      const V u = xv / vcap;
      r = r * (one - u * u);
    }
    return r;
  };
  auto pair = [&](int64_t c, V& g0, V& g1) {
    V x0, x1, w0, w1;
    if constexpr (CAPPED) Io<X>::load(x + c, x0, x1);
    if constexpr (WS) {
      w0 = V::loadu(w + c);
      w1 = V::loadu(w + c + VS);
    }
    g0 = grad(c, x0, w0);
    g1 = grad(c + VS, x1, w1);
  };
  auto next_chunk = [&]() {
    f = va * vexp((V::loadu(mc) - vm) - vls);
    mc += VS;
  };
  const int64_t Cf = C - C % P;
  for (int64_t c0 = 0; c0 < Cf; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, Cf);
    next_chunk();
    for (int64_t c = c0; c < c1; c += P) {
      V g0, g1;
      pair(c, g0, g1);
      if (stream) {
        Io<O>::stream(g + c, g0, g1);
      } else {
        Io<O>::store(g + c, g0, g1);
      }
    }
  }
  if (Cf < C) {
    const int64_t n = C - Cf;
    next_chunk();
    V x0, x1, w0, w1;
    if constexpr (CAPPED) Io<X>::load_n(x + Cf, n, x0, x1);
    if constexpr (WS) Io<A>::load_n(w + Cf, n, w0, w1);
    Io<O>::store_n(g + Cf, n, grad(Cf, x0, w0), grad(Cf + VS, x1, w1));
  }
}

template <typename A>
struct Ctx {
  int64_t C;
  const A* w;  // nullptr: all ones
  A W;         // sum of w
  const A* lane_w;  // lane_weights(C, w) with label smoothing (rows path), else nullptr
  A ls, z, scale, cap;
  int64_t ignore_index;
  bool capped;
  bool stream;  // write the gradient's whole pairs with streaming stores (rows path only)
};

template <typename O>
inline void fill(O* g, int64_t C, O v) {
  std::fill(g, g + C, v);
}

// One row, class-index target y (already checked). x contiguous (softcapped when CAPPED), g the
// row's contiguous gradient or nullptr (then scratch may be nullptr too).
template <int MODE, bool CAPPED, typename X, typename O, typename A>
void index_row(const X* x, O* g, const Ctx<A>& k, int64_t y, RowScratch<A>* scratch, A* loss_out,
               A* lse_out) {
  A sum = 0;
  const bool ignored = y == k.ignore_index;
  const bool grad = g != nullptr && !ignored;
  const Lse<A> L = grad ? pass1_index<MODE, true>(x, k.C, k.w, k.lane_w, sum, scratch->e.data(),
                                                  scratch->m.data())
                        : pass1_index<MODE, false>(x, k.C, k.w, k.lane_w, sum,
                                                   static_cast<A*>(nullptr),
                                                   static_cast<A*>(nullptr));
  const A lse = L.lse;
  *lse_out = lse;
  if (ignored) {
    *loss_out = A(0) * k.scale;
    if (g) fill(g, k.C, O(0));
    return;
  }
  const A xs_y = static_cast<A>(x[y]);
  const A wy = k.w ? k.w[y] : A(1);
  const A d = (L.m - xs_y) + L.log_s;  // lse - xs_y
  const ce::IndexRow<A> r =
      ce::index_row_diff<A>(lse, L.log_s, d, wy, k.W, sum, k.ls, k.z, k.C);
  *loss_out = r.loss * k.scale;
  if (!grad) return;
  if (!std::isfinite(lse)) {  // NaN or infinite logits: NaN gradient, as torch
    fill(g, k.C, O(kNaN<A>));
    return;
  }
  pass2_index<CAPPED, MODE == kSumWX>(x, scratch->e.data(), scratch->m.data(), g, k.C, k.w, L,
                                      k.scale * r.A, k.scale * r.smooth, k.cap, k.stream);
  A gy = ce::index_grad_target_diff(r, -d, wy);
  if constexpr (CAPPED) gy *= ce::softcap_grad(xs_y, k.cap);
  g[y] = static_cast<O>(k.scale * gy);
}

// ---------------------------------------------------------------------------------------------
// Rows path, probability targets. t'_c = keep * t_c + add (keep = 1 - ls, add = ls / C).

// Pass 1: the row's lse, sum_wt = sum_c w_c t'_c and sum_wtd = sum_c w_c t'_c (M - x_c), M the
// row max, from lane sums b relative to the lane max, rebased (with the lane's a) when it rises;
// each chunk is summed on its own, then added.
template <bool HAS_W, typename X, typename TT, typename A = acc_t<X>>
Lse<A> pass1_prob(const X* x, const TT* t, int64_t C, const A* w, A keep, A add, A& sum_wt,
                  A& sum_wtd) {
  using V = Vectorized<A>;
  constexpr int64_t P = Io<X>::kPair;
  constexpr int64_t VS = V::size();
  static_assert(Io<TT>::kPair == P, "same pair width");
  const V vkeep(keep), vadd(add);
  V m(kLowest<A>);
  V s0(0), s1(0), a0(0), a1(0), b0(0), b1(0);  // a: sum w t', b: sum w t' (m - x), per lane
  auto sums = [&](const V& v, const V& tv, const V& wv) {  // returns w t'
    V wt = at::vec::fmadd(vkeep, tv, vadd);
    if constexpr (HAS_W) wt = wt * wv;
    return wt;
  };
  const int64_t Cf = C - C % P;
  for (int64_t c0 = 0; c0 < Cf; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, Cf);
    V m0 = m, m1 = m;
    for (int64_t c = c0; c < c1; c += P) {
      V v0, v1;
      Io<X>::load(x + c, v0, v1);
      m0 = vmax(m0, v0);
      m1 = vmax(m1, v1);
    }
    const V mn = vmax(m0, m1);
    const V f = vexp(m - mn);
    s0 = s0 * f;
    s1 = s1 * f;
    b0 = rebase(b0, a0, m, mn);
    b1 = rebase(b1, a1, m, mn);
    m = mn;
    V ca0(0), ca1(0), cb0(0), cb1(0);  // this chunk's a and b: summed on their own, then added
    for (int64_t c = c0; c < c1; c += P) {
      V v0, v1, t0, t1;
      Io<X>::load(x + c, v0, v1);
      Io<TT>::load(t + c, t0, t1);
      s0 = s0 + vexp(v0 - m);
      s1 = s1 + vexp(v1 - m);
      V w0(1), w1(1);
      if constexpr (HAS_W) {
        w0 = V::loadu(w + c);
        w1 = V::loadu(w + c + VS);
      }
      const V wt0 = sums(v0, t0, w0), wt1 = sums(v1, t1, w1);
      ca0 = ca0 + wt0;
      ca1 = ca1 + wt1;
      cb0 = at::vec::fmadd(wt0, m - v0, cb0);
      cb1 = at::vec::fmadd(wt1, m - v1, cb1);
    }
    a0 = a0 + ca0;
    a1 = a1 + ca1;
    b0 = b0 + cb0;
    b1 = b1 + cb1;
  }
  if (Cf < C) {
    const int64_t n = C - Cf;
    const int64_t n0 = std::min<int64_t>(n, VS);
    V v0, v1, t0, t1, w0(1), w1(1);
    Io<X>::load_n(x + Cf, n, v0, v1);
    Io<TT>::load_n(t + Cf, n, t0, t1);
    if constexpr (HAS_W) Io<A>::load_n(w + Cf, n, w0, w1);
    const V ninf(-std::numeric_limits<A>::infinity()), zero(0);
    const V x0 = V::set(ninf, v0, n0), x1 = V::set(ninf, v1, n - n0);
    const V mn = vmax(m, vmax(x0, x1));
    const V f = vexp(m - mn);
    s0 = s0 * f;
    s1 = s1 * f;
    b0 = rebase(b0, a0, m, mn);
    b1 = rebase(b1, a1, m, mn);
    m = mn;
    s0 = s0 + vexp(x0 - m);
    s1 = s1 + vexp(x1 - m);
    const V wt0 = V::set(zero, sums(v0, t0, w0), n0);
    const V wt1 = V::set(zero, sums(v1, t1, w1), n - n0);
    a0 = a0 + wt0;
    a1 = a1 + wt1;
    b0 = at::vec::fmadd(wt0, V::set(zero, m - v0, n0), b0);
    b1 = at::vec::fmadd(wt1, V::set(zero, m - v1, n - n0), b1);
  }
  const Lse<A> L = merge_lanes<A>(m, s0 + s1);
  const V om = a0 + a1;
  sum_wt = hsum(om);
  sum_wtd = hsum(rebase(b0 + b1, om, m, V(L.m)));
  return L;
}

// g_c = coef_a * p_c - scale * w_c t'_c, times the softcap factor when CAPPED.
template <bool HAS_W, bool CAPPED, typename X, typename TT, typename O, typename A>
void pass2_prob(const X* x, const TT* t, O* g, int64_t C, const A* w, const Lse<A>& lse, A coef_a,
                A scale, A keep, A add, A cap, bool stream) {
  using V = Vectorized<A>;
  constexpr int64_t P = Io<X>::kPair;
  constexpr int64_t VS = V::size();
  const V vm(lse.m), vls(lse.log_s), va(coef_a), vsc(scale), vkeep(keep), vadd(add), vcap(cap);
  const V one(1);
  auto grad = [&](const V& v, const V& tv, const V& wv) {
    V wt = at::vec::fmadd(vkeep, tv, vadd);
    if constexpr (HAS_W) wt = wt * wv;
    V r = va * vexp((v - vm) - vls) - vsc * wt;
    if constexpr (CAPPED) {
      const V u = v / vcap;
      r = r * (one - u * u);
    }
    return r;
  };
  const int64_t Cf = C - C % P;
  for (int64_t c = 0; c < Cf; c += P) {
    V v0, v1, t0, t1, w0(1), w1(1);
    Io<X>::load(x + c, v0, v1);
    Io<TT>::load(t + c, t0, t1);
    if constexpr (HAS_W) {
      w0 = V::loadu(w + c);
      w1 = V::loadu(w + c + VS);
    }
    if (stream) {
      Io<O>::stream(g + c, grad(v0, t0, w0), grad(v1, t1, w1));
    } else {
      Io<O>::store(g + c, grad(v0, t0, w0), grad(v1, t1, w1));
    }
  }
  if (Cf < C) {
    const int64_t n = C - Cf;
    V v0, v1, t0, t1, w0(1), w1(1);
    Io<X>::load_n(x + Cf, n, v0, v1);
    Io<TT>::load_n(t + Cf, n, t0, t1);
    if constexpr (HAS_W) Io<A>::load_n(w + Cf, n, w0, w1);
    Io<O>::store_n(g + Cf, n, grad(v0, t0, w0), grad(v1, t1, w1));
  }
}

template <bool HAS_W, bool CAPPED, typename X, typename TT, typename O, typename A>
void prob_row(const X* x, const TT* t, O* g, const Ctx<A>& k, A* loss_out, A* lse_out) {
  const A keep = A(1) - k.ls, add = k.ls / A(k.C);
  A sum_wt = 0, sum_wtd = 0;
  const Lse<A> L = pass1_prob<HAS_W>(x, t, k.C, k.w, keep, add, sum_wt, sum_wtd);
  const A lse = L.lse;
  *lse_out = lse;
  const ce::ProbRow<A> r = ce::prob_row<A>(lse, L.log_s, sum_wt, sum_wtd, k.z);
  *loss_out = r.loss * k.scale;
  if (!g) return;
  if (!std::isfinite(lse)) {
    fill(g, k.C, O(kNaN<A>));
    return;
  }
  pass2_prob<HAS_W, CAPPED>(x, t, g, k.C, k.w, L, k.scale * r.A, k.scale, keep, add, k.cap,
                            k.stream);
}

// ---------------------------------------------------------------------------------------------
// Drivers.

[[noreturn]] void bad_target(int64_t y, int64_t C, int64_t ignore_index) {
  TORCH_CHECK_INDEX(false, "cross_entropy: target ", y, " is out of bounds for ", C,
                    " classes (valid: 0 <= target < ", C, ", or ignore_index = ", ignore_index,
                    ")");
  std::abort();  // unreachable
}

inline void check_target(int64_t y, int64_t C, int64_t ignore_index) {
  if (y != ignore_index && (y < 0 || y >= C)) bad_target(y, C, ignore_index);
}

template <typename A>
Ctx<A> make_ctx(const CrossEntropyArgs& a) {
  Ctx<A> k;
  k.C = a.C;
  k.w = static_cast<const A*>(a.weight);
  k.W = static_cast<A>(a.weight_sum);
  k.ls = static_cast<A>(a.label_smoothing);
  k.z = static_cast<A>(a.z_loss);
  k.scale = static_cast<A>(a.grad_scale);
  k.capped = a.softcap > 0;
  k.cap = k.capped ? static_cast<A>(a.softcap) : A(0);
  k.ignore_index = a.ignore_index;
  k.stream = false;
  k.lane_w = nullptr;
  return k;
}

// Calls f(std::integral_constant<int, MODE>) for the row's pass-1 sum mode.
template <typename A, typename F>
void with_sum_mode(const Ctx<A>& k, F&& f) {
  if (k.ls > A(0)) {
    if (k.w) {
      f(std::integral_constant<int, kSumWX>());
    } else {
      f(std::integral_constant<int, kSumX>());
    }
  } else {
    f(std::integral_constant<int, kNoSum>());
  }
}

// Softcap a contiguous buffer of acc values in place.
template <typename A>
void softcap_buffer(A* buf, int64_t C, A cap) {
  using V = Vectorized<A>;
  const V vcap(cap);
  int64_t c = 0;
  for (; c + V::size() <= C; c += V::size()) {
    (vcap * (V::loadu(buf + c) / vcap).tanh()).store(buf + c);
  }
  for (; c < C; ++c) buf[c] = ce::softcap_fwd(buf[c], cap);
}

// Contiguous row of T into the acc buffer, softcapped.
template <typename T, typename A>
void stage_softcap(const T* x, A* buf, int64_t C, A cap) {
  using V = Vectorized<A>;
  constexpr int64_t P = Io<T>::kPair;
  const V vcap(cap);
  int64_t c = 0;
  for (; c + P <= C; c += P) {
    V v0, v1;
    Io<T>::load(x + c, v0, v1);
    (vcap * (v0 / vcap).tanh()).store(buf + c);
    (vcap * (v1 / vcap).tanh()).store(buf + c + V::size());
  }
  for (; c < C; ++c) buf[c] = ce::softcap_fwd(static_cast<A>(x[c]), cap);
}

// Rows path: every layout that is not the spatial one. A tensor whose class stride is 1 is used
// in place; otherwise its row goes through a per-thread buffer (gathered before, or, for the
// gradient, scattered after). Probability targets take the buffers for all three unless all three
// have class stride 1.
template <typename T>
void run_rows(const CrossEntropyArgs& a) {
  using A = acc_t<T>;
  Ctx<A> k = make_ctx<A>(a);
  const int64_t C = a.C, D = a.D, rows = a.N * a.D;
  const T* x = static_cast<const T*>(a.input);
  T* g = static_cast<T*>(a.grad);
  const T* tp = static_cast<const T*>(a.target_prob);
  const bool prob = tp != nullptr;
  A* loss = static_cast<A*>(a.loss);
  A* lse = static_cast<A*>(a.lse);
  bool x_direct = a.in_sc == 1, g_direct = g == nullptr || a.gr_sc == 1;
  const bool t_direct = !prob || a.tg_sc == 1;
  if (prob && !(x_direct && g_direct && t_direct)) {
    x_direct = false;
    g_direct = g == nullptr;
  }
  const bool stage_x = k.capped || !x_direct;  // logits through xbuf (softcapped and/or gathered)
  const bool stage_t = prob && !x_direct;       // probability targets through tbuf
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  // Stream a large gradient of its own (not in place: there the row was just read and is in
  // cache) whose rows all start vector-aligned.
  k.stream = g != nullptr && g_direct && static_cast<const void*>(g) != a.input && D == 1 &&
             stream_aligned(g) && stream_aligned(g + a.gr_sn) &&
             rows * C * int64_t(sizeof(T)) >= kStreamMinBytes;

  std::vector<A> lane_w;
  if (!prob && k.ls > A(0)) {
    lane_w = lane_weights<A>(C, k.w);
    k.lane_w = lane_w.data();
  }

  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<A> xbuf(stage_x ? C : 0), gbuf(g_direct ? 0 : C), tbuf(stage_t ? C : 0);
    RowScratch<A> scratch;
    if (g && !prob) scratch.reserve(C);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / D, d = r - n * D;
      const T* xr = x + n * a.in_sn + d * a.in_sd;
      T* gr = g ? g + n * a.gr_sn + d * a.gr_sd : nullptr;
      A* gb = g_direct ? nullptr : gbuf.data();
      A* xb = xbuf.data();
      if (stage_x) {
        if (x_direct) {
          stage_softcap(xr, xb, C, k.cap);
        } else {
          for (int64_t c = 0; c < C; ++c) xb[c] = static_cast<A>(xr[c * a.in_sc]);
          if (k.capped) softcap_buffer(xb, C, k.cap);
        }
      }
      if (!prob) {
        const int64_t y = a.target_index[r];
        check_target(y, C, k.ignore_index);
        with_sum_mode(k, [&](auto mode) {
          constexpr int M = decltype(mode)::value;
          if (!stage_x) {
            if (gb) {
              index_row<M, false>(xr, gb, k, y, &scratch, loss + r, lse + r);
            } else {
              index_row<M, false>(xr, gr, k, y, &scratch, loss + r, lse + r);
            }
            return;
          }
          with_bool(k.capped, [&](auto cp) {
            constexpr bool CP = decltype(cp)::value;
            const A* xs = xb;
            if (gb) {
              index_row<M, CP>(xs, gb, k, y, &scratch, loss + r, lse + r);
            } else {
              index_row<M, CP>(xs, gr, k, y, &scratch, loss + r, lse + r);
            }
          });
        });
      } else {
        const T* tr = tp + n * a.tg_sn + d * a.tg_sd;
        with_bool(k.w != nullptr, [&](auto hw) {
          constexpr bool HW = decltype(hw)::value;
          if (x_direct && !stage_x) {  // all in place
            prob_row<HW, false>(xr, tr, gr, k, loss + r, lse + r);
          } else if (x_direct) {  // in place, softcapped logits staged
            prob_row<HW, true>(static_cast<const A*>(xb), tr, gr, k, loss + r, lse + r);
          } else {  // all through buffers
            A* tb = tbuf.data();
            for (int64_t c = 0; c < C; ++c) tb[c] = static_cast<A>(tr[c * a.tg_sc]);
            with_bool(k.capped, [&](auto cp) {
              prob_row<HW, decltype(cp)::value>(static_cast<const A*>(xb),
                                                static_cast<const A*>(tb), gb, k, loss + r,
                                                lse + r);
            });
          }
        });
      }
      if (gr && gb) {
        for (int64_t c = 0; c < C; ++c) gr[c * a.gr_sc] = static_cast<T>(gb[c]);
      }
    }
    if (k.stream) stream_fence();
  });
}

constexpr int64_t kPrefetchTiles = 4;

// Spatial path: input, gradient and probability target have spatial stride 1 (D > 1). One work
// item is a tile of P = one pair of consecutive positions d of one n; lane l is row (n, d0 + l).
template <typename T, int MODE, bool PROB, bool HAS_W>
void run_spatial_impl(const CrossEntropyArgs& a) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = Io<T>;
  constexpr int64_t P = IO::kPair;
  constexpr int64_t VS = V::size();
  const Ctx<A> k = make_ctx<A>(a);
  const int64_t N = a.N, C = a.C, D = a.D;
  const int64_t tiles = (D + P - 1) / P;
  const T* x = static_cast<const T*>(a.input);
  T* g = static_cast<T*>(a.grad);
  const T* tp = static_cast<const T*>(a.target_prob);
  A* loss = static_cast<A*>(a.loss);
  A* lse_out = static_cast<A*>(a.lse);
  const A keep = A(1) - k.ls, add = k.ls / A(C);
  const int64_t grain = std::max<int64_t>(1, 16384 / (C * P));

  at::parallel_for(0, N * tiles, grain, [&](int64_t i0, int64_t i1) {
    std::vector<A> xs(C * P);                 // staged (softcapped) logits, [c][lane]
    std::vector<A> es(g ? C * P : 0);         // exp(x - m), [c][lane]
    std::vector<A> wts(PROB ? C * P : 0);     // probability mode: w_c t'_c, [c][lane]
    alignas(64) A mb[P], sb[P], lsb[P], ab[P], bb[P], qab[P], csb[P], fixm[P], fixv[P];
    alignas(64) A db[P], eb[P], wyb[P];  // class-index mode: lse - xs_y, expm1(xs_y - lse), w_y
    ce::IndexRow<A> rows[P];
    int64_t ys[P];
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n = it / tiles, d0 = (it - n * tiles) * P;
      const int64_t np = std::min(P, D - d0);
      const int64_t row0 = n * D + d0;
      if constexpr (!PROB) {
        for (int64_t l = 0; l < np; ++l) {
          ys[l] = a.target_index[row0 + l];
          check_target(ys[l], C, k.ignore_index);
        }
      }
      // Stage and max.
      const T* xb = x + n * a.in_sn + d0;
      const V vcap(k.cap);
      V m0(kLowest<A>), m1(kLowest<A>);
      for (int64_t c = 0; c < C; ++c) {
        // C strided streams, one pair each per tile: fetch a few tiles ahead (past the end of the
        // row it only fetches a line we do not need).
        const char* ahead = reinterpret_cast<const char*>(xb + c * a.in_sc + kPrefetchTiles * P);
        for (int64_t b = 0; b < P * int64_t(sizeof(T)); b += 64) __builtin_prefetch(ahead + b);
        V v0, v1;
        if (np == P) {
          IO::load(xb + c * a.in_sc, v0, v1);
        } else {
          IO::load_n(xb + c * a.in_sc, np, v0, v1);
        }
        if (k.capped) {
          v0 = vcap * (v0 / vcap).tanh();
          v1 = vcap * (v1 / vcap).tanh();
        }
        v0.store(xs.data() + c * P);
        v1.store(xs.data() + c * P + VS);
        m0 = vmax(m0, v0);
        m1 = vmax(m1, v1);
      }
      // Sums; the lane max m is final here, so the sums of m - x need no rebase.
      V s0(0), s1(0), a0(0), a1(0), b0(0), b1(0);
      const V vkeep(keep), vadd(add);
      for (int64_t c = 0; c < C; ++c) {
        const V v0 = V::loadu(xs.data() + c * P), v1 = V::loadu(xs.data() + c * P + VS);
        const V e0 = vexp(v0 - m0), e1 = vexp(v1 - m1);
        s0 = s0 + e0;
        s1 = s1 + e1;
        if (g) {
          e0.store(es.data() + c * P);
          e1.store(es.data() + c * P + VS);
        }
        if constexpr (PROB) {
          V t0, t1;
          const T* tb = tp + n * a.tg_sn + c * a.tg_sc + d0;
          if (np == P) {
            IO::load(tb, t0, t1);
          } else {
            IO::load_n(tb, np, t0, t1);
          }
          V wt0 = at::vec::fmadd(vkeep, t0, vadd), wt1 = at::vec::fmadd(vkeep, t1, vadd);
          if constexpr (HAS_W) {
            const V wc(k.w[c]);
            wt0 = wt0 * wc;
            wt1 = wt1 * wc;
          }
          wt0.store(wts.data() + c * P);
          wt1.store(wts.data() + c * P + VS);
          a0 = a0 + wt0;
          a1 = a1 + wt1;
          b0 = at::vec::fmadd(wt0, m0 - v0, b0);
          b1 = at::vec::fmadd(wt1, m1 - v1, b1);
        } else if constexpr (MODE == kSumX) {
          a0 = a0 + (m0 - v0);
          a1 = a1 + (m1 - v1);
        } else if constexpr (MODE == kSumWX) {
          const V wc(k.w[c]);
          a0 = at::vec::fmadd(wc, m0 - v0, a0);
          a1 = at::vec::fmadd(wc, m1 - v1, a1);
        }
      }
      m0.store(mb);
      m1.store(mb + VS);
      s0.store(sb);
      s1.store(sb + VS);
      a0.store(ab);
      a1.store(ab + VS);
      b0.store(bb);
      b1.store(bb + VS);
      s0.log().store(lsb);
      s1.log().store(lsb + VS);
      // Per-lane row results and gradient coefficients.
      for (int64_t l = 0; l < P; ++l) {
        qab[l] = csb[l] = fixm[l] = fixv[l] = db[l] = 0;
        if (l >= np) continue;
        const Lse<A> L = make_lse_log(mb[l], lsb[l]);
        const A lse = L.lse;
        lse_out[row0 + l] = lse;
        if constexpr (PROB) {
          const ce::ProbRow<A> r = ce::prob_row<A>(lse, L.log_s, ab[l], bb[l], k.z);
          loss[row0 + l] = r.loss * k.scale;
          qab[l] = k.scale * r.A / sb[l];  // p = e / s
          csb[l] = k.scale;
        } else {
          const int64_t y = ys[l];
          if (y == k.ignore_index) {
            loss[row0 + l] = A(0) * k.scale;
            fixm[l] = 1;
            fixv[l] = 0;
            continue;
          }
          const A xs_y = xs[y * P + l];
          const A wy = k.w ? k.w[y] : A(1);
          const A d = (L.m - xs_y) + L.log_s;
          const ce::IndexRow<A> r =
              ce::index_row_diff<A>(lse, L.log_s, d, wy, k.W, ab[l], k.ls, k.z, C);
          rows[l] = r;
          db[l] = d;
          wyb[l] = wy;
          loss[row0 + l] = r.loss * k.scale;
          qab[l] = k.scale * r.A / sb[l];
          csb[l] = k.scale * r.smooth;
        }
        if (!std::isfinite(lse)) {
          fixm[l] = 1;
          fixv[l] = kNaN<A>;
        }
      }
      if (!g) continue;
      // Gradient.
      const V zero(0), one(1);
      const V qa0 = V::loadu(qab), qa1 = V::loadu(qab + VS);
      const V cs0 = V::loadu(csb), cs1 = V::loadu(csb + VS);
      const V fm0 = V::loadu(fixm) != zero, fm1 = V::loadu(fixm + VS) != zero;
      const V fv0 = V::loadu(fixv), fv1 = V::loadu(fixv + VS);
      T* gb = g + n * a.gr_sn + d0;
      for (int64_t c = 0; c < C; ++c) {
        V g0 = qa0 * V::loadu(es.data() + c * P), g1 = qa1 * V::loadu(es.data() + c * P + VS);
        if constexpr (PROB) {
          g0 = g0 - cs0 * V::loadu(wts.data() + c * P);
          g1 = g1 - cs1 * V::loadu(wts.data() + c * P + VS);
        } else if constexpr (MODE == kSumWX) {
          const V wc(k.w[c]);
          g0 = g0 - cs0 * wc;
          g1 = g1 - cs1 * wc;
        } else {
          g0 = g0 - cs0;
          g1 = g1 - cs1;
        }
        if (k.capped) {
          const V u0 = V::loadu(xs.data() + c * P) / vcap;
          const V u1 = V::loadu(xs.data() + c * P + VS) / vcap;
          g0 = g0 * (one - u0 * u0);
          g1 = g1 * (one - u1 * u1);
        }
        g0 = V::blendv(g0, fv0, fm0);
        g1 = V::blendv(g1, fv1, fm1);
        if (np == P) {
          IO::store(gb + c * a.gr_sc, g0, g1);
        } else {
          IO::store_n(gb + c * a.gr_sc, np, g0, g1);
        }
      }
      if constexpr (!PROB) {  // accurate target column
        (zero - V::loadu(db)).expm1().store(eb);
        (zero - V::loadu(db + VS)).expm1().store(eb + VS);
        for (int64_t l = 0; l < np; ++l) {
          const int64_t y = ys[l];
          if (y == k.ignore_index || fixm[l] != 0) continue;
          A gy = ce::index_grad_target_em1(rows[l], eb[l], wyb[l]);
          if (k.capped) gy *= ce::softcap_grad(xs[y * P + l], k.cap);
          gb[y * a.gr_sc + l] = static_cast<T>(k.scale * gy);
        }
      }
    }
  });
}

template <typename T>
void run_spatial(const CrossEntropyArgs& a) {
  const bool has_w = a.weight != nullptr;
  if (a.target_prob) {
    with_bool(has_w, [&](auto hw) { run_spatial_impl<T, kNoSum, true, decltype(hw)::value>(a); });
    return;
  }
  Ctx<acc_t<T>> k = make_ctx<acc_t<T>>(a);
  with_sum_mode(k, [&](auto mode) { run_spatial_impl<T, decltype(mode)::value, false, false>(a); });
}

template <typename T>
void cross_entropy_typed(const CrossEntropyArgs& a) {
  if (a.N * a.D == 0) return;
  const bool prob = a.target_prob != nullptr;
  const bool has_grad = a.grad != nullptr;
  const bool spatial = a.D > 1 && a.in_sd == 1 && (!has_grad || a.gr_sd == 1) &&
                       (!prob || a.tg_sd == 1);
  if (spatial) {
    run_spatial<T>(a);
  } else {
    run_rows<T>(a);
  }
}

}  // namespace

void cross_entropy_kernel(const CrossEntropyArgs& args) {
  by_dtype(args.dtype, [&](auto tag) { cross_entropy_typed<decltype(tag)>(args); });
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
