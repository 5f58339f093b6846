// The softmax-row skeleton of the CPU kernels: one online-softmax reduction per row of an
// (N, C, D) input (rows are the N*D positions (n, d), the softmax runs over C), with the loss's
// math as a policy. Today's users: cross-entropy with class-index and with probability targets
// (cross_entropy_kernel.cpp) and the lse-only policy below; next softmax focal, Dice's softmax,
// linear-CE chunks.
//
// What the skeleton does, for every layout:
//  - pass 1 per row: the row's max m and s = sum exp(x - m) (lse = m + log s, kept as (m, log_s):
//    see Lse), plus the policy's extra sums (below), in L1-sized chunks (each chunk read twice:
//    its max, then the sums), rescaled when the running max rises;
//  - the epilogue (policy): from (m, log_s) and the sums to the row's outputs and its gradient
//    coefficients;
//  - pass 2, when a gradient is asked for: g_j = policy.grad(k, q_j, operands of j), with
//    q_j = pscale * p_j handed over by the skeleton (p_j from the exp values that pass 1 kept, or
//    recomputed: kStoreExp), then times the softcap factor 1 - (xs_j / cap)^2 when softcap is on,
//    then one column (fix_col) overwritten with the policy's fix_val (times the same factor).
//    A row whose lse is not finite (NaN or +inf logits) gets a NaN gradient, an ignored row
//    exactly 0;
//  - softcap: xs = cap * tanh(x / cap) replaces the logits (staged once per row);
//  - per-row loss (policies with kRowLoss = true: the epilogue leaves the row's loss in
//    out.loss): stored per row (RowsLayout::row_loss) or, the reduced output of a 'mean' or
//    'sum', summed over the fixed blocks of rows of row_blocks.h (RowsLayout::block_loss), each
//    block by one thread in row order (deterministic, and a few floats instead of one per row).
//    Policies without kRowLoss write their outputs themselves in the epilogue;
//  - layouts: rows (class stride 1: the (N, C) logits of a language model), spatial (D > 1 and
//    spatial stride 1 for the input, gradient and element operand: segmentation (N, C, H*W); lanes
//    of a vector are rows there; also a few classes at other position strides, channels-last,
//    through gathered tiles), and every other stride through per-thread row buffers
//    (gathered, or scattered for the gradient); large gradients of their own are written with
//    streaming stores (rows path).
//
// A policy, for accumulation type A (float, or double for double input), V = Vectorized<A>:
//
//   struct MyPolicy {
//     static constexpr int kSums = 1;             // extra lane sums of pass 1 (may be 0)
//     static constexpr SumKind kKinds[] = {...};  // how each rebases (SumKind), kSums entries
//     static constexpr int kCoefs = 1;            // gradient coefficients per row (may be 0)
//     static constexpr bool kElem = false;        // reads a per-element operand t, (N, C, D)
//     static constexpr bool kStoreExp = true;     // pass 2 from pass 1's exp values
//     static constexpr bool kGradReadsX = false;  // grad() reads v.x
//     static constexpr bool kClassOperand = false;  // reads class_operand, (C,), as v.w
//     static constexpr Aux kAux = Aux::kNone;     // the epilogue's aux value (see Aux)
//     static constexpr bool kRowLoss = false;     // optional: the epilogue sets out.loss
//     const A* class_operand;                     // the (C,) operand (class weights), if read
//     const A* lane_table;                        // lane_sums(C, w) for SumKind::kDevTable
//     struct Row { int64_t col; bool ignored; ... };  // col: logit the epilogue reads (-1: none)
//     Row row(int64_t r) const;                   // per-row setup from the target (may throw)
//     template <bool TAIL>                        // add one vector's terms into acc; in the
//     void sums(V (&acc)[kSums], const Lanes<V>& v, const V& m, int64_t n) const;
//                                                 // tail of a row only lanes < n are columns
//     template <typename W>                       // W = A or V: written once for both
//     W aux(const W& m, const W& log_s, const W& x_col) const;
//     void epilogue(const Row& row, int64_t r, const Lse<A>& L, const A* sums, A x_col, A aux,
//                   RowOut<A, kCoefs>& out) const;  // writes the row's outputs (loss, lse...)
//                                                 // and fills out (out.want_grad: a gradient
//                                                 // is wanted for this row)
//     V grad(const V (&k)[kCoefs], const V& q, const Lanes<V>& v) const;
//   };
//
// Lanes<V>: x (the logits as used, softcapped), e (exp(x - m)), t (element operand), w (class
// operand), one vector of columns (rows path) or of rows at one column (spatial path; w is then
// w[c] broadcast). Sums are lane-wise, relative to the running max m; the skeleton keeps them
// right when m rises (SumKind) and reduces them to per-row values, relative to the row's max
// L.m, for the epilogue. See cross_entropy_kernel.cpp for the two cross-entropy policies and
// LsePolicy below for the smallest one.
#pragma once

#include "vec.h"

#include <ATen/Parallel.h>
#include <fusedloss/cross_entropy.h>
#include <fusedloss/row_blocks.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fusedloss::cpu::CPU_CAPABILITY {

// How one extra pass-1 sum follows the running max m (all sums are lane-wise):
//   kPlain:    does not depend on m (a weight sum omega = sum v).
//   kExp:      sum u exp(x - m): multiplied by exp(m - m') when the max rises to m'.
//   kDev:      sum v (m - x): plus omega (m' - m), omega = the kPlain sum just before it
//              (index - 1); ce::dev_rebase. Summed from non-negative terms: no cancellation.
//   kDevTable: the same with omega the same for every row (class weights: sum_c w_c), read from
//              the policy's lane_table (lane_sums(C, w)) instead of being summed per row.
enum class SumKind { kPlain, kExp, kDev, kDevTable };

// When the skeleton computes the policy's aux(m, log_s, x_col) for the epilogue: never, only for
// rows whose gradient is computed, or always. A transcendental of the row's target logit (e.g.
// expm1(x_y - lse) = p_y - 1) goes there, not into the epilogue: the spatial path evaluates it for
// a whole tile of rows in one vector call.
enum class Aux { kNone, kForGrad, kAlways };

// A row's logsumexp, kept as its max m and log(sum exp(x - m)) too: p_c = exp((x_c - m) - log_s)
// and lse - x_y = (m - x_y) + log_s keep their digits for large logits, where lse = m + log_s
// itself is rounded to the precision of |m|.
template <typename A>
struct Lse {
  A m, log_s, lse;
};

template <typename A>
inline Lse<A> make_lse_log(A m, A log_s) {
  if (std::isnan(m) || m == kInf<A>) {
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
  if (std::isnan(M) || M == kInf<A>) return make_lse(M, A(0));
  return make_lse(M, hsum(s * vexp(m - Vectorized<A>(M))));  // all -inf row: S = 0
}

// Elements per chunk of pass 1: read twice (max, then exp-sum) while in L1.
constexpr int64_t kChunk = 2048;

// The lane table of SumKind::kDevTable: lane-wise sums of w (1 each without w) over the columns
// before each of pass 1's chunks of a row of C (entry k, V::size() values; lane l holds the
// columns c with c % V::size() == l), the last entry over the whole row.
template <typename A>
std::vector<A> lane_sums(int64_t C, const A* w) {
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

// What a policy's sums() and grad() see of one vector.
template <typename V>
struct Lanes {
  V x, e, t, w;
};

// The epilogue's result for one row.
template <typename A, int K>
struct RowOut {
  A pscale = 0;           // the gradient is grad(k, pscale * p_j, ...)
  A k[K > 0 ? K : 1];     // the policy's gradient coefficients
  int64_t fix_col = -1;   // a column whose gradient is fix_val instead (-1: none)
  A fix_val = 0;          // (before the softcap factor)
  bool want_grad = false;  // set by the skeleton: the row's gradient will be computed
  A loss = 0;             // the row's loss (policies with kRowLoss)
};

// Whether policy P has kRowLoss = true (the epilogue sets out.loss; the skeleton stores or sums it).
template <typename P, typename = void>
struct row_loss_policy : std::false_type {};
template <typename P>
struct row_loss_policy<P, std::void_t<decltype(P::kRowLoss)>> : std::bool_constant<P::kRowLoss> {};

// Zero-fills the lanes >= n of v in the tail of a row (nothing otherwise).
template <bool TAIL, typename V>
inline V tail_mask(const V& v, int64_t n) {
  if constexpr (TAIL) {
    return V::set(V(0), v, n);
  } else {
    return v;
  }
}

// The layout of one call. Strides in elements; t and g may be nullptr.
template <typename T>
struct RowsLayout {
  int64_t N, C, D;
  const T* x;
  int64_t x_sn, x_sc, x_sd;
  const T* t;  // the policy's element operand (kElem), of x's shape
  int64_t t_sn, t_sc, t_sd;
  T* g;  // the gradient (may be x itself: in place), or nullptr
  int64_t g_sn, g_sc, g_sd;
  double softcap;  // <= 0: off
  // Policies with kRowLoss: at most one of these, in the accumulation dtype (both nullptr: the
  // loss is not stored). row_loss (N*D,): one loss per row; block_loss (loss_blocks(N, C, D),):
  // the sum of each fixed block of rows of row_blocks.h.
  void* row_loss = nullptr;
  void* block_loss = nullptr;
};

// The lse-only policy: the row's logsumexp and nothing else (logsumexp_fwd: the partial logsumexp
// of a vocabulary-parallel shard).
// lse_out (N*D,) contiguous.
template <typename A>
struct LsePolicy {
  using V = Vectorized<A>;
  static constexpr int kSums = 0;
  static constexpr SumKind kKinds[1] = {SumKind::kPlain};
  static constexpr int kCoefs = 0;
  static constexpr bool kElem = false;
  static constexpr bool kStoreExp = false;
  static constexpr bool kGradReadsX = false;
  static constexpr bool kClassOperand = false;
  static constexpr Aux kAux = Aux::kNone;
  const A* class_operand = nullptr;
  const A* lane_table = nullptr;
  A* lse_out;
  struct Row {
    int64_t col = -1;
    bool ignored = false;
  };
  Row row(int64_t) const { return {}; }
  template <bool TAIL>
  void sums(V (&)[1], const Lanes<V>&, const V&, int64_t) const {}
  template <typename W>
  W aux(const W&, const W&, const W& x_col) const {
    return x_col;
  }
  void epilogue(const Row&, int64_t r, const Lse<A>& L, const A*, A, A, RowOut<A, 0>&) const {
    lse_out[r] = L.lse;
  }
  V grad(const V (&)[1], const V& q, const Lanes<V>&) const { return q; }
};

namespace sr_detail {

template <typename P>
constexpr int nsums() {
  return P::kSums > 0 ? P::kSums : 1;
}

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

// Pass 1 over a contiguous row of C logits x (already softcapped when softcap is on) and the
// element operand t: the row's Lse and the policy's sums, reduced to the row's max (sums_out).
// With STORE, e gets exp(x_c - m_chunk) (zero past C, up to a whole pair) and mc each chunk's max.
template <typename P, bool STORE, typename X, typename TT, typename A>
Lse<A> pass1(const P& pol_, const X* x, const TT* t, int64_t C, A* sums_out, A* e, A* mc) {
  const P pol = pol_;  // a local copy: its constants stay in registers through the loops
  using V = Vectorized<A>;
  using IO = Io<X>;
  constexpr int64_t PR = IO::kPair;
  constexpr int64_t VS = V::size();
  constexpr int S = nsums<P>();
  constexpr bool kS = P::kSums > 0;
  const A* w = pol.class_operand;
  const A* lane_w = pol.lane_table;
  V m(kLowest<A>);  // finite start: a lane that only sees -inf keeps s = 0 instead of NaN
  V s0(0), s1(0), s2(0), s3(0);
  V tot[S];     // the sums of the chunks before, relative to m
  V acc[4][S];  // this chunk's, one set per accumulator
  if constexpr (kS) {
    for (int k = 0; k < S; ++k) tot[k] = V(0);
  }
  auto reset = [&]() {
    for (int j = 0; j < 4; ++j)
      for (int k = 0; k < S; ++k) acc[j][k] = V(0);
  };
  auto rescale = [&](const V& mn) {  // new running max: rescale the sums
    const V f = vexp(m - mn);
    s0 = s0 * f;
    s1 = s1 * f;
    s2 = s2 * f;
    s3 = s3 * f;
    if constexpr (kS) {
      for (int k = 0; k < S; ++k) {
        switch (P::kKinds[k]) {
          case SumKind::kPlain:
            break;
          case SumKind::kExp:
            tot[k] = tot[k] * f;
            break;
          case SumKind::kDev:
            tot[k] = rebase(tot[k], tot[k - 1], m, mn);
            break;
          case SumKind::kDevTable:
            tot[k] = rebase(tot[k], V::loadu(lane_w), m, mn);
            break;
        }
      }
      lane_w += VS;
      reset();
    }
    m = mn;
    if constexpr (STORE) {
      m.store(mc);
      mc += VS;
    }
  };
  auto fold = [&]() {  // this chunk's sums into the totals
    if constexpr (kS) {
      for (int k = 0; k < S; ++k) tot[k] = tot[k] + ((acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k]));
    }
  };
  // One vector at column c (n valid lanes in the tail): exp(xe - m) into sa (and e); the
  // policy's terms into ac. xe is x, masked to -inf past C in the tail.
  auto add = [&](int64_t c, const V& xe, const V& xv, const V& tv, const V& wv, V& sa, V (&ac)[S],
                 int64_t n, auto tail_tag) {
    constexpr bool TAIL = decltype(tail_tag)::value;
    const V ev = vexp(xe - m);
    sa = sa + ev;
    if constexpr (STORE) ev.store(e + c);
    if constexpr (kS) pol.template sums<TAIL>(ac, Lanes<V>{xv, ev, tv, wv}, m, n);
  };
  auto load_tw = [&](int64_t c, V& t0, V& t1, V& w0, V& w1) {
    if constexpr (P::kElem) Io<TT>::load(t + c, t0, t1);
    if constexpr (kS && P::kClassOperand) {
      w0 = V::loadu(w + c);
      w1 = V::loadu(w + c + VS);
    }
  };
  const int64_t Cf = C - C % PR;
  for (int64_t c0 = 0; c0 < Cf; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, Cf);
    V m0 = m, m1 = m;
    int64_t c = c0;
    for (; c + 2 * PR <= c1; c += 2 * PR) {
      V v0, v1, v2, v3;
      IO::load(x + c, v0, v1);
      IO::load(x + c + PR, v2, v3);
      m0 = vmax(m0, vmax(v0, v1));
      m1 = vmax(m1, vmax(v2, v3));
    }
    if (c < c1) {
      V v0, v1;
      IO::load(x + c, v0, v1);
      m0 = vmax(m0, vmax(v0, v1));
    }
    rescale(vmax(m0, m1));
    for (c = c0; c + 2 * PR <= c1; c += 2 * PR) {
      V v0, v1, v2, v3, t0, t1, t2, t3, w0, w1, w2, w3;
      IO::load(x + c, v0, v1);
      IO::load(x + c + PR, v2, v3);
      load_tw(c, t0, t1, w0, w1);
      load_tw(c + PR, t2, t3, w2, w3);
      add(c, v0, v0, t0, w0, s0, acc[0], PR, std::false_type());
      add(c + VS, v1, v1, t1, w1, s1, acc[1], PR, std::false_type());
      add(c + PR, v2, v2, t2, w2, s2, acc[2], PR, std::false_type());
      add(c + PR + VS, v3, v3, t3, w3, s3, acc[3], PR, std::false_type());
    }
    if (c < c1) {
      V v0, v1, t0, t1, w0, w1;
      IO::load(x + c, v0, v1);
      load_tw(c, t0, t1, w0, w1);
      add(c, v0, v0, t0, w0, s0, acc[0], PR, std::false_type());
      add(c + VS, v1, v1, t1, w1, s1, acc[1], PR, std::false_type());
    }
    fold();
  }
  if (Cf < C) {  // tail of < PR elements, its own chunk; zero-filled, masked to -inf for the exp
    const int64_t n = C - Cf;
    const int64_t n0 = std::min<int64_t>(n, VS);
    V v0, v1, t0, t1, w0, w1;
    IO::load_n(x + Cf, n, v0, v1);
    if constexpr (P::kElem) Io<TT>::load_n(t + Cf, n, t0, t1);
    if constexpr (kS && P::kClassOperand) Io<A>::load_n(w + Cf, n, w0, w1);
    const V ninf(-kInf<A>);
    const V x0 = V::set(ninf, v0, n0);
    const V x1 = V::set(ninf, v1, n - n0);
    rescale(vmax(m, vmax(x0, x1)));
    add(Cf, x0, v0, t0, w0, s0, acc[0], n0, std::true_type());
    add(Cf + VS, x1, v1, t1, w1, s1, acc[1], n - n0, std::true_type());
    fold();
  }
  const Lse<A> L = merge_lanes<A>(m, (s0 + s1) + (s2 + s3));
  if constexpr (kS) {
    const V M(L.m);
    for (int k = 0; k < S; ++k) {
      V r = tot[k];
      switch (P::kKinds[k]) {
        case SumKind::kPlain:
          break;
        case SumKind::kExp:
          r = r * vexp(m - M);
          break;
        case SumKind::kDev:
          r = rebase(r, tot[k - 1], m, M);
          break;
        case SumKind::kDevTable:
          r = rebase(r, V::loadu(lane_w), m, M);
          break;
      }
      sums_out[k] = hsum(r);
    }
  }
  return L;
}

// Pass 2 of a row: g_c = grad(k, q_c, ...) times the softcap factor when CAPPED (x is then the
// softcapped logit), q_c = pscale * p_c, from pass 1's exp values e and chunk maxima mc
// (STORED) or recomputed from x.
template <typename P, bool STORED, bool CAPPED, typename X, typename TT, typename O, typename A>
void pass2(const P& pol_, const X* x, const TT* t, const A* e, const A* mc, O* g, int64_t C,
           const Lse<A>& L, const RowOut<A, P::kCoefs>& out, A cap, bool stream) {
  const P pol = pol_;  // a local copy: its constants stay in registers through the loops
  using V = Vectorized<A>;
  constexpr int64_t PR = Io<O>::kPair;
  constexpr int64_t VS = V::size();
  constexpr int KC = P::kCoefs > 0 ? P::kCoefs : 1;
  static_assert(Io<X>::kPair == PR, "same pair width");
  const A* w = pol.class_operand;
  const V vm(L.m), vls(L.log_s), vps(out.pscale), vcap(cap), one(1);
  V kv[KC];
  for (int j = 0; j < KC; ++j) kv[j] = V(out.k[j]);
  V f;  // pscale * exp(m_chunk - m - log_s), lane-wise (STORED)
  auto grad = [&](int64_t c, const V& xv, const V& tv, const V& wv) {
    V q;
    if constexpr (STORED) {
      q = V::loadu(e + c) * f;
    } else {
      q = vps * vexp((xv - vm) - vls);
    }
    V r = pol.grad(kv, q, Lanes<V>{xv, V(0), tv, wv});
    if constexpr (CAPPED) {
      const V u = xv / vcap;
      r = r * (one - u * u);
    }
    return r;
  };
  constexpr bool kX = CAPPED || !STORED || P::kGradReadsX;
  auto pair = [&](int64_t c, V& g0, V& g1) {
    V x0, x1, t0, t1, w0, w1;
    if constexpr (kX) Io<X>::load(x + c, x0, x1);
    if constexpr (P::kElem) Io<TT>::load(t + c, t0, t1);
    if constexpr (P::kClassOperand) {
      w0 = V::loadu(w + c);
      w1 = V::loadu(w + c + VS);
    }
    g0 = grad(c, x0, t0, w0);
    g1 = grad(c + VS, x1, t1, w1);
  };
  auto next_chunk = [&]() {
    if constexpr (STORED) {
      f = vps * vexp((V::loadu(mc) - vm) - vls);
      mc += VS;
    }
  };
  const int64_t Cf = C - C % PR;
  for (int64_t c0 = 0; c0 < Cf; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, Cf);
    next_chunk();
    for (int64_t c = c0; c < c1; c += PR) {
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
    V x0, x1, t0, t1, w0, w1;
    if constexpr (kX) Io<X>::load_n(x + Cf, n, x0, x1);
    if constexpr (P::kElem) Io<TT>::load_n(t + Cf, n, t0, t1);
    if constexpr (P::kClassOperand) Io<A>::load_n(w + Cf, n, w0, w1);
    Io<O>::store_n(g + Cf, n, grad(Cf, x0, t0, w0), grad(Cf + VS, x1, t1, w1));
  }
}

// One row r of the rows path: x, t, g contiguous (x softcapped when CAPPED), g may be nullptr.
// Returns the policy's out.loss (0 without kRowLoss).
template <typename P, bool CAPPED, typename X, typename TT, typename O, typename A>
A row(const P& pol, const typename P::Row& rw, int64_t r, const X* x, const TT* t, O* g,
      int64_t C, RowScratch<A>& scratch, A cap, bool stream) {
  constexpr bool STORED = P::kStoreExp;
  A sums[nsums<P>()];
  const bool grad = g != nullptr && !rw.ignored;
  const Lse<A> L = (STORED && grad)
                       ? pass1<P, true>(pol, x, t, C, sums, scratch.e.data(), scratch.m.data())
                       : pass1<P, false>(pol, x, t, C, sums, static_cast<A*>(nullptr),
                                         static_cast<A*>(nullptr));
  const A x_col = rw.col >= 0 ? static_cast<A>(x[rw.col]) : A(0);
  A aux = 0;
  if constexpr (P::kAux == Aux::kAlways) {
    aux = pol.aux(L.m, L.log_s, x_col);
  } else if constexpr (P::kAux == Aux::kForGrad) {
    if (grad) aux = pol.aux(L.m, L.log_s, x_col);
  }
  RowOut<A, P::kCoefs> out;
  out.want_grad = grad;
  pol.epilogue(rw, r, L, sums, x_col, aux, out);
  if (!g) return out.loss;
  if (rw.ignored) {
    std::fill(g, g + C, O(0));
    return out.loss;
  }
  if (!std::isfinite(L.lse)) {  // NaN or infinite logits: NaN gradient, as torch
    std::fill(g, g + C, O(kNaN<A>));
    return out.loss;
  }
  pass2<P, STORED, CAPPED>(pol, x, t, scratch.e.data(), scratch.m.data(), g, C, L, out, cap,
                           stream);
  if (out.fix_col >= 0) {
    A v = out.fix_val;
    if constexpr (CAPPED) v *= ce::softcap_grad(x_col, cap);
    g[out.fix_col] = static_cast<O>(v);
  }
  return out.loss;
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
// gradient, scattered after). With an element operand, all three go through buffers unless all
// three have class stride 1.
template <typename P, typename T>
void run_rows(const P& pol, const RowsLayout<T>& a) {
  using A = acc_t<T>;
  const int64_t C = a.C, D = a.D, rows = a.N * a.D;
  const T* x = a.x;
  T* g = a.g;
  const T* tp = a.t;
  constexpr bool kElem = P::kElem;
  const bool capped = a.softcap > 0;
  const A cap = capped ? static_cast<A>(a.softcap) : A(0);
  bool x_direct = a.x_sc == 1, g_direct = g == nullptr || a.g_sc == 1;
  const bool t_direct = !kElem || a.t_sc == 1;
  if (kElem && !(x_direct && g_direct && t_direct)) {
    x_direct = false;
    g_direct = g == nullptr;
  }
  const bool stage_x = capped || !x_direct;  // logits through xbuf (softcapped and/or gathered)
  const bool stage_t = kElem && !x_direct;    // element operand through tbuf
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  // Stream a large gradient of its own (not in place: there the row was just read and is in
  // cache) whose rows all start vector-aligned.
  const bool stream = g != nullptr && g_direct && g != x && D == 1 && stream_aligned(g) &&
                      stream_aligned(g + a.g_sn) &&
                      rows * C * int64_t(sizeof(T)) >= kStreamMinBytes;

  // Work units: rows, or the blocks of rows of the reduced output.
  A* const row_loss = row_loss_policy<P>::value ? static_cast<A*>(a.row_loss) : nullptr;
  A* const block_loss = row_loss_policy<P>::value ? static_cast<A*>(a.block_loss) : nullptr;
  const int64_t units = block_loss ? loss_blocks(a.N, C, D) : rows;
  const int64_t ugrain =
      block_loss ? std::max<int64_t>(1, grain / loss_block_rows(C, D)) : grain;

  at::parallel_for(0, units, ugrain, [&](int64_t u0, int64_t u1) {
    std::vector<A> xbuf(stage_x ? C : 0), gbuf(g_direct ? 0 : C), tbuf(stage_t ? C : 0);
    RowScratch<A> scratch;
    if (g && P::kStoreExp) scratch.reserve(C);
    auto one_row = [&](int64_t r) -> A {
      A loss = 0;
      const int64_t n = r / D, d = r - n * D;
      const typename P::Row rw = pol.row(r);
      const T* xr = x + n * a.x_sn + d * a.x_sd;
      const T* tr = kElem ? tp + n * a.t_sn + d * a.t_sd : nullptr;
      T* gr = g ? g + n * a.g_sn + d * a.g_sd : nullptr;
      A* gb = g_direct ? nullptr : gbuf.data();
      A* xb = xbuf.data();
      if (stage_x) {
        if (x_direct) {
          stage_softcap(xr, xb, C, cap);
        } else {
          for (int64_t c = 0; c < C; ++c) xb[c] = static_cast<A>(xr[c * a.x_sc]);
          if (capped) softcap_buffer(xb, C, cap);
        }
      }
      auto go = [&](auto cp, const auto* xs, const auto* ts) {
        constexpr bool CP = decltype(cp)::value;
        if (gb) {
          loss = row<P, CP>(pol, rw, r, xs, ts, gb, C, scratch, cap, stream);
        } else {
          loss = row<P, CP>(pol, rw, r, xs, ts, gr, C, scratch, cap, stream);
        }
      };
      if (!stage_x) {
        go(std::false_type(), xr, tr);
      } else if (!stage_t) {
        with_bool(capped, [&](auto cp) { go(cp, static_cast<const A*>(xb), tr); });
      } else {
        A* tb = tbuf.data();
        for (int64_t c = 0; c < C; ++c) tb[c] = static_cast<A>(tr[c * a.t_sc]);
        with_bool(capped, [&](auto cp) {
          go(cp, static_cast<const A*>(xb), static_cast<const A*>(tb));
        });
      }
      if (gr && gb) {
        for (int64_t c = 0; c < C; ++c) gr[c * a.g_sc] = static_cast<T>(gb[c]);
      }
      return loss;
    };
    if (block_loss) {
      for (int64_t b = u0; b < u1; ++b) {
        int64_t r0, r1;
        loss_block_range(b, a.N, C, D, &r0, &r1);
        A sum = 0;
        for (int64_t r = r0; r < r1; ++r) sum += one_row(r);
        block_loss[b] = sum;
      }
    } else {
      for (int64_t r = u0; r < u1; ++r) {
        const A loss = one_row(r);
        if (row_loss) row_loss[r] = loss;
      }
    }
    if (stream) stream_fence();
  });
}

constexpr int64_t kPrefetchTiles = 4;

// Spatial path: input, gradient and element operand have spatial stride 1 (D > 1), or a few
// classes (kGatherTileMaxC) at any position strides (channels-last: the tile's positions are
// gathered, its gradient scattered). One work item is a tile of P = one pair of consecutive
// positions d of one n; lane l is row (n, d0 + l). The tile's logits are staged (converted,
// softcapped) as [c][lane], the max is taken first, so the sums need no rescale.
template <typename P, typename T>
void run_spatial(const P& pol_, const RowsLayout<T>& a) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = Io<T>;
  constexpr int64_t PR = IO::kPair;
  constexpr int64_t VS = V::size();
  constexpr int S = nsums<P>();
  constexpr int KC = P::kCoefs > 0 ? P::kCoefs : 1;
  const int64_t N = a.N, C = a.C, D = a.D;
  const int64_t tiles = (D + PR - 1) / PR;
  const T* x = a.x;
  T* g = a.g;
  const T* tp = a.t;
  const A* w = pol_.class_operand;
  const bool capped = a.softcap > 0;
  const A cap = capped ? static_cast<A>(a.softcap) : A(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / (C * PR));
  // Work units: tiles, or the blocks of the reduced output (whole tiles: K % PR == 0).
  A* const row_loss = row_loss_policy<P>::value ? static_cast<A*>(a.row_loss) : nullptr;
  A* const block_loss = row_loss_policy<P>::value ? static_cast<A*>(a.block_loss) : nullptr;
  const int64_t K = loss_block_rows(C, D);
  static_assert(64 % PR == 0, "a block of the reduced output is whole tiles");
  const int64_t per_n = loss_blocks_along(D, K);
  const int64_t units = block_loss ? N * per_n : N * tiles;
  const int64_t ugrain = block_loss ? std::max<int64_t>(1, grain / (K / PR)) : grain;

  at::parallel_for(0, units, ugrain, [&](int64_t u0, int64_t u1) {
    const P pol = pol_;  // a local copy: its constants stay in registers through the loops
    std::vector<A> xs(C * PR);              // staged (softcapped) logits, [c][lane]
    std::vector<A> es(g ? C * PR : 0);      // exp(x - m), [c][lane]
    alignas(64) A mb[PR], sb[PR], lsb[PR], psb[PR], fixm[PR], fixv[PR], xcb[PR], auxb[PR];
    alignas(64) A sumb[S][PR], kb[KC][PR];
    RowOut<A, P::kCoefs> outs[PR];
    typename P::Row rws[PR];
    const V vcap(cap);
    // One tile; its rows' losses (kRowLoss) go to row_loss, or are added to *acc in row order.
    auto tile = [&](int64_t it, A* acc) {
      const int64_t n = it / tiles, d0 = (it - n * tiles) * PR;
      const int64_t np = std::min(PR, D - d0);
      const int64_t row0 = n * D + d0;
      for (int64_t l = 0; l < PR; ++l) {
        if (l >= np) break;
        rws[l] = pol.row(row0 + l);
      }
      // The tile's positions at element stride s (1: vector loads; else gathered).
      auto load = [&](const T* p, int64_t s, V& v0, V& v1) {
        if (s != 1) {
          IO::load_strided(p, s, np, v0, v1);
        } else if (np == PR) {
          IO::load(p, v0, v1);
        } else {
          IO::load_n(p, np, v0, v1);
        }
      };
      // Stage and max.
      const T* xb = x + n * a.x_sn + d0 * a.x_sd;
      V m0(kLowest<A>), m1(kLowest<A>);
      for (int64_t c = 0; c < C; ++c) {
        if (a.x_sd == 1) {
          // C strided streams, one pair each per tile: fetch a few tiles ahead (past the end of
          // the row it only fetches a line we do not need).
          const char* ahead =
              reinterpret_cast<const char*>(xb + c * a.x_sc + kPrefetchTiles * PR);
          for (int64_t b = 0; b < PR * int64_t(sizeof(T)); b += 64) __builtin_prefetch(ahead + b);
        }
        V v0, v1;
        load(xb + c * a.x_sc, a.x_sd, v0, v1);
        if (capped) {
          v0 = vcap * (v0 / vcap).tanh();
          v1 = vcap * (v1 / vcap).tanh();
        }
        v0.store(xs.data() + c * PR);
        v1.store(xs.data() + c * PR + VS);
        m0 = vmax(m0, v0);
        m1 = vmax(m1, v1);
      }
      // Sums; the lane max m is final here, so they need no rebase.
      V s0(0), s1(0), ac0[S], ac1[S];
      if constexpr (P::kSums > 0) {
        for (int k = 0; k < S; ++k) ac0[k] = ac1[k] = V(0);
      }
      for (int64_t c = 0; c < C; ++c) {
        const V v0 = V::loadu(xs.data() + c * PR), v1 = V::loadu(xs.data() + c * PR + VS);
        const V e0 = vexp(v0 - m0), e1 = vexp(v1 - m1);
        s0 = s0 + e0;
        s1 = s1 + e1;
        if (g) {
          e0.store(es.data() + c * PR);
          e1.store(es.data() + c * PR + VS);
        }
        if constexpr (P::kSums > 0) {
          V t0, t1, wc;
          if constexpr (P::kElem) load(tp + n * a.t_sn + c * a.t_sc + d0 * a.t_sd, a.t_sd, t0, t1);
          if constexpr (P::kClassOperand) wc = V(w[c]);
          pol.template sums<false>(ac0, Lanes<V>{v0, e0, t0, wc}, m0, VS);
          pol.template sums<false>(ac1, Lanes<V>{v1, e1, t1, wc}, m1, VS);
        }
      }
      m0.store(mb);
      m1.store(mb + VS);
      s0.store(sb);
      s1.store(sb + VS);
      const V ls0 = s0.log(), ls1 = s1.log();
      ls0.store(lsb);
      ls1.store(lsb + VS);
      if constexpr (P::kSums > 0) {
        for (int k = 0; k < S; ++k) {
          ac0[k].store(sumb[k]);
          ac1[k].store(sumb[k] + VS);
        }
      }
      for (int64_t l = 0; l < PR; ++l) {
        xcb[l] = l < np && rws[l].col >= 0 ? xs[rws[l].col * PR + l] : A(0);
      }
      if constexpr (P::kAux == Aux::kAlways || P::kAux == Aux::kForGrad) {
        if (P::kAux == Aux::kAlways || g != nullptr) {
          pol.aux(m0, ls0, V::loadu(xcb)).store(auxb);
          pol.aux(m1, ls1, V::loadu(xcb + VS)).store(auxb + VS);
        }
      }
      // Per-lane row results and gradient coefficients.
      for (int64_t l = 0; l < PR; ++l) {
        psb[l] = fixm[l] = fixv[l] = 0;
        if constexpr (P::kCoefs > 0) {
          for (int j = 0; j < KC; ++j) kb[j][l] = 0;
        }
        outs[l] = RowOut<A, P::kCoefs>();
        if (l >= np) continue;
        const Lse<A> L = make_lse_log(mb[l], lsb[l]);
        A sl[S];
        if constexpr (P::kSums > 0) {
          for (int k = 0; k < S; ++k) sl[k] = sumb[k][l];
        }
        const auto& rw = rws[l];
        RowOut<A, P::kCoefs>& out = outs[l];
        out.want_grad = g != nullptr && !rw.ignored;
        pol.epilogue(rw, row0 + l, L, sl, xcb[l],
                     P::kAux == Aux::kNone ? A(0) : auxb[l], out);
        if constexpr (row_loss_policy<P>::value) {
          if (row_loss) {
            row_loss[row0 + l] = out.loss;
          } else if (acc) {
            *acc += out.loss;
          }
        }
        if (rw.ignored) {
          fixm[l] = 1;
          fixv[l] = 0;
          out.fix_col = -1;
          continue;
        }
        psb[l] = out.pscale / sb[l];  // p = e / s
        for (int j = 0; j < P::kCoefs; ++j) kb[j][l] = out.k[j];
        if (!std::isfinite(L.lse)) {
          fixm[l] = 1;
          fixv[l] = kNaN<A>;
          out.fix_col = -1;
        }
      }
      if (!g) return;
      // Gradient.
      const V zero(0), one(1);
      const V qa0 = V::loadu(psb), qa1 = V::loadu(psb + VS);
      const V fm0 = V::loadu(fixm) != zero, fm1 = V::loadu(fixm + VS) != zero;
      const V fv0 = V::loadu(fixv), fv1 = V::loadu(fixv + VS);
      V k0[KC], k1[KC];
      for (int j = 0; j < KC; ++j) {
        k0[j] = V::loadu(kb[j]);
        k1[j] = V::loadu(kb[j] + VS);
      }
      T* gb = g + n * a.g_sn + d0 * a.g_sd;
      for (int64_t c = 0; c < C; ++c) {
        const V v0 = V::loadu(xs.data() + c * PR), v1 = V::loadu(xs.data() + c * PR + VS);
        V t0, t1, wc;
        if constexpr (P::kElem) load(tp + n * a.t_sn + c * a.t_sc + d0 * a.t_sd, a.t_sd, t0, t1);
        if constexpr (P::kClassOperand) wc = V(w[c]);
        V g0 = pol.grad(k0, qa0 * V::loadu(es.data() + c * PR), Lanes<V>{v0, zero, t0, wc});
        V g1 = pol.grad(k1, qa1 * V::loadu(es.data() + c * PR + VS), Lanes<V>{v1, zero, t1, wc});
        if (capped) {
          const V u0 = v0 / vcap, u1 = v1 / vcap;
          g0 = g0 * (one - u0 * u0);
          g1 = g1 * (one - u1 * u1);
        }
        g0 = V::blendv(g0, fv0, fm0);
        g1 = V::blendv(g1, fv1, fm1);
        if (a.g_sd != 1) {
          IO::store_strided(gb + c * a.g_sc, a.g_sd, np, g0, g1);
        } else if (np == PR) {
          IO::store(gb + c * a.g_sc, g0, g1);
        } else {
          IO::store_n(gb + c * a.g_sc, np, g0, g1);
        }
      }
      for (int64_t l = 0; l < np; ++l) {  // the policy's fixed column
        const auto& out = outs[l];
        if (out.fix_col < 0) continue;
        A v = out.fix_val;
        if (capped) v *= ce::softcap_grad(xs[out.fix_col * PR + l], cap);
        gb[out.fix_col * a.g_sc + l * a.g_sd] = static_cast<T>(v);
      }
    };
    if (block_loss) {
      for (int64_t b = u0; b < u1; ++b) {
        const int64_t n = b / per_n, j = b - n * per_n;
        const int64_t t1 = std::min((j + 1) * K, D);
        A sum = 0;
        for (int64_t d0 = j * K; d0 < t1; d0 += PR) tile(n * tiles + d0 / PR, &sum);
        block_loss[b] = sum;
      }
    } else {
      for (int64_t it = u0; it < u1; ++it) tile(it, nullptr);
    }
  });
}

}  // namespace sr_detail

// Classes up to which the spatial path also takes positions that are not contiguous (a
// channels-last (N, C, H*W) view: class stride 1, position stride C), gathering its tiles: the
// rows path's per-row work costs more than the gathers for a few classes (C = 19 float32: 3.6x).
constexpr int64_t kGatherTileMaxC = 64;

// Runs policy pol over every row of the layout a: the spatial path when D > 1 and the input,
// gradient and element operand all have spatial stride 1 (or C <= kGatherTileMaxC), else the rows
// path.
template <typename P, typename T>
void softmax_rows(const P& pol, const RowsLayout<T>& a) {
  if (a.N * a.D == 0) return;
  const bool unit = a.x_sd == 1 && (a.g == nullptr || a.g_sd == 1) && (!P::kElem || a.t_sd == 1);
  const bool spatial = a.D > 1 && (unit || a.C <= kGatherTileMaxC);
  if (spatial) {
    sr_detail::run_spatial(pol, a);
  } else {
    sr_detail::run_rows(pol, a);
  }
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
