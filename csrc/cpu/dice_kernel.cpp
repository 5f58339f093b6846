// Dice / Tversky / Dice+CE CPU kernels (docs/KERNELS.md, "Dice"), compiled once per instruction set
// by setup.py with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (see cpu_isa.h); the binding is dice.cpp.
// The per-position math is csrc/include/fusedloss/dice.h's, shared with the CUDA kernel.
//
// Written beside the softmax-row skeleton (softmax_rows.h), not as a policy of it: the skeleton
// reduces each row (position) to its own outputs, while Dice reduces every position of a batch
// row n into per-(n, c) sums, i.e. across rows, per class. The kernel keeps the skeleton's spatial
// tile (vec.h I/O, exp and NaN-propagating max):
//
//  - A tile is P = one pair of vectors (Io<T>::kPair: 32 float lanes on AVX-512) of consecutive
//    positions d of one n; lane l is position d0 + l. Its C logits per lane are staged as
//    [c][lane] in an L1 buffer: vector loads when the positions are contiguous (NCHW: class stride
//    D, position stride 1), a transposing gather otherwise (channels_last: class stride 1; any
//    other stride). The logits are read from memory once; the max, the exp-sum and the per-class
//    terms run over the staged tile.
//  - Forward (softmax): per lane m, s = sum exp(x - m), lse = m + log s (stored, (N, D)); per
//    class c, p_c = e_c / s and the class's terms (I, P, G, and NLL, SM with_ce / with_smoothing)
//    are added lane-wise into per-class vector accumulators, masked by selects (ignored positions
//    and tail lanes add nothing, even with NaN logits; a NaN or +inf logit at a counted position
//    makes its p and NLL NaN, so the NaN reaches the sums).
//  - Deterministic partial sums: the positions of each n are cut into fixed blocks of K positions
//    (dice_kernel.h, a function of C only); a block is one work unit, summed tile by tile in order
//    by one thread and reduced over its lanes in lane order into (C, 5) partials; the partials of
//    an n are then added in block order (in double). Neither depends on the thread count.
//  - Backward (softmax): one pass; per tile, p_c = exp(x_c - lse) from the saved lse and
//    s = sum_c p_c u_c (dice.h softmax_u_w) over the staged tile, then
//    dz_c = dice::softmax_grad_w(...) written through the gradient's strides (vector stores, or
//    a transposing scatter); ignored positions exactly 0, a non-finite lse NaN.
//  - D == 1 (a row n per position): tiles of consecutive n instead (fwd_rows, bwd_rows), each
//    lane's terms stored straight into sums[n]; no blocks.
//  - Sigmoid mode: the same tiles, per class p = sigmoid(z) (from exp(-|z|): no overflow, no
//    cancellation) and the float target; no staging (each element stands alone).
//
// All math in float (double for double input); 64-bit offsets; every class index is checked before
// it is compared or used as an address.
#include "dice_kernel.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <fusedloss/dice.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "vec.h"

namespace fusedloss::cpu::CPU_CAPABILITY {
namespace {

using dice::kG;
using dice::kI;
using dice::kNLL;
using dice::kP;
using dice::kSM;
using dice::kSums;

[[noreturn]] void bad_target(int64_t y, int64_t C, int64_t ignore_index) {
  TORCH_CHECK(false, "dice: target value ", y, " is out of range for ", C,
              " classes (valid: 0 <= target < ", C, ", or ignore_index = ", ignore_index, ")");
  std::abort();  // unreachable
}

// Tiles ahead that the NCHW staging prefetches (C strided streams, one pair each per tile).
constexpr int64_t kPrefetchTiles = 4;

// Work per parallel chunk, in elements, below which a call runs inline on the calling thread.
constexpr int64_t kGrainElems = 65536;

template <typename T>
struct Tiles {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = Io<T>;
  static constexpr int64_t PR = IO::kPair;
  static constexpr int64_t VS = V::size();

  // The np positions at element stride sd from p, as two vectors (lanes >= np are 0).
  static inline void load(const T* p, int64_t sd, int64_t np, V& v0, V& v1) {
    if (sd != 1) {
      IO::load_strided(p, sd, np, v0, v1);
    } else if (np == PR) {
      IO::load(p, v0, v1);
    } else {
      IO::load_n(p, np, v0, v1);
    }
  }
  static inline void store(T* p, int64_t sd, int64_t np, const V& v0, const V& v1) {
    if (sd != 1) {
      IO::store_strided(p, sd, np, v0, v1);
    } else if (np == PR) {
      IO::store(p, v0, v1);
    } else {
      IO::store_n(p, np, v0, v1);
    }
  }

  // Prefetch of a class row kPrefetchTiles tiles ahead (contiguous positions: C strided streams,
  // one pair each per tile; past the end of the row it fetches a line that is not needed).
  static inline void prefetch(const T* p) {
    const char* ahead = reinterpret_cast<const char*>(p + kPrefetchTiles * PR);
    for (int64_t b = 0; b < PR * int64_t(sizeof(T)); b += 64) __builtin_prefetch(ahead + b);
  }

  // Transposing gather of a tile whose positions are not contiguous: each position's C values in
  // memory order (channels_last: contiguous) into xs as [c][lane]; lanes >= np are 0.
  static inline void gather(const T* xb, int64_t C, int64_t sc, int64_t sd, int64_t np, A* xs) {
    for (int64_t l = 0; l < np; ++l) {
      const T* r = xb + l * sd;
      for (int64_t c = 0; c < C; ++c) xs[c * PR + l] = static_cast<A>(r[c * sc]);
    }
    for (int64_t l = np; l < PR; ++l) {
      for (int64_t c = 0; c < C; ++c) xs[c * PR + l] = A(0);
    }
  }

  // Stage the tile's C x np logits at xb (class stride sc, position stride sd) into xs as
  // [c][lane] (lanes >= np are 0) and return the lane-wise max in m0, m1 (NaN propagating).
  static inline void stage(const T* xb, int64_t C, int64_t sc, int64_t sd, int64_t np, A* xs, V& m0,
                           V& m1) {
    m0 = V(kLowest<A>);
    m1 = V(kLowest<A>);
    if (sd == 1) {
      for (int64_t c = 0; c < C; ++c) {
        prefetch(xb + c * sc);
        V v0, v1;
        load(xb + c * sc, 1, np, v0, v1);
        v0.store(xs + c * PR);
        v1.store(xs + c * PR + VS);
        m0 = vmax(m0, v0);
        m1 = vmax(m1, v1);
      }
      return;
    }
    gather(xb, C, sc, sd, np, xs);
    for (int64_t c = 0; c < C; ++c) {
      m0 = vmax(m0, V::loadu(xs + c * PR));
      m1 = vmax(m1, V::loadu(xs + c * PR + VS));
    }
  }

  // The tile's class indices as lane values: y, or -1 for ignored positions and lanes >= np.
  // Every index is checked before anything uses it.
  static inline void targets(const int64_t* t, int64_t sd, int64_t np, int64_t C, int64_t ii,
                             A* yb) {
    for (int64_t l = 0; l < PR; ++l) {
      if (l >= np) {
        yb[l] = A(-1);
        continue;
      }
      const int64_t y = t[l * sd];
      if (y == ii) {
        yb[l] = A(-1);
      } else {
        if (y < 0 || y >= C) bad_target(y, C, ii);
        yb[l] = static_cast<A>(y);
      }
    }
  }
};

// Whether the gradient's whole-pair stores at positions d0 (multiples of the pair) may be
// streaming stores: positions contiguous, every class and batch row vector-aligned, and a
// gradient far beyond the caches (vec.h: no read-for-ownership of lines never read again).
template <typename T>
inline bool stream_grad(const DiceArgs& a) {
  const T* g = static_cast<const T*>(a.grad);
  return a.g_sd == 1 && stream_aligned(g) && stream_aligned(g + a.g_sn) &&
         stream_aligned(g + a.g_sc) &&
         a.N * a.C * a.D * int64_t(sizeof(T)) >= kStreamMinBytes;
}

// sigmoid(x) and sigmoid(-x) from e = exp(-|x|) (dice.h's p and q: no overflow, no 1 - p), NaN
// propagating.
template <typename V>
inline void vsigmoid(const V& x, V& p, V& q) {
  const V zero(0), one(1);
  const V e = vexp(zero - x.abs());
  const V r = one / (one + e);
  const V er = e * r;
  const V pos = x >= zero;
  const V nan = x != x;
  p = V::blendv(V::blendv(er, r, pos), x, nan);
  q = V::blendv(V::blendv(r, er, pos), x, nan);
}

// Adds a block's lane accumulators (C, kSums, VS) into its (C, kSums) output, in lane order.
template <typename A>
inline void flush_block(const A* acc, int64_t C, A* out) {
  for (int64_t i = 0; i < C * kSums; ++i) out[i] = hsum(Vectorized<A>::loadu(acc + i * Vectorized<A>::size()));
}

// ---------------------------------------------------------------------------------------------
// Forward.

struct BlockPlan {
  int64_t K, per_n, units, grain;
};

inline BlockPlan plan_blocks(int64_t N, int64_t C, int64_t D) {
  BlockPlan b;
  b.K = dice_block_positions(C);
  b.per_n = (D + b.K - 1) / b.K;
  b.units = N * b.per_n;
  b.grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, std::min(b.K, D) * C));
  return b;
}

template <typename T, bool SQ, bool NLL>
void softmax_fwd(const DiceArgs& a) {
  using TL = Tiles<T>;
  using A = typename TL::A;
  using V = typename TL::V;
  constexpr int64_t PR = TL::PR, VS = TL::VS;
  const int64_t N = a.N, C = a.C, D = a.D;
  const BlockPlan bp = plan_blocks(N, C, D);
  const T* x = static_cast<const T*>(a.input);
  const int64_t* tg = static_cast<const int64_t*>(a.target);
  A* lse_out = static_cast<A*>(a.lse_out);
  A* out = static_cast<A*>(a.partials ? a.partials : a.sums);
  const bool ce = a.with_ce, smooth = a.with_smoothing;
  const int64_t ii = a.ignore_index;

  at::parallel_for(0, bp.units, bp.grain, [&](int64_t u0, int64_t u1) {
    std::vector<A> xsv(C * PR), esv(NLL ? C * PR : 0), accv(C * kSums * VS);
    A* xs = xsv.data();
    A* es = NLL ? esv.data() : xs;  // without NLL terms exp overwrites the staged logits
    A* acc = accv.data();
    alignas(64) A yb[PR], lb[PR];
    const V zero(0), one(1), nan(kNaN<A>), inf(kInf<A>);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / bp.per_n, j = u - n * bp.per_n;
      const int64_t dend = std::min((j + 1) * bp.K, D);
      std::fill(accv.begin(), accv.end(), A(0));
      for (int64_t d0 = j * bp.K; d0 < dend; d0 += PR) {
        const int64_t np = std::min(PR, dend - d0);
        TL::targets(tg + n * a.t_sn + d0 * a.t_sd, a.t_sd, np, C, ii, yb);
        const V y0 = V::loadu(yb), y1 = V::loadu(yb + VS);
        const V valid0 = y0 >= zero, valid1 = y1 >= zero;
        V m0, m1;
        TL::stage(x + n * a.in_sn + d0 * a.in_sd, C, a.in_sc, a.in_sd, np, xs, m0, m1);
        V s0(0), s1(0);
        for (int64_t c = 0; c < C; ++c) {
          const V e0 = vexp(V::loadu(xs + c * PR) - m0), e1 = vexp(V::loadu(xs + c * PR + VS) - m1);
          s0 = s0 + e0;
          s1 = s1 + e1;
          e0.store(es + c * PR);
          e1.store(es + c * PR + VS);
        }
        // A NaN logit (the max propagates it) or +inf: lse, p and NLL terms NaN (as torch).
        const V bad0 = (m0 != m0) | (m0 == inf), bad1 = (m1 != m1) | (m1 == inf);
        const V ls0 = V::blendv(s0.log(), nan, bad0), ls1 = V::blendv(s1.log(), nan, bad1);
        const V inv0 = V::blendv(one / s0, nan, bad0), inv1 = V::blendv(one / s1, nan, bad1);
        V::blendv(zero, m0 + ls0, valid0).store(lb);  // ignored positions: 0 (finite)
        V::blendv(zero, m1 + ls1, valid1).store(lb + VS);
        std::copy(lb, lb + np, lse_out + n * D + d0);
        for (int64_t c = 0; c < C; ++c) {
          const V cf(static_cast<A>(c));
          const V oh0 = y0 == cf, oh1 = y1 == cf;
          const V p0 = (V::loadu(es + c * PR) * inv0) & valid0;
          const V p1 = (V::loadu(es + c * PR + VS) * inv1) & valid1;
          A* ac = acc + c * kSums * VS;
          (V::loadu(ac + kI * VS) + ((p0 & oh0) + (p1 & oh1))).store(ac + kI * VS);
          (V::loadu(ac + kP * VS) + (dice::pred_term(p0, SQ) + dice::pred_term(p1, SQ)))
              .store(ac + kP * VS);
          (V::loadu(ac + kG * VS) + ((one & oh0) + (one & oh1))).store(ac + kG * VS);
          if constexpr (NLL) {
            // lse - x_c = (m - x_c) + log s: non-negative terms, no cancellation.
            const V nl0 = (m0 - V::loadu(xs + c * PR)) + ls0;
            const V nl1 = (m1 - V::loadu(xs + c * PR + VS)) + ls1;
            if (ce) (V::loadu(ac + kNLL * VS) + ((nl0 & oh0) + (nl1 & oh1))).store(ac + kNLL * VS);
            if (smooth) {
              (V::loadu(ac + kSM * VS) + ((nl0 & valid0) + (nl1 & valid1))).store(ac + kSM * VS);
            }
          }
        }
      }
      flush_block(acc, C, out + u * C * kSums);
    }
  });
}

template <typename T, bool SQ>
void sigmoid_fwd(const DiceArgs& a) {
  using TL = Tiles<T>;
  using A = typename TL::A;
  using V = typename TL::V;
  constexpr int64_t PR = TL::PR, VS = TL::VS;
  const int64_t N = a.N, C = a.C, D = a.D;
  const BlockPlan bp = plan_blocks(N, C, D);
  const T* x = static_cast<const T*>(a.input);
  const T* tg = static_cast<const T*>(a.target);
  A* out = static_cast<A*>(a.partials ? a.partials : a.sums);

  at::parallel_for(0, bp.units, bp.grain, [&](int64_t u0, int64_t u1) {
    std::vector<A> accv(C * kSums * VS);
    A* acc = accv.data();
    alignas(64) A lanes[PR];
    for (int64_t l = 0; l < PR; ++l) lanes[l] = static_cast<A>(l);
    const V lane0 = V::loadu(lanes), lane1 = V::loadu(lanes + VS);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / bp.per_n, j = u - n * bp.per_n;
      const int64_t dend = std::min((j + 1) * bp.K, D);
      std::fill(accv.begin(), accv.end(), A(0));
      for (int64_t d0 = j * bp.K; d0 < dend; d0 += PR) {
        const int64_t np = std::min(PR, dend - d0);
        const V npv(static_cast<A>(np));
        const V in0 = lane0 < npv, in1 = lane1 < npv;  // lanes that are positions
        const T* xb = x + n * a.in_sn + d0 * a.in_sd;
        const T* tb = tg + n * a.t_sn + d0 * a.t_sd;
        for (int64_t c = 0; c < C; ++c) {
          V x0, x1, t0, t1, p0, p1, q0, q1;
          TL::load(xb + c * a.in_sc, a.in_sd, np, x0, x1);
          TL::load(tb + c * a.t_sc, a.t_sd, np, t0, t1);
          vsigmoid(x0, p0, q0);
          vsigmoid(x1, p1, q1);
          p0 = p0 & in0;
          p1 = p1 & in1;
          A* ac = acc + c * kSums * VS;
          (V::loadu(ac + kI * VS) + (p0 * t0 + p1 * t1)).store(ac + kI * VS);
          (V::loadu(ac + kP * VS) + (dice::pred_term(p0, SQ) + dice::pred_term(p1, SQ)))
              .store(ac + kP * VS);
          (V::loadu(ac + kG * VS) + (dice::pred_term(t0, SQ) + dice::pred_term(t1, SQ)))
              .store(ac + kG * VS);
        }
      }
      flush_block(acc, C, out + u * C * kSums);
    }
  });
}

// D == 1: every position is a row n of its own, so its terms are its sums. Tiles of PR consecutive
// n (position stride in_sn) instead of one lane per tile and block: no reduction, each lane's
// terms stored straight into sums[n] (a (N, C) input runs at a softmax's pace).
template <typename T, bool SIG, bool SQ, bool NLL>
void fwd_rows(const DiceArgs& a) {
  using TL = Tiles<T>;
  using A = typename TL::A;
  using V = typename TL::V;
  constexpr int64_t PR = TL::PR, VS = TL::VS;
  const int64_t N = a.N, C = a.C;
  const int64_t tiles = (N + PR - 1) / PR;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (C * PR));
  const T* x = static_cast<const T*>(a.input);
  A* sums = static_cast<A*>(a.sums);
  A* lse_out = static_cast<A*>(a.lse_out);
  const bool ce = a.with_ce, smooth = a.with_smoothing;
  const int64_t ii = a.ignore_index;

  at::parallel_for(0, tiles, grain, [&](int64_t i0, int64_t i1) {
    std::vector<A> xsv(SIG ? 0 : C * PR), esv(NLL ? C * PR : 0);
    [[maybe_unused]] A* xs = xsv.data();
    [[maybe_unused]] A* es = NLL ? esv.data() : xs;
    [[maybe_unused]] alignas(64) A yb[PR], lb[PR];
    alignas(64) A ob[kSums][PR];
    [[maybe_unused]] const V one(1), nan(kNaN<A>), inf(kInf<A>);
    const V zero(0);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n0 = it * PR, np = std::min(PR, N - n0);
      A* so = sums + n0 * C * kSums;
      auto put = [&](int64_t c, int k, const V& v0, const V& v1) {
        v0.store(ob[k]);
        v1.store(ob[k] + VS);
        for (int64_t l = 0; l < np; ++l) so[(l * C + c) * kSums + k] = ob[k][l];
      };
      if constexpr (SIG) {
        const T* xb = x + n0 * a.in_sn;
        const T* tb = static_cast<const T*>(a.target) + n0 * a.t_sn;
        for (int64_t c = 0; c < C; ++c) {
          V x0, x1, t0, t1, p0, p1, q0, q1;
          TL::load(xb + c * a.in_sc, a.in_sn, np, x0, x1);
          TL::load(tb + c * a.t_sc, a.t_sn, np, t0, t1);
          vsigmoid(x0, p0, q0);
          vsigmoid(x1, p1, q1);
          put(c, kI, p0 * t0, p1 * t1);
          put(c, kP, dice::pred_term(p0, SQ), dice::pred_term(p1, SQ));
          put(c, kG, dice::pred_term(t0, SQ), dice::pred_term(t1, SQ));
          put(c, kNLL, zero, zero);
          put(c, kSM, zero, zero);
        }
      } else {
        TL::targets(static_cast<const int64_t*>(a.target) + n0 * a.t_sn, a.t_sn, np, C, ii, yb);
        const V y0 = V::loadu(yb), y1 = V::loadu(yb + VS);
        const V valid0 = y0 >= zero, valid1 = y1 >= zero;
        V m0, m1;
        TL::stage(x + n0 * a.in_sn, C, a.in_sc, a.in_sn, np, xs, m0, m1);
        V s0(0), s1(0);
        for (int64_t c = 0; c < C; ++c) {
          const V e0 = vexp(V::loadu(xs + c * PR) - m0), e1 = vexp(V::loadu(xs + c * PR + VS) - m1);
          s0 = s0 + e0;
          s1 = s1 + e1;
          e0.store(es + c * PR);
          e1.store(es + c * PR + VS);
        }
        const V bad0 = (m0 != m0) | (m0 == inf), bad1 = (m1 != m1) | (m1 == inf);
        const V ls0 = V::blendv(s0.log(), nan, bad0), ls1 = V::blendv(s1.log(), nan, bad1);
        const V inv0 = V::blendv(one / s0, nan, bad0), inv1 = V::blendv(one / s1, nan, bad1);
        V::blendv(zero, m0 + ls0, valid0).store(lb);  // ignored positions: 0 (finite)
        V::blendv(zero, m1 + ls1, valid1).store(lb + VS);
        std::copy(lb, lb + np, lse_out + n0);
        for (int64_t c = 0; c < C; ++c) {
          const V cf(static_cast<A>(c));
          const V oh0 = y0 == cf, oh1 = y1 == cf;
          const V p0 = (V::loadu(es + c * PR) * inv0) & valid0;
          const V p1 = (V::loadu(es + c * PR + VS) * inv1) & valid1;
          put(c, kI, p0 & oh0, p1 & oh1);
          put(c, kP, dice::pred_term(p0, SQ), dice::pred_term(p1, SQ));
          put(c, kG, one & oh0, one & oh1);
          V nl0 = zero, nl1 = zero;
          if constexpr (NLL) {
            nl0 = (m0 - V::loadu(xs + c * PR)) + ls0;
            nl1 = (m1 - V::loadu(xs + c * PR + VS)) + ls1;
          }
          put(c, kNLL, ce ? (nl0 & oh0) : zero, ce ? (nl1 & oh1) : zero);
          put(c, kSM, smooth ? (nl0 & valid0) : zero, smooth ? (nl1 & valid1) : zero);
        }
      }
    }
  });
}

// The partials of each n, added in block order (in double), into sums (N, C, kSums).
template <typename A>
void combine_partials(const DiceArgs& a) {
  const int64_t N = a.N, CS = a.C * kSums;
  const int64_t per_n = dice_blocks_along(a.C, a.D);
  const A* part = static_cast<const A*>(a.partials);
  A* sums = static_cast<A*>(a.sums);
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / (per_n * CS)), [&](int64_t n0, int64_t n1) {
    std::vector<double> buf(CS);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(buf.begin(), buf.end(), 0.0);
      for (int64_t j = 0; j < per_n; ++j) {
        const A* p = part + (n * per_n + j) * CS;
        for (int64_t i = 0; i < CS; ++i) buf[i] += static_cast<double>(p[i]);
      }
      for (int64_t i = 0; i < CS; ++i) sums[n * CS + i] = static_cast<A>(buf[i]);
    }
  });
}

template <typename T>
void fwd_typed(const DiceArgs& a) {
  using A = acc_t<T>;
  if (a.D == 1) {
    with_bool(a.squared_pred, [&](auto sq) {
      if (a.sigmoid) {
        fwd_rows<T, true, decltype(sq)::value, false>(a);
      } else {
        with_bool(a.with_ce || a.with_smoothing, [&](auto nll) {
          fwd_rows<T, false, decltype(sq)::value, decltype(nll)::value>(a);
        });
      }
    });
    return;
  }
  if (a.sigmoid) {
    with_bool(a.squared_pred, [&](auto sq) { sigmoid_fwd<T, decltype(sq)::value>(a); });
  } else {
    with_bool(a.squared_pred, [&](auto sq) {
      with_bool(a.with_ce || a.with_smoothing, [&](auto nll) {
        softmax_fwd<T, decltype(sq)::value, decltype(nll)::value>(a);
      });
    });
  }
  if (a.partials) combine_partials<A>(a);
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <typename T, bool SQ>
void softmax_bwd(const DiceArgs& a) {
  using TL = Tiles<T>;
  using A = typename TL::A;
  using V = typename TL::V;
  constexpr int64_t PR = TL::PR, VS = TL::VS;
  const int64_t N = a.N, C = a.C, D = a.D;
  const int64_t tiles = (D + PR - 1) / PR;
  const T* x = static_cast<const T*>(a.input);
  const int64_t* tg = static_cast<const int64_t*>(a.target);
  const A* gsums = static_cast<const A*>(a.grad_sums);
  const A* lse = static_cast<const A*>(a.lse_in);
  T* g = static_cast<T*>(a.grad);
  const bool ce = a.with_ce, smooth = a.with_smoothing;
  const int64_t ii = a.ignore_index;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (C * PR));
  const bool stream = stream_grad<T>(a);

  at::parallel_for(0, N * tiles, grain, [&](int64_t u0, int64_t u1) {
    std::vector<A> xsv(C * PR), gsv(a.g_sd == 1 ? 0 : C * PR);
    A* xs = xsv.data();  // staged logits, then p
    A* gs = gsv.data();  // the gradient tile of a scatter
    alignas(64) A yb[PR], lb[PR], gnb[PR];
    const V zero(0), one(1), nan(kNaN<A>), inf(kInf<A>);
    int64_t n_cached = -1;
    A sum_gsm = 0;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / tiles, d0 = (u - n * tiles) * PR;
      const int64_t np = std::min(PR, D - d0);
      const A* gS = gsums + n * C * kSums;
      if (n != n_cached) {  // sum_c gSM[c], in class order
        sum_gsm = 0;
        if (smooth) {
          for (int64_t c = 0; c < C; ++c) sum_gsm += gS[c * kSums + kSM];
        }
        n_cached = n;
      }
      TL::targets(tg + n * a.t_sn + d0 * a.t_sd, a.t_sd, np, C, ii, yb);
      for (int64_t l = 0; l < PR; ++l) {
        lb[l] = l < np && lse != nullptr ? lse[n * D + d0 + l] : A(0);
        gnb[l] = ce && yb[l] >= A(0) ? gS[static_cast<int64_t>(yb[l]) * kSums + kNLL] : A(0);
      }
      const V y0 = V::loadu(yb), y1 = V::loadu(yb + VS);
      const V valid0 = y0 >= zero, valid1 = y1 >= zero;
      const T* xb = x + n * a.in_sn + d0 * a.in_sd;
      V L0 = V::loadu(lb), L1 = V::loadu(lb + VS);
      // The tile staged in xs: always without a saved lse (its logsumexp from the staged values,
      // the forward's way), else for a gather of non-contiguous positions.
      const bool staged = lse == nullptr || a.in_sd != 1;
      if (lse == nullptr) {
        V m0, m1;
        TL::stage(xb, C, a.in_sc, a.in_sd, np, xs, m0, m1);
        V e0(0), e1(0);
        for (int64_t c = 0; c < C; ++c) {
          e0 = e0 + vexp(V::loadu(xs + c * PR) - m0);
          e1 = e1 + vexp(V::loadu(xs + c * PR + VS) - m1);
        }
        L0 = V::blendv(m0 + e0.log(), nan, (m0 != m0) | (m0 == inf));
        L1 = V::blendv(m1 + e1.log(), nan, (m1 != m1) | (m1 == inf));
      } else if (a.in_sd != 1) {
        TL::gather(xb, C, a.in_sc, a.in_sd, np, xs);
      }
      const V gn0 = V::loadu(gnb), gn1 = V::loadu(gnb + VS);
      // A non-finite lse (NaN or inf logits, or all -inf): a NaN gradient, as torch.
      const V bad0 = (L0 != L0) | (L0.abs() == inf), bad1 = (L1 != L1) | (L1.abs() == inf);
      // p = exp(x - lse) (staged in xs) and s = sum_c p_c u_c. Contiguous positions: straight
      // from the vector loads; otherwise from the staged tile.
      V s0(0), s1(0);
      for (int64_t c = 0; c < C; ++c) {
        const V cf(static_cast<A>(c));
        const V gI(gS[c * kSums + kI]), gP(gS[c * kSums + kP]);
        V x0, x1;
        if (!staged) {
          TL::prefetch(xb + c * a.in_sc);
          TL::load(xb + c * a.in_sc, 1, np, x0, x1);
        } else {
          x0 = V::loadu(xs + c * PR);
          x1 = V::loadu(xs + c * PR + VS);
        }
        const V p0 = vexp(x0 - L0), p1 = vexp(x1 - L1);
        p0.store(xs + c * PR);
        p1.store(xs + c * PR + VS);
        s0 = s0 + p0 * dice::softmax_u_w(p0, one & (y0 == cf), gI, gP, SQ);
        s1 = s1 + p1 * dice::softmax_u_w(p1, one & (y1 == cf), gI, gP, SQ);
      }
      const V sg(sum_gsm);
      T* gb = g + n * a.g_sn + d0 * a.g_sd;
      for (int64_t c = 0; c < C; ++c) {
        const V cf(static_cast<A>(c));
        const V gI(gS[c * kSums + kI]), gP(gS[c * kSums + kP]);
        const V gsm(smooth ? gS[c * kSums + kSM] : A(0));
        const V p0 = V::loadu(xs + c * PR), p1 = V::loadu(xs + c * PR + VS);
        const V t0 = one & (y0 == cf), t1 = one & (y1 == cf);
        V g0 = dice::softmax_grad_w(p0, dice::softmax_u_w(p0, t0, gI, gP, SQ), s0, t0, gn0, sg, gsm);
        V g1 = dice::softmax_grad_w(p1, dice::softmax_u_w(p1, t1, gI, gP, SQ), s1, t1, gn1, sg, gsm);
        g0 = V::blendv(g0, nan, bad0) & valid0;  // ignored positions: exactly 0
        g1 = V::blendv(g1, nan, bad1) & valid1;
        if (a.g_sd == 1) {
          if (stream && np == PR) {
            TL::IO::stream(gb + c * a.g_sc, g0, g1);
          } else {
            TL::store(gb + c * a.g_sc, 1, np, g0, g1);
          }
        } else {
          g0.store(gs + c * PR);
          g1.store(gs + c * PR + VS);
        }
      }
      if (a.g_sd != 1) {  // transposing scatter: each position's C values in memory order
        for (int64_t l = 0; l < np; ++l) {
          T* r = gb + l * a.g_sd;
          for (int64_t c = 0; c < C; ++c) r[c * a.g_sc] = static_cast<T>(gs[c * PR + l]);
        }
      }
    }
    if (stream) stream_fence();
  });
}

template <typename T, bool SQ>
void sigmoid_bwd(const DiceArgs& a) {
  using TL = Tiles<T>;
  using A = typename TL::A;
  using V = typename TL::V;
  constexpr int64_t PR = TL::PR;
  const int64_t N = a.N, C = a.C, D = a.D;
  const int64_t tiles = (D + PR - 1) / PR;
  const T* x = static_cast<const T*>(a.input);
  const T* tg = static_cast<const T*>(a.target);
  const A* gsums = static_cast<const A*>(a.grad_sums);
  T* g = static_cast<T*>(a.grad);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (C * PR));
  const bool stream = stream_grad<T>(a);

  at::parallel_for(0, N * tiles, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / tiles, d0 = (u - n * tiles) * PR;
      const int64_t np = std::min(PR, D - d0);
      const A* gS = gsums + n * C * kSums;
      const T* xb = x + n * a.in_sn + d0 * a.in_sd;
      const T* tb = tg + n * a.t_sn + d0 * a.t_sd;
      T* gb = g + n * a.g_sn + d0 * a.g_sd;
      for (int64_t c = 0; c < C; ++c) {
        const V gI(gS[c * kSums + kI]), gP(gS[c * kSums + kP]);
        V x0, x1, t0, t1, p0, p1, q0, q1;
        TL::load(xb + c * a.in_sc, a.in_sd, np, x0, x1);
        TL::load(tb + c * a.t_sc, a.t_sd, np, t0, t1);
        vsigmoid(x0, p0, q0);
        vsigmoid(x1, p1, q1);
        const V g0 = dice::sigmoid_grad(p0, q0, t0, gI, gP, SQ);
        const V g1 = dice::sigmoid_grad(p1, q1, t1, gI, gP, SQ);
        if (stream && np == PR) {
          TL::IO::stream(gb + c * a.g_sc, g0, g1);
        } else {
          TL::store(gb + c * a.g_sc, a.g_sd, np, g0, g1);
        }
      }
    }
    if (stream) stream_fence();
  });
}

// D == 1 (see fwd_rows): tiles of PR consecutive n; each lane has its own upstream gradients,
// transposed once per tile into [c][lane] like the logits.
template <typename T, bool SIG, bool SQ>
void bwd_rows(const DiceArgs& a) {
  using TL = Tiles<T>;
  using A = typename TL::A;
  using V = typename TL::V;
  constexpr int64_t PR = TL::PR, VS = TL::VS;
  const int64_t N = a.N, C = a.C;
  const int64_t tiles = (N + PR - 1) / PR;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (C * PR));
  const T* x = static_cast<const T*>(a.input);
  const A* gsums = static_cast<const A*>(a.grad_sums);
  const A* lse = static_cast<const A*>(a.lse_in);
  T* g = static_cast<T*>(a.grad);
  const bool ce = a.with_ce, smooth = a.with_smoothing;
  const int64_t ii = a.ignore_index;
  constexpr int kCoef = 3;  // I, P, SM
  constexpr int kIdx[kCoef] = {kI, kP, kSM};

  at::parallel_for(0, tiles, grain, [&](int64_t i0, int64_t i1) {
    std::vector<A> xsv(SIG ? 0 : C * PR), cfv(kCoef * C * PR);
    [[maybe_unused]] A* xs = xsv.data();
    A* cf = cfv.data();  // [k][c][lane]
    [[maybe_unused]] alignas(64) A yb[PR], lb[PR], gnb[PR], sgb[PR];
    [[maybe_unused]] const V zero(0), one(1), nan(kNaN<A>), inf(kInf<A>);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n0 = it * PR, np = std::min(PR, N - n0);
      const A* gS0 = gsums + n0 * C * kSums;
      for (int64_t l = 0; l < PR; ++l) {
        for (int k = 0; k < kCoef; ++k) {
          A* dst = cf + k * C * PR + l;
          if (l < np && (k != 2 || smooth)) {
            for (int64_t c = 0; c < C; ++c) dst[c * PR] = gS0[(l * C + c) * kSums + kIdx[k]];
          } else {
            for (int64_t c = 0; c < C; ++c) dst[c * PR] = A(0);
          }
        }
      }
      auto coef = [&](int k, int64_t c, int h) { return V::loadu(cf + (k * C + c) * PR + h * VS); };
      T* gb = g + n0 * a.g_sn;
      if constexpr (SIG) {
        const T* xb = x + n0 * a.in_sn;
        const T* tb = static_cast<const T*>(a.target) + n0 * a.t_sn;
        for (int64_t c = 0; c < C; ++c) {
          V x0, x1, t0, t1, p0, p1, q0, q1;
          TL::load(xb + c * a.in_sc, a.in_sn, np, x0, x1);
          TL::load(tb + c * a.t_sc, a.t_sn, np, t0, t1);
          vsigmoid(x0, p0, q0);
          vsigmoid(x1, p1, q1);
          TL::store(gb + c * a.g_sc, a.g_sn, np,
                    dice::sigmoid_grad(p0, q0, t0, coef(0, c, 0), coef(1, c, 0), SQ),
                    dice::sigmoid_grad(p1, q1, t1, coef(0, c, 1), coef(1, c, 1), SQ));
        }
      } else {
        TL::targets(static_cast<const int64_t*>(a.target) + n0 * a.t_sn, a.t_sn, np, C, ii, yb);
        for (int64_t l = 0; l < PR; ++l) {
          lb[l] = l < np && lse != nullptr ? lse[n0 + l] : A(0);
          gnb[l] = ce && yb[l] >= A(0)
                       ? gS0[(l * C + static_cast<int64_t>(yb[l])) * kSums + kNLL] : A(0);
          A sg = 0;
          if (smooth && l < np) {
            for (int64_t c = 0; c < C; ++c) sg += gS0[(l * C + c) * kSums + kSM];
          }
          sgb[l] = sg;
        }
        const V y0 = V::loadu(yb), y1 = V::loadu(yb + VS);
        const V valid0 = y0 >= zero, valid1 = y1 >= zero;
        V L0 = V::loadu(lb), L1 = V::loadu(lb + VS);
        const V gn0 = V::loadu(gnb), gn1 = V::loadu(gnb + VS);
        const V sg0 = V::loadu(sgb), sg1 = V::loadu(sgb + VS);
        const T* xb = x + n0 * a.in_sn;
        if (a.in_sn != 1) {
          TL::gather(xb, C, a.in_sc, a.in_sn, np, xs);
        } else {
          for (int64_t c = 0; c < C; ++c) {
            V v0, v1;
            TL::load(xb + c * a.in_sc, 1, np, v0, v1);
            v0.store(xs + c * PR);
            v1.store(xs + c * PR + VS);
          }
        }
        if (lse == nullptr) {  // no saved lse: the staged tile's logsumexp, the forward's way
          V m0(kLowest<A>), m1(kLowest<A>), e0(0), e1(0);
          for (int64_t c = 0; c < C; ++c) {
            m0 = vmax(m0, V::loadu(xs + c * PR));
            m1 = vmax(m1, V::loadu(xs + c * PR + VS));
          }
          for (int64_t c = 0; c < C; ++c) {
            e0 = e0 + vexp(V::loadu(xs + c * PR) - m0);
            e1 = e1 + vexp(V::loadu(xs + c * PR + VS) - m1);
          }
          L0 = V::blendv(m0 + e0.log(), nan, (m0 != m0) | (m0 == inf));
          L1 = V::blendv(m1 + e1.log(), nan, (m1 != m1) | (m1 == inf));
        }
        const V bad0 = (L0 != L0) | (L0.abs() == inf), bad1 = (L1 != L1) | (L1.abs() == inf);
        V s0(0), s1(0);
        for (int64_t c = 0; c < C; ++c) {
          const V cv(static_cast<A>(c));
          const V p0 = vexp(V::loadu(xs + c * PR) - L0), p1 = vexp(V::loadu(xs + c * PR + VS) - L1);
          p0.store(xs + c * PR);
          p1.store(xs + c * PR + VS);
          s0 = s0 + p0 * dice::softmax_u_w(p0, one & (y0 == cv), coef(0, c, 0), coef(1, c, 0), SQ);
          s1 = s1 + p1 * dice::softmax_u_w(p1, one & (y1 == cv), coef(0, c, 1), coef(1, c, 1), SQ);
        }
        for (int64_t c = 0; c < C; ++c) {
          const V cv(static_cast<A>(c));
          const V p0 = V::loadu(xs + c * PR), p1 = V::loadu(xs + c * PR + VS);
          const V t0 = one & (y0 == cv), t1 = one & (y1 == cv);
          V g0 = dice::softmax_grad_w(
              p0, dice::softmax_u_w(p0, t0, coef(0, c, 0), coef(1, c, 0), SQ), s0, t0, gn0, sg0,
              coef(2, c, 0));
          V g1 = dice::softmax_grad_w(
              p1, dice::softmax_u_w(p1, t1, coef(0, c, 1), coef(1, c, 1), SQ), s1, t1, gn1, sg1,
              coef(2, c, 1));
          g0 = V::blendv(g0, nan, bad0) & valid0;
          g1 = V::blendv(g1, nan, bad1) & valid1;
          TL::store(gb + c * a.g_sc, a.g_sn, np, g0, g1);
        }
      }
    }
  });
}

template <typename T>
void bwd_typed(const DiceArgs& a) {
  with_bool(a.squared_pred, [&](auto sq) {
    if (a.D == 1) {
      with_bool(a.sigmoid, [&](auto sig) {
        bwd_rows<T, decltype(sig)::value, decltype(sq)::value>(a);
      });
    } else if (a.sigmoid) {
      sigmoid_bwd<T, decltype(sq)::value>(a);
    } else {
      softmax_bwd<T, decltype(sq)::value>(a);
    }
  });
}

}  // namespace

void dice_fwd_kernel(const DiceArgs& args) {
  if (args.N * args.D == 0) return;
  by_dtype(args.dtype, [&](auto tag) { fwd_typed<decltype(tag)>(args); });
}

void dice_bwd_kernel(const DiceArgs& args) {
  if (args.N * args.D == 0) return;
  by_dtype(args.dtype, [&](auto tag) { bwd_typed<decltype(tag)>(args); });
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
