// The elementwise skeleton of the CPU kernels: a vectorised, parallel loop over the elements of an
// N-d shape, reading operands broadcast BY STRIDE (a weight broadcastable to the input is passed
// as its pointer plus one stride per loop dimension, 0 on broadcast dimensions; it is never
// materialised at the input's size), with the loss's math as a policy that turns the operands of
// one vector of elements into that vector's loss and gradient. Reductions: 'none' (per-element
// loss written through its own strides) and a deterministic 'sum' (see below). First users:
// scale_grad_ (scale_grad_kernel.cpp); next BCE-with-logits and sigmoid focal.
//
// A policy (all members const; A = acc_t<T>, V = Vectorized<A>):
//
//   struct MyPolicy {
//     static constexpr bool kLoss = true;   // computes a per-element loss
//     static constexpr bool kGrad = true;   // computes a per-element gradient
//     // in[k]: lanes of operand k (in the order passed to elementwise(), converted to A);
//     // set loss and/or grad for those lanes. Lanes past the end of a row hold 0 or a
//     // broadcast operand's value; their results are dropped and never summed.
//     void operator()(const V (&in)[K], V& loss, V& grad) const;
//     // Optional: the first kDense operands are never broadcast along the inner dimension (the
//     // input and its same-shaped target): only the inner-stride patterns of the others are
//     // specialised at compile time (2^(K - kDense) copies of the loop instead of 2^K).
//     static constexpr int kDense = 2;
//   };
//
// Call (from a *_kernel.cpp, inside namespace fusedloss::cpu::CPU_CAPABILITY):
//
//   EwShape shape = ...;                        // sizes, outermost first (<= kEwMaxDims dims)
//   Strided<const T> x{x_ptr, {strides...}};    // element strides, one per dim of shape
//   Strided<const A> w{w_ptr, {0, s1, 0}};      // broadcast over dims 0 and 2
//   A total = elementwise<A>(policy, shape, red, loss_out, grad_out, x, w);
//
// loss_out (Strided<L>, any float type L) is written only for Reduction::None and kLoss; grad_out
// (Strided<G>) only for kGrad and a non-null pointer; either may alias an input operand with the
// same strides (in place: every element is read before it is written). The return value is the
// sum of the losses for Reduction::Sum (0 otherwise): each fixed block of kEwBlock consecutive
// elements (in the loop's order) is summed on its own, lane-wise then in lane order, and the
// block sums are added in block order in double, so the result is bitwise the same for any number
// of threads. 'mean' is the caller's sum times its factor.
//
// Layout: dimensions of size 1 are dropped and neighbours that every operand walks as one are
// merged; the innermost remaining dimension is the vector loop, where each operand is read by
// its own stride there: 1 (vector loads), 0 (one broadcast value per row) or any other (gathered).
// Math and rounding are the policy's: an operand is converted to A on load, a result rounded once
// to the output's type on store.
#pragma once

#include "vec.h"

#include <ATen/Parallel.h>
#include <fusedloss/common.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fusedloss::cpu::CPU_CAPABILITY {

constexpr int kEwMaxDims = 8;
// Elements per work item and per partial sum of the 'sum' reduction (fixed: the sum does not
// depend on the thread count).
constexpr int64_t kEwBlock = 16384;
// Blocks per thread at least (the grain of the parallel loop).
constexpr int64_t kEwParallelBlocks = 4;

struct EwShape {
  int ndim = 0;
  int64_t size[kEwMaxDims] = {};
  int64_t numel() const {
    int64_t n = 1;
    for (int k = 0; k < ndim; ++k) n *= size[k];
    return n;
  }
};

// Element (i_0, ..., i_{ndim-1}) of an operand is at p + sum_k i_k * s[k].
template <typename E>
struct Strided {
  E* p = nullptr;
  int64_t s[kEwMaxDims] = {};
};

namespace ew_detail {

// f(std::integral_constant<int, j>()) for j = 0 .. N-1, in order.
template <int N, typename F, int... J>
inline void for_index_impl(F&& f, std::integer_sequence<int, J...>) {
  (f(std::integral_constant<int, J>()), ...);
}
template <int N, typename F>
inline void for_index(F&& f) {
  for_index_impl<N>(f, std::make_integer_sequence<int, N>());
}

// Reads one operand along the inner dimension: vector loads at stride 1, one value at stride 0,
// a gather otherwise.
template <typename E>
struct Reader {
  using A = acc_t<std::remove_const_t<E>>;
  using V = Vectorized<A>;
  using IO = Io<std::remove_const_t<E>>;
  const E* p;
  int64_t s;
  V bcast;
  void start(const E* row, int64_t stride) {
    p = row;
    s = stride;
    if (s == 0) bcast = V(static_cast<A>(*p));
  }
  // The pair of elements at inner index i; n < kPair: only the first n (the rest are 0).
  template <bool TAIL>
  void load(int64_t i, int64_t n, V& a, V& b) const {
    if (s == 0) {
      a = b = bcast;
      if constexpr (TAIL) {
        const int64_t n0 = std::min<int64_t>(n, V::size());
        a = V::set(V(0), a, n0);
        b = V::set(V(0), b, n - n0);
      }
    } else if (s == 1) {
      if constexpr (TAIL) {
        IO::load_n(p + i, n, a, b);
      } else {
        IO::load(p + i, a, b);
      }
    } else {
      IO::load_strided(p + i * s, s, TAIL ? n : IO::kPair, a, b);
    }
  }
};

template <typename E, typename V>
inline void write(E* p, int64_t s, int64_t i, int64_t n, bool tail, const V& a, const V& b) {
  using IO = Io<E>;
  if (s == 1) {
    if (tail) {
      IO::store_n(p + i, n, a, b);
    } else {
      IO::store(p + i, a, b);
    }
  } else {
    IO::store_strided(p + i * s, s, n, a, b);
  }
}

// Drops size-1 dimensions and merges neighbours every operand walks as one (stride of the outer
// = stride of the inner * inner size). strides[j] is operand j's stride array.
inline void coalesce(EwShape& shape, int64_t* const* strides, int nops) {
  EwShape out;
  int64_t st[16][kEwMaxDims];
  for (int k = 0; k < shape.ndim; ++k) {
    if (shape.size[k] == 1) continue;
    const int d = out.ndim;
    bool merge = d > 0;
    for (int j = 0; j < nops && merge; ++j) {
      merge = strides[j][k] * shape.size[k] == st[j][d - 1];
    }
    if (merge) {  // the previous (outer) kept dim and this one become one dim
      out.size[d - 1] *= shape.size[k];
      for (int j = 0; j < nops; ++j) st[j][d - 1] = strides[j][k];
    } else {
      out.size[d] = shape.size[k];
      for (int j = 0; j < nops; ++j) st[j][d] = strides[j][k];
      ++out.ndim;
    }
  }
  if (out.ndim == 0) {  // a single element
    out.ndim = 1;
    out.size[0] = 1;
    for (int j = 0; j < nops; ++j) st[j][0] = 0;
  }
  shape = out;
  for (int j = 0; j < nops; ++j) {
    for (int k = 0; k < kEwMaxDims; ++k) strides[j][k] = k < out.ndim ? st[j][k] : 0;
  }
}

// P::kDense, or 0 for a policy without it.
template <typename P, typename = void>
struct DenseOperands {
  static constexpr int value = 0;
};
template <typename P>
struct DenseOperands<P, std::void_t<decltype(P::kDense)>> {
  static constexpr int value = P::kDense;
};

}  // namespace ew_detail

// The math-ops struct of the shared per-element formulas (csrc/include/fusedloss/logistic.h) on
// vectors of A.
template <typename A>
struct VecMath {
  using V = Vectorized<A>;
  static V exp_nonpos(const V& v) { return vexp(v); }
  static V log(const V& v) { return v.log(); }
  static V log1p(const V& v) { return v.log1p(); }
  static V abs(const V& v) { return v.abs(); }
  static V max0(const V& v) { return at::vec::maximum(v, V(0)); }
  static V if_nonneg(const V& c, const V& a, const V& b) { return V::blendv(b, a, c >= V(0)); }
  static V if_zero(const V& c, const V& a, const V& b) { return V::blendv(b, a, c == V(0)); }
  static V if_nan(const V& c, const V& a, const V& b) { return V::blendv(b, a, c.isnan()); }
  static bool all_hard(const V& t) {
    return (t * (V(1) - t)).zero_mask() == static_cast<int>((1ULL << V::size()) - 1);
  }
};

template <typename A, typename P, typename L, typename G, typename... E>
A elementwise(const P& pol, EwShape shape, Reduction red, Strided<L> loss_out,
              Strided<G> grad_out, Strided<E>... ins) {
  using V = Vectorized<A>;
  constexpr int K = sizeof...(E);
  constexpr int64_t VS = V::size();
  constexpr int64_t PAIR = 2 * VS;
  static_assert(K >= 1 && K + 2 <= 16, "1 to 14 operands");
  static_assert(((Io<std::remove_const_t<E>>::kPair == PAIR) && ...), "one pair width");
  const bool write_loss = P::kLoss && red == Reduction::None && loss_out.p != nullptr;
  const bool write_grad = P::kGrad && grad_out.p != nullptr;
  const bool sum = P::kLoss && red == Reduction::Sum;
  const int64_t numel = shape.numel();
  if (numel == 0) return A(0);

  std::tuple<Strided<E>...> op{ins...};
  int64_t* strides[K + 2];
  ew_detail::for_index<K>([&](auto j) { strides[j] = std::get<decltype(j)::value>(op).s; });
  strides[K] = loss_out.s;
  strides[K + 1] = grad_out.s;
  ew_detail::coalesce(shape, strides, K + 2);
  const int nd = shape.ndim;
  const int64_t inner = shape.size[nd - 1];

  const int64_t blocks = (numel + kEwBlock - 1) / kEwBlock;
  std::vector<A> partial(sum ? blocks : 0);

  // At least kEwParallelBlocks blocks (64K elements, tens of microseconds) per thread: a smaller
  // call runs inline, since waking a second thread costs more than it saves there, and on a busy
  // machine a parallel region waits for its slowest thread's next time slice (milliseconds).
  at::parallel_for(0, blocks, kEwParallelBlocks, [&](int64_t b0, int64_t b1) {
    std::tuple<ew_detail::Reader<E>...> rd;
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t f = blk * kEwBlock;
      const int64_t fend = std::min(numel, f + kEwBlock);
      // Multi-index of f: idx[nd-1] is the inner position, the others the row.
      int64_t idx[kEwMaxDims];
      {
        int64_t rest = f;
        for (int k = nd - 1; k >= 0; --k) {
          idx[k] = rest % shape.size[k];
          rest /= shape.size[k];
        }
      }
      V acc(0);
      while (f < fend) {
        const int64_t i0 = idx[nd - 1];
        const int64_t n = std::min(inner - i0, fend - f);
        // Row pointers (inner index 0 of this row).
        auto row_off = [&](const int64_t* s) {
          int64_t o = 0;
          for (int k = 0; k < nd - 1; ++k) o += idx[k] * s[k];
          return o;
        };
        ew_detail::for_index<K>([&](auto j) {
          auto& o = std::get<decltype(j)::value>(op);
          std::get<decltype(j)::value>(rd).start(o.p + row_off(o.s), o.s[nd - 1]);
        });
        L* lp = write_loss ? loss_out.p + row_off(loss_out.s) : nullptr;
        G* gp = write_grad ? grad_out.p + row_off(grad_out.s) : nullptr;
        const int64_t ls = loss_out.s[nd - 1], gs = grad_out.s[nd - 1];
        // One pair at inner index i (cnt < PAIR elements in the tail). FAST: every operand has
        // inner stride 0 (bit j of MASK) or 1 and the outputs stride 1, known at compile time;
        // otherwise each operand's stride is looked at per pair.
        auto step = [&](int64_t i, int64_t cnt, auto tail_tag, auto fast_tag, auto mask_tag) {
          constexpr bool TAIL = decltype(tail_tag)::value;
          constexpr bool FAST = decltype(fast_tag)::value;
          constexpr int MASK = decltype(mask_tag)::value;
          V in_a[K], in_b[K];
          ew_detail::for_index<K>([&](auto j) {
            constexpr int J = decltype(j)::value;
            auto& r = std::get<J>(rd);
            using RIO = typename std::decay_t<decltype(r)>::IO;
            if constexpr (!FAST) {
              r.template load<TAIL>(i, cnt, in_a[J], in_b[J]);
            } else if constexpr ((MASK >> J) & 1) {
              in_a[J] = in_b[J] = r.bcast;
            } else if constexpr (TAIL) {
              RIO::load_n(r.p + i, cnt, in_a[J], in_b[J]);
            } else {
              RIO::load(r.p + i, in_a[J], in_b[J]);
            }
          });
          V la, lb, ga, gb;
          pol(in_a, la, ga);
          pol(in_b, lb, gb);
          if (write_grad) ew_detail::write(gp, FAST ? 1 : gs, i, cnt, TAIL, ga, gb);
          if constexpr (P::kLoss) {
            if (write_loss) ew_detail::write(lp, FAST ? 1 : ls, i, cnt, TAIL, la, lb);
            if (sum) {
              if constexpr (TAIL) {
                const int64_t n0 = std::min<int64_t>(cnt, VS);
                la = V::set(V(0), la, n0);
                lb = V::set(V(0), lb, cnt - n0);
              }
              acc = acc + (la + lb);
            }
          }
        };
        auto span = [&](auto fast_tag, auto mask_tag) {
          int64_t i = i0;
          const int64_t iend = i0 + n;
          for (; i + PAIR <= iend; i += PAIR) step(i, PAIR, std::false_type(), fast_tag, mask_tag);
          if (i < iend) step(i, iend - i, std::true_type(), fast_tag, mask_tag);
        };
        bool fast = (!write_grad || gs == 1) && (!write_loss || ls == 1);
        int mask = 0;
        ew_detail::for_index<K>([&](auto j) {
          const int64_t s = std::get<decltype(j)::value>(rd).s;
          if (s == 0) mask |= 1 << decltype(j)::value;
          fast = fast && (s == 0 || s == 1);
        });
        constexpr int KD = ew_detail::DenseOperands<P>::value;
        if (fast && (mask & ((1 << KD) - 1)) == 0) {
          with_mode<(1 << (K - KD))>(mask >> KD, [&](auto m) {
            span(std::true_type(), std::integral_constant<int, (decltype(m)::value << KD)>());
          });
        } else {
          span(std::false_type(), std::integral_constant<int, 0>());
        }
        f += n;
        // Next row.
        idx[nd - 1] = 0;
        for (int k = nd - 2; k >= 0; --k) {
          if (++idx[k] < shape.size[k]) break;
          idx[k] = 0;
        }
      }
      if (sum) partial[blk] = hsum(acc);
    }
  });
  if (!sum) return A(0);
  double total = 0;
  for (const A p : partial) total += static_cast<double>(p);
  return static_cast<A>(total);
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
