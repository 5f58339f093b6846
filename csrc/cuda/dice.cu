// dice_fwd / dice_bwd on CUDA (schemas in csrc/registration.cpp, contract in
// docs/KERNELS_dice_contract.md): the per-(n, c) sums of Dice / Tversky / Dice+CE from logits and
// class indices (or sigmoid with float targets), and the logits' gradient from the sums' upstream
// gradient. The per-position math is csrc/include/fusedloss/dice.h's (lse_step, sigmoid_pq,
// softmax_u, softmax_grad, sigmoid_grad), the functions the CPU kernel's tests run on the host.
//
// Not the softmax-row skeleton: Dice reduces to per-(n, c) sums over positions, not per-row losses,
// so the kernels are written beside it, on common.cuh's vector I/O and launch helpers.
//
// Work units. A unit is a tile of kDiceThreads * K consecutive positions d of one n (K = one
// 128-bit vector of the input's elements: 4 float, 8 bf16 / fp16, 2 double), so U = ceil(D / tile)
// units per n and N * U units in all, fixed by (N, D) and the dtype alone (never by the device or
// the grid). A block of 256 threads (8 warps) takes units in a grid-stride loop (the grid is capped,
// so N * D up to 2^31 positions and beyond stays within gridDim.x); thread t of the block owns the
// K consecutive positions d0 = tile start + t * K ... d0 + K - 1, so that a warp's loads of one
// class are one contiguous run of 32 * K elements along d for NCHW logits (class stride D), loaded
// as one 128-bit vector per thread where the rows are 16-byte aligned, else element by element
// through the strides (channels_last (C*D, 1, C) and any other layout).
//
// Forward, per unit:
//   softmax pass 1  each thread reads its positions' targets (checked: ignore_index -> ignored;
//                   outside [0, C) -> the device assert's message, then a trap; a target is only
//                   ever compared with c, never used as an address, so nothing is read out of
//                   bounds before the check) and their C logits, folding them into K online
//                   logsumexp states (dice::lse_step, one exp per logit), and stores lse (N, D).
//   pass 2          in chunks of 32 classes: for each class c the thread adds its positions' terms
//                   (I = p [c == y], P = p or p^2, G = [c == y], NLL = (lse - z) [c == y],
//                   SM = lse - z; sigmoid: p g, p or p^2, g or g^2), the warp all-reduces them
//                   (butterfly, the same order every time), and lane c - c0 keeps the warp's total;
//                   after the chunk the 8 warps' totals go through shared memory and are added in
//                   warp order into the unit's slot of the workspace (N, C, 5, U). Pass 2 reads
//                   the logits that pass 1 just read (from L1 / L2, not DRAM, for the usual C).
//   reduce          a second kernel adds each (n, c, k)'s U unit sums, a warp per output (lane j
//                   sums units j, j + 32, ..., then a butterfly): a fixed order, so the sums are
//                   bitwise the same on every call. U == 1 (D <= tile) writes the sums directly.
// No float atomics anywhere. Accumulation in float (double for double input).
//
// Backward, per unit: one kernel, no reduction. Softmax: p = exp(z - lse) from the saved lse;
// a first sweep over the classes gives s = sum_c p_c u_c and gNLL[y], a second writes
// dz_c = dice::softmax_grad(...) (ignored positions exactly 0). Sigmoid: one sweep,
// dz = dice::sigmoid_grad. The gradient is allocated like the input (empty_like: the input's
// strides when it is non-overlapping and dense) and stored through its strides, 128-bit vectors
// where its rows are aligned.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common.cuh"
#include "fusedloss/dice.h"

namespace fusedloss {
namespace cuda {
namespace {

using dice::kG;
using dice::kI;
using dice::kNLL;
using dice::kP;
using dice::kSM;
using dice::kSums;

constexpr int kDiceThreads = 256;
constexpr int kDiceWarps = kDiceThreads / kWarpSize;
constexpr int64_t kDiceBlocksPerSm = 32;  // grid cap, in blocks per SM (grid-stride beyond)

// Kernel variants: softmax (I, P, G), softmax with the CE sums (NLL, SM too), sigmoid (I, P, G).
enum DiceMode : int { kSoftmax = 0, kSoftmaxCE = 1, kSigmoid = 2 };

// Positions per thread: one 128-bit vector of the input's elements.
template <typename scalar_t>
constexpr int dice_ppt() {
  return vec_size<scalar_t>();
}

// Positions per unit.
template <typename scalar_t>
constexpr int64_t dice_tile() {
  return static_cast<int64_t>(kDiceThreads) * dice_ppt<scalar_t>();
}

// The class code of a position: its class in [0, C), or one of these.
constexpr int kNoClass = -1;    // ignored, or past the end of the row (d >= D)
constexpr int kBadClass = -2;   // target outside [0, C) and not ignore_index (trapped; its lse
                                // is NaN, so no number comes out of it if the trap is ever lifted)

template <typename scalar_t, typename acc_t>
struct DiceArgs {
  const scalar_t* x;  // (N, C, D) logits
  int64_t xN, xC, xD;
  const int64_t* y;  // softmax: (N, D) class indices
  int64_t yN, yD;
  const scalar_t* t;  // sigmoid: (N, C, D) targets
  int64_t tN, tC, tD;
  acc_t* lse;        // softmax: (N, D) contiguous; written by the forward, read by the backward
  acc_t* ws;         // forward: (N, C, kSums, U) unit sums (the sums themselves when U == 1)
  const acc_t* gs;   // backward: (N, C, kSums) contiguous upstream gradient of the sums
  scalar_t* g;       // backward: (N, C, D) gradient
  int64_t gN, gC, gD;
  int64_t N, C, D, U, units;
  int64_t ignore_index;
  bool x_vec, y_vec, t_vec, lse_vec, g_vec;  // 128-bit access of full runs of K positions
  bool squared_pred, with_ce, with_smoothing;
};

// K consecutive positions' elements, p[0], p[stride], ... (count of them, 0..K; T(0) beyond), or
// with vec (count == K, stride 1, p 16-byte aligned) as K * sizeof(T) / 16 128-bit loads.
template <int K, typename T>
__device__ __forceinline__ void load_run(const T* p, int64_t stride, int count, bool vec,
                                         T (&out)[K]) {
  if (vec) {
    constexpr int V = vec_size<T>();
    static_assert(K % V == 0, "a run is whole 16-byte vectors");
#pragma unroll
    for (int i = 0; i < K / V; ++i) {
      const AlignedVec<T, V> v = load_vec(p + i * V);
#pragma unroll
      for (int j = 0; j < V; ++j) out[i * V + j] = v.val[j];
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = k < count ? p[k * stride] : T(0);
  }
}

// The store of load_run's run.
template <int K, typename T>
__device__ __forceinline__ void store_run(T* p, int64_t stride, int count, bool vec,
                                          const T (&v)[K]) {
  if (vec) {
    constexpr int V = vec_size<T>();
    static_assert(K % V == 0, "a run is whole 16-byte vectors");
#pragma unroll
    for (int i = 0; i < K / V; ++i) {
      AlignedVec<T, V> o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.val[j] = v[i * V + j];
      store_vec(p + i * V, o);
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < count) p[k * stride] = v[k];
    }
  }
}

// Depth of the class-sweep load pipeline: the loads of the next kSweepAhead classes are in flight
// while one class is processed (the first sweep over a position's logits comes from DRAM).
constexpr int kSweepAhead = 3;

// Calls f(c, z) for c = 0 .. C - 1 in order, z the thread's K positions' logits of class c
// (load_run of xp + c * xC), the loads running kSweepAhead classes ahead.
template <int K, typename T, typename F>
__device__ __forceinline__ void class_sweep(const T* xp, int64_t xC, int64_t xD, int count,
                                            bool vec, int64_t C, F&& f) {
  constexpr int A = kSweepAhead;
  T q[A][K];
#pragma unroll
  for (int i = 0; i < A; ++i) {
    if (i < C) load_run<K>(xp + i * xC, xD, count, vec, q[i]);
  }
  for (int64_t c = 0; c < C; ++c) {
    T z[K];
#pragma unroll
    for (int k = 0; k < K; ++k) z[k] = q[0][k];
#pragma unroll
    for (int i = 0; i + 1 < A; ++i) {
#pragma unroll
      for (int k = 0; k < K; ++k) q[i][k] = q[i + 1][k];
    }
    if (c + A < C) load_run<K>(xp + (c + A) * xC, xD, count, vec, q[A - 1]);
    f(c, z);
  }
}

// A target outside [0, C) that is not ignore_index: the device assert (its message), then a trap.
// Out of line and noreturn, so that the kernels keep no values alive across the call (an inline
// assert's call made the float64 backward spill on sm_90).
[[noreturn]] __device__ __noinline__ void dice_bad_target() {
  CUDA_KERNEL_ASSERT(false && "dice_loss: target out of bounds (not in [0, C), not ignore_index)");
  __trap();
  __builtin_unreachable();
}

// The class codes of a thread's positions d0 .. d0 + K - 1 of row n (count of them in the row).
template <int K, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_classes(const DiceArgs<scalar_t, acc_t>& a, int64_t n,
                                             int64_t d0, int count, bool full, int (&cls)[K]) {
  int64_t yv[K];
  load_run<K>(a.y + n * a.yN + d0 * a.yD, a.yD, count, a.y_vec && full, yv);
  bool ok = true;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const bool ignored = yv[k] == a.ignore_index;
    const bool in_range = yv[k] >= 0 && yv[k] < a.C;
    ok = ok && (k >= count || ignored || in_range);
    cls[k] = (k >= count || ignored) ? kNoClass
             : in_range              ? static_cast<int>(yv[k])
                                     : kBadClass;
  }
  if (!ok) dice_bad_target();
}

// S sums as a reduction state for common.cuh's warp_allreduce (a butterfly: every lane ends with
// the same totals, added in the same order on every call).
template <int S, typename acc_t>
struct SumsState {
  acc_t v[S] = {};
  __device__ __forceinline__ void merge(const SumsState& o) {
#pragma unroll
    for (int i = 0; i < S; ++i) v[i] += o.v[i];
  }
};

template <int S, typename acc_t>
__device__ __forceinline__ void warp_allreduce_sums(acc_t (&v)[S]) {
  SumsState<S, acc_t> st;
#pragma unroll
  for (int i = 0; i < S; ++i) st.v[i] = v[i];
  warp_allreduce(st);
#pragma unroll
  for (int i = 0; i < S; ++i) v[i] = st.v[i];
}

// ------------------------------------------------------------------------------------------------
// Forward: unit sums (and lse).

template <typename scalar_t, typename acc_t, int MODE>
__global__ void __launch_bounds__(kDiceThreads)
    dice_fwd_kernel(const DiceArgs<scalar_t, acc_t> a) {
  constexpr int K = dice_ppt<scalar_t>();
  constexpr bool SIG = MODE == kSigmoid;
  constexpr bool CE = MODE == kSoftmaxCE;
  constexpr int NS = CE ? 5 : 3;  // sums computed: I, P, G (, NLL, SM)
  static_assert(kI == 0 && kP == 1 && kG == 2 && kNLL == 3 && kSM == 4, "DiceSum order");
  __shared__ acc_t sh[kDiceWarps][kWarpSize][NS];
  const int tid = threadIdx.x;
  const int lane = tid & (kWarpSize - 1);
  const int wid = tid / kWarpSize;
  const int64_t tile = dice_tile<scalar_t>();
  const bool sq = a.squared_pred;

  for (int64_t unit = blockIdx.x; unit < a.units; unit += gridDim.x) {  // block-uniform
    const int64_t n = unit / a.U;
    const int64_t u = unit - n * a.U;
    const int64_t d0 = u * tile + static_cast<int64_t>(tid) * K;
    const int count = d0 < a.D ? static_cast<int>(a.D - d0 < K ? a.D - d0 : K) : 0;
    const bool full = count == K;
    const bool xv = a.x_vec && full;
    const scalar_t* xp = a.x + n * a.xN + d0 * a.xD;  // class 0 at the thread's first position

    int cls[K];
    acc_t lse[K];
    const scalar_t* tp = nullptr;
    if constexpr (SIG) {
      tp = a.t + n * a.tN + d0 * a.tD;
    } else {
      load_classes<K>(a, n, d0, count, full, cls);
      // ---- pass 1: logsumexp over the classes at each position
      acc_t m[K], s[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        m[k] = -INFINITY;
        s[k] = acc_t(0);
      }
      class_sweep<K>(xp, a.xC, a.xD, count, xv, a.C, [&](int64_t, const scalar_t(&z)[K]) {
#pragma unroll
        for (int k = 0; k < K; ++k) dice::lse_step(m[k], s[k], static_cast<acc_t>(z[k]));
      });
#pragma unroll
      for (int k = 0; k < K; ++k) {
        lse[k] = cls[k] == kBadClass ? acc_t(NAN) : m[k] + fl_log(s[k]);
      }
      store_run<K>(a.lse + n * a.D + d0, 1, count, a.lse_vec && full, lse);
    }

    // ---- pass 2: per-class sums, 32 classes at a time
    for (int64_t c0 = 0; c0 < a.C; c0 += kWarpSize) {  // block-uniform
      const int nc = static_cast<int>(a.C - c0 < kWarpSize ? a.C - c0 : kWarpSize);
      acc_t own[NS];  // lane j: the warp's totals of class c0 + j
#pragma unroll
      for (int i = 0; i < NS; ++i) own[i] = acc_t(0);
      for (int j = 0; j < nc; ++j) {
        const int64_t c = c0 + j;
        scalar_t z[K];
        load_run<K>(xp + c * a.xC, a.xD, count, xv, z);
        acc_t part[NS];
#pragma unroll
        for (int i = 0; i < NS; ++i) part[i] = acc_t(0);
        if constexpr (SIG) {
          scalar_t tv[K];
          load_run<K>(tp + c * a.tC, a.tD, count, a.t_vec && full, tv);
#pragma unroll
          for (int k = 0; k < K; ++k) {
            if (k < count) {
              acc_t p, q;
              dice::sigmoid_pq(static_cast<acc_t>(z[k]), p, q);
              const acc_t g = static_cast<acc_t>(tv[k]);
              part[kI] += p * g;
              part[kP] += sq ? p * p : p;
              part[kG] += sq ? g * g : g;
            }
          }
        } else {
#pragma unroll
          for (int k = 0; k < K; ++k) {
            if (cls[k] != kNoClass) {
              const acc_t zk = static_cast<acc_t>(z[k]);
              const acc_t p = fl_exp(zk - lse[k]);
              const bool tgt = cls[k] == static_cast<int>(c);
              part[kP] += sq ? p * p : p;
              if (tgt) {
                part[kI] += p;
                part[kG] += acc_t(1);
              }
              if constexpr (CE) {
                const acc_t nl = lse[k] - zk;
                part[kSM] += nl;
                if (tgt) part[kNLL] += nl;
              }
            }
          }
        }
        warp_allreduce_sums(part);
        if (lane == j) {
#pragma unroll
          for (int i = 0; i < NS; ++i) own[i] = part[i];
        }
      }
      // The 8 warps' totals, added in warp order into the unit's slot.
#pragma unroll
      for (int i = 0; i < NS; ++i) sh[wid][lane][i] = own[i];
      __syncthreads();
      for (int e = tid; e < nc * kSums; e += kDiceThreads) {
        const int j = e / kSums;
        const int k = e - j * kSums;
        const bool on = k < NS && (k != kNLL || a.with_ce) && (k != kSM || a.with_smoothing);
        acc_t tot = acc_t(0);
        if (on) {
#pragma unroll
          for (int w = 0; w < kDiceWarps; ++w) tot += sh[w][j][k < NS ? k : 0];
        }
        a.ws[((n * a.C + c0 + j) * kSums + k) * a.U + u] = tot;
      }
      __syncthreads();  // sh is rewritten by the next chunk or unit
    }
  }
}

// sums[o] = sum over u of ws[o, u], o < outputs = N * C * kSums: a warp per output, lane j adding
// units j, j + 32, ... in order, then a butterfly; the same order on every call.
template <typename acc_t>
__global__ void __launch_bounds__(kDiceThreads)
    dice_sums_reduce_kernel(const acc_t* __restrict__ ws, acc_t* __restrict__ sums,
                            int64_t outputs, int64_t U) {
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kDiceWarps;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * kDiceWarps + threadIdx.x / kWarpSize;
       o < outputs; o += warps) {  // warp-uniform
    const acc_t* row = ws + o * U;
    acc_t v = acc_t(0);
    for (int64_t u = lane; u < U; u += kWarpSize) v += row[u];
    v = warp_sum(v);
    if (lane == 0) sums[o] = v;
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: the logits' gradient, one kernel.

template <typename scalar_t, typename acc_t, int MODE>
__global__ void __launch_bounds__(kDiceThreads)
    dice_bwd_kernel(const DiceArgs<scalar_t, acc_t> a) {
  constexpr int K = dice_ppt<scalar_t>();
  constexpr bool SIG = MODE == kSigmoid;
  constexpr bool CE = MODE == kSoftmaxCE;
  const int tid = threadIdx.x;
  const int64_t tile = dice_tile<scalar_t>();
  const bool sq = a.squared_pred;

  for (int64_t unit = blockIdx.x; unit < a.units; unit += gridDim.x) {
    const int64_t n = unit / a.U;
    const int64_t u = unit - n * a.U;
    const int64_t d0 = u * tile + static_cast<int64_t>(tid) * K;
    if (d0 >= a.D) continue;  // no barriers or shuffles in this kernel
    const int count = static_cast<int>(a.D - d0 < K ? a.D - d0 : K);
    const bool full = count == K;
    int cls[K];
    if constexpr (!SIG) load_classes<K>(a, n, d0, count, full, cls);
    const bool xv = a.x_vec && full;
    const bool gv = a.g_vec && full;
    const scalar_t* xp = a.x + n * a.xN + d0 * a.xD;
    scalar_t* gp = a.g + n * a.gN + d0 * a.gD;
    const acc_t* gs = a.gs + n * a.C * kSums;  // (C, kSums) of row n

    if constexpr (SIG) {
      const scalar_t* tp = a.t + n * a.tN + d0 * a.tD;
      for (int64_t c = 0; c < a.C; ++c) {
        const acc_t gI = gs[c * kSums + kI];
        const acc_t gP = gs[c * kSums + kP];
        scalar_t z[K], tv[K], out[K];
        load_run<K>(xp + c * a.xC, a.xD, count, xv, z);
        load_run<K>(tp + c * a.tC, a.tD, count, a.t_vec && full, tv);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          acc_t p, q;
          dice::sigmoid_pq(static_cast<acc_t>(z[k]), p, q);
          out[k] = static_cast<scalar_t>(
              dice::sigmoid_grad(p, q, static_cast<acc_t>(tv[k]), gI, gP, sq));
        }
        store_run<K>(gp + c * a.gC, a.gD, count, gv, out);
      }
    } else {
      acc_t lse[K];
      if (a.lse != nullptr) {
        load_run<K>(static_cast<const acc_t*>(a.lse) + n * a.D + d0, 1, count,
                    a.lse_vec && full, lse);
      } else {  // none saved (the Python layer's default): the forward's pass 1 again
        acc_t m[K], s[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
          m[k] = -INFINITY;
          s[k] = acc_t(0);
        }
        class_sweep<K>(xp, a.xC, a.xD, count, xv, a.C, [&](int64_t, const scalar_t(&z)[K]) {
#pragma unroll
          for (int k = 0; k < K; ++k) dice::lse_step(m[k], s[k], static_cast<acc_t>(z[k]));
        });
#pragma unroll
        for (int k = 0; k < K; ++k) lse[k] = m[k] + fl_log(s[k]);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (cls[k] == kBadClass) lse[k] = acc_t(NAN);
      }
      const bool use_nll = CE && a.with_ce;
      const bool use_sm = CE && a.with_smoothing;
      acc_t sum_gsm = acc_t(0);
      if (use_sm) {
        for (int64_t c = 0; c < a.C; ++c) sum_gsm += gs[c * kSums + kSM];
      }
      // Sweep 1: s = sum_c p_c u_c, and gNLL of each position's class.
      acc_t sv[K], gnll[K];
#pragma unroll
      for (int k = 0; k < K; ++k) sv[k] = gnll[k] = acc_t(0);
      class_sweep<K>(xp, a.xC, a.xD, count, xv, a.C, [&](int64_t c, const scalar_t(&z)[K]) {
        const acc_t gI = gs[c * kSums + kI];
        const acc_t gP = gs[c * kSums + kP];
        const acc_t gN = use_nll ? gs[c * kSums + kNLL] : acc_t(0);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const acc_t p = fl_exp(static_cast<acc_t>(z[k]) - lse[k]);
          const bool tgt = cls[k] == static_cast<int>(c);
          sv[k] += p * dice::softmax_u(p, tgt, gI, gP, sq);
          if (tgt) gnll[k] = gN;
        }
      });
      // Sweep 2: the gradient.
      for (int64_t c = 0; c < a.C; ++c) {
        const acc_t gI = gs[c * kSums + kI];
        const acc_t gP = gs[c * kSums + kP];
        const acc_t gSMc = use_sm ? gs[c * kSums + kSM] : acc_t(0);
        scalar_t z[K], out[K];
        load_run<K>(xp + c * a.xC, a.xD, count, xv, z);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          acc_t gr = acc_t(0);
          if (cls[k] != kNoClass) {
            const acc_t p = fl_exp(static_cast<acc_t>(z[k]) - lse[k]);
            const bool tgt = cls[k] == static_cast<int>(c);
            const acc_t uc = dice::softmax_u(p, tgt, gI, gP, sq);
            gr = dice::softmax_grad(p, uc, sv[k], tgt, gnll[k], sum_gsm, gSMc);
          }
          out[k] = static_cast<scalar_t>(gr);
        }
        store_run<K>(gp + c * a.gC, a.gD, count, gv, out);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

// Whether the rows of an (N, C, D)-like operand (d stride sD) can be read / written as 128-bit
// vectors of 16 / elem_bytes consecutive positions: d contiguous, the base 16-byte aligned and
// every row start (n, c) a multiple of 16 bytes from it (a size-1 dim's stride does not matter).
bool rows_vec(const void* ptr, int64_t elem_bytes, int64_t sD, int64_t size0, int64_t s0,
              int64_t size1, int64_t s1) {
  if (ptr == nullptr || sD != 1) return false;
  if (reinterpret_cast<uintptr_t>(ptr) % kVecBytes != 0) return false;
  if (size0 > 1 && (s0 * elem_bytes) % kVecBytes != 0) return false;
  if (size1 > 1 && (s1 * elem_bytes) % kVecBytes != 0) return false;
  return true;
}

void check_dice_target(const char* op, const at::Tensor& input, const at::Tensor& target,
                       bool sigmoid) {
  const int64_t N = input.size(0), D = input.size(2);
  TORCH_CHECK(target.device() == input.device(), op, ": target is on ", target.device(),
              ", input on ", input.device());
  if (sigmoid) {
    TORCH_CHECK(target.scalar_type() == input.scalar_type(), op,
                ": sigmoid mode takes a target of input's dtype ", input.scalar_type(), ", got ",
                target.scalar_type());
    TORCH_CHECK(target.sizes() == input.sizes(), op, ": target must have input's shape ",
                input.sizes(), ", got ", target.sizes());
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
                target.scalar_type());
    TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == D, op,
                ": target must have shape (N, D) = (", N, ", ", D, "), got ", target.sizes());
  }
}

void check_dice_common(const char* op, const at::Tensor& input, bool sigmoid, bool with_ce,
                       bool with_smoothing) {
  check_ncd_input(input, op);
  const int64_t C = input.size(1);
  TORCH_CHECK(C >= 1 && C <= INT_MAX, op, ": input must have between 1 and ", INT_MAX,
              " classes, got C = ", C);
  TORCH_CHECK(!sigmoid || (!with_ce && !with_smoothing), op,
              ": with_ce and with_smoothing are for softmax mode only");
}

template <typename scalar_t, typename acc_t>
DiceArgs<scalar_t, acc_t> dice_args(const at::Tensor& input, const at::Tensor& target,
                                    int64_t ignore_index, bool sigmoid, bool squared_pred,
                                    bool with_ce, bool with_smoothing) {
  DiceArgs<scalar_t, acc_t> a{};
  a.N = input.size(0);
  a.C = input.size(1);
  a.D = input.size(2);
  a.U = ceil_div(a.D, dice_tile<scalar_t>());
  a.units = a.N * a.U;
  a.x = input.const_data_ptr<scalar_t>();
  a.xN = input.stride(0);
  a.xC = input.stride(1);
  a.xD = input.stride(2);
  a.x_vec = rows_vec(a.x, sizeof(scalar_t), a.xD, a.N, a.xN, a.C, a.xC);
  if (sigmoid) {
    a.t = target.const_data_ptr<scalar_t>();
    a.tN = target.stride(0);
    a.tC = target.stride(1);
    a.tD = target.stride(2);
    a.t_vec = rows_vec(a.t, sizeof(scalar_t), a.tD, a.N, a.tN, a.C, a.tC);
  } else {
    a.y = target.const_data_ptr<int64_t>();
    a.yN = target.stride(0);
    a.yD = target.stride(1);
    a.y_vec = rows_vec(a.y, sizeof(int64_t), a.yD, a.N, a.yN, 1, 0);
  }
  a.ignore_index = ignore_index;
  a.squared_pred = squared_pred;
  a.with_ce = with_ce;
  a.with_smoothing = with_smoothing;
  return a;
}

// Calls f(std::integral_constant<int, MODE>()) for the kernel variant of the flags.
template <typename F>
void with_dice_mode(bool sigmoid, bool with_ce, bool with_smoothing, F&& f) {
  if (sigmoid) {
    f(std::integral_constant<int, kSigmoid>());
  } else if (with_ce || with_smoothing) {
    f(std::integral_constant<int, kSoftmaxCE>());
  } else {
    f(std::integral_constant<int, kSoftmax>());
  }
}

std::tuple<at::Tensor, at::Tensor> dice_fwd_cuda(const at::Tensor& input, const at::Tensor& target,
                                                 int64_t ignore_index, bool sigmoid,
                                                 bool squared_pred, bool with_ce,
                                                 bool with_smoothing) {
  const char* op = "fusedloss_C::dice_fwd";
  check_dice_common(op, input, sigmoid, with_ce, with_smoothing);
  check_dice_target(op, input, target, sigmoid);
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  const auto acc_opts = input.options().dtype(acc_dtype(input.scalar_type()));

  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor lse = sigmoid ? at::empty({0}, acc_opts) : at::empty({N, D}, acc_opts);
  if (N == 0 || D == 0) return std::make_tuple(at::zeros({N, C, kSums}, acc_opts), lse);
  at::Tensor sums = at::empty({N, C, kSums}, acc_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = static_cast<int64_t>(sm_count(input.device().index())) *
                             kDiceBlocksPerSm;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fusedloss_dice_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    DiceArgs<scalar_t, acc_t> a = dice_args<scalar_t, acc_t>(
        input, target, ignore_index, sigmoid, squared_pred, with_ce, with_smoothing);
    // The unit sums: the sums themselves when one unit covers a row.
    at::Tensor ws = a.U == 1 ? sums : at::empty({N * C * kSums * a.U}, acc_opts);
    a.ws = ws.mutable_data_ptr<acc_t>();
    if (!sigmoid) {
      a.lse = lse.mutable_data_ptr<acc_t>();
      a.lse_vec = rows_vec(a.lse, sizeof(acc_t), 1, N, D, 1, 0);
    }
    const dim3 grid = grid_1d(capped_grid(a.units, 1, max_blocks));
    with_dice_mode(sigmoid, with_ce, with_smoothing, [&](auto mode) {
      dice_fwd_kernel<scalar_t, acc_t, decltype(mode)::value>
          <<<grid, dim3(kDiceThreads), 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (a.U > 1) {
      const int64_t outputs = N * C * kSums;
      dice_sums_reduce_kernel<acc_t>
          <<<grid_1d(capped_grid(outputs, kDiceWarps, max_blocks)), dim3(kDiceThreads), 0,
             stream>>>(ws.const_data_ptr<acc_t>(), sums.mutable_data_ptr<acc_t>(), outputs, a.U);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return std::make_tuple(sums, lse);
}

at::Tensor dice_bwd_cuda(const at::Tensor& grad_sums, const at::Tensor& input,
                         const at::Tensor& target, const at::Tensor& lse, int64_t ignore_index,
                         bool sigmoid, bool squared_pred, bool with_ce, bool with_smoothing) {
  const char* op = "fusedloss_C::dice_bwd";
  check_dice_common(op, input, sigmoid, with_ce, with_smoothing);
  check_dice_target(op, input, target, sigmoid);
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  TORCH_CHECK(grad_sums.dim() == 3 && grad_sums.size(0) == N && grad_sums.size(1) == C &&
                  grad_sums.size(2) == kSums,
              op, ": grad_sums must have shape (N, C, 5) = (", N, ", ", C, ", 5), got ",
              grad_sums.sizes());
  TORCH_CHECK(grad_sums.device() == input.device(), op, ": grad_sums is on ", grad_sums.device(),
              ", input on ", input.device());
  TORCH_CHECK(grad_sums.is_floating_point(), op, ": grad_sums must be floating, got ",
              grad_sums.scalar_type());
  const bool lse_saved = !sigmoid && lse.numel() != 0;  // empty: recomputed per position
  if (lse_saved) {
    TORCH_CHECK(lse.dim() == 2 && lse.size(0) == N && lse.size(1) == D, op,
                ": lse must have shape (N, D) = (", N, ", ", D, "), got ", lse.sizes());
    TORCH_CHECK(lse.scalar_type() == acc, op, ": lse must be ", acc, ", got ",
                lse.scalar_type());
    TORCH_CHECK(lse.device() == input.device(), op, ": lse is on ", lse.device(), ", input on ",
                input.device());
  }

  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad = at::empty_like(input);  // input's strides when non-overlapping and dense
  if (N == 0 || D == 0) return grad;
  // Small (N, C, 5) and (N, D) operands made canonical (device ops, no sync).
  const at::Tensor gs = grad_sums.to(acc).contiguous();
  const at::Tensor lse_c = lse_saved ? lse.contiguous() : lse;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = static_cast<int64_t>(sm_count(input.device().index())) *
                             kDiceBlocksPerSm;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fusedloss_dice_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    DiceArgs<scalar_t, acc_t> a = dice_args<scalar_t, acc_t>(
        input, target, ignore_index, sigmoid, squared_pred, with_ce, with_smoothing);
    a.gs = gs.const_data_ptr<acc_t>();
    a.lse = nullptr;  // the kernel recomputes each position's logsumexp
    if (lse_saved) {
      a.lse = const_cast<acc_t*>(lse_c.const_data_ptr<acc_t>());
      a.lse_vec = rows_vec(a.lse, sizeof(acc_t), 1, N, D, 1, 0);
    }
    a.g = grad.mutable_data_ptr<scalar_t>();
    a.gN = grad.stride(0);
    a.gC = grad.stride(1);
    a.gD = grad.stride(2);
    a.g_vec = rows_vec(a.g, sizeof(scalar_t), a.gD, N, a.gN, C, a.gC);
    const dim3 grid = grid_1d(capped_grid(a.units, 1, max_blocks));
    with_dice_mode(sigmoid, with_ce, with_smoothing, [&](auto mode) {
      dice_bwd_kernel<scalar_t, acc_t, decltype(mode)::value>
          <<<grid, dim3(kDiceThreads), 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace
}  // namespace cuda
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss_C, CUDA, m) {
  m.impl("dice_fwd", &fusedloss::cuda::dice_fwd_cuda);
  m.impl("dice_bwd", &fusedloss::cuda::dice_bwd_cuda);
}
