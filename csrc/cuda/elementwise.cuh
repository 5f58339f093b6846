// The CUDA elementwise skeleton: a per-element loss over an input of any shape (at most kEwDims
// dimensions after merging) and strides, every other operand (target, weight, pos_weight) read BY
// STRIDE (0 on the dimensions it is broadcast over: never materialised), one pass:
//   - the host (ew_prepare) drops size-1 dimensions and merges neighbours every operand walks as
//     one, and marks each operand FLAT when its strides are the contiguous strides of that shape;
//   - a grid-stride loop over a capped 1-D grid (capped_grid: SMs x kEwBlocksPerSM blocks); element
//     i's coordinates come from 64-bit (or, when everything fits, 32-bit) index math, done only
//     when some operand is not flat;
//   - VEC path: when the input and every flat operand start at a compatible 16-byte alignment, each
//     thread takes VEC = 16 / sizeof(scalar_t) consecutive elements: 128-bit loads of the input,
//     128-bit loads of flat operands (one or two per VEC elements), gathers of broadcast ones
//     (32-bit index math only: past 2^31 elements a broadcast operand takes the strided kernel),
//     and one 128-bit store each of the loss ('none') and the gradient;
//   - 'mean' / 'sum': each thread sums its elements, each block its threads (block_sum) into
//     partial[blockIdx.x], and one block adds the partials in a fixed order (ew_finish): the same
//     bits on every run for a given grid, no atomics.
// A loss writes a policy:
//   struct MyPolicy {
//     using scalar_t = ...;  using aux_t = ...;  using acc_t = ...;   // input, other operands, math
//     static constexpr int kOps = ...;                                 // operands after the input
//     __device__ void operator()(acc_t x, const acc_t (&o)[kOps], acc_t& loss, acc_t& grad) const;
//   };
// and calls launch_elementwise_loss(policy, EwLaunch{...}) with the operand pointers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include <cstdint>

#include "common.cuh"

namespace fusedloss {
namespace cuda {

constexpr int kEwThreads = 256;
constexpr int kEwBlocksPerSM = 8;
constexpr int kEwDims = 8;
constexpr int kEwMaxOps = 3;  // operands after the input (target, weight, pos_weight)

// The merged loop shape and each tensor's strides (tensor 0: the input; 1..: the operands).
struct EwShape {
  int ndim = 1;
  int64_t size[kEwDims] = {1};
  int64_t stride[kEwMaxOps + 1][kEwDims] = {};
  bool flat[kEwMaxOps + 1] = {true, true, true, true};
  bool all_flat = true;
};

// On the host: `tensors[0]` the input, the others expanded (views) to its shape; null: absent.
inline EwShape ew_prepare(const at::Tensor* const* tensors, int n) {
  EwShape sh;
  const at::Tensor& x = *tensors[0];
  int nd = 0;
  for (int64_t k = 0; k < x.dim(); ++k) {
    const int64_t sz = x.size(k);
    if (sz == 1) continue;
    bool merge = nd > 0;
    for (int j = 0; j < n && merge; ++j) {
      const int64_t s = tensors[j] ? tensors[j]->stride(k) : 0;
      merge = s * sz == sh.stride[j][nd - 1];
    }
    if (merge) {
      sh.size[nd - 1] *= sz;
      for (int j = 0; j < n; ++j) sh.stride[j][nd - 1] = tensors[j] ? tensors[j]->stride(k) : 0;
    } else {
      TORCH_CHECK(nd < kEwDims, "fusedloss: an elementwise loss takes at most ", kEwDims,
                  " dimensions after merging, got more for an input of shape ", x.sizes());
      sh.size[nd] = sz;
      for (int j = 0; j < n; ++j) sh.stride[j][nd] = tensors[j] ? tensors[j]->stride(k) : 0;
      ++nd;
    }
  }
  if (nd == 0) {
    nd = 1;
    sh.size[0] = 1;
  }
  sh.ndim = nd;
  sh.all_flat = true;
  for (int j = 0; j < n; ++j) {
    bool flat = true;
    if (tensors[j]) {
      int64_t expect = 1;
      for (int k = nd - 1; k >= 0; --k) {
        if (sh.size[k] != 1 && sh.stride[j][k] != expect) flat = false;
        expect *= sh.size[k];
      }
    }
    sh.flat[j] = flat;
    sh.all_flat = sh.all_flat && flat;
  }
  return sh;
}

// Element i -> each tensor's offset (index_t: uint32_t when numel and the grid's step fit).
template <typename index_t>
__device__ __forceinline__ void ew_offsets(const EwShape& sh, index_t i, int n,
                                           int64_t (&off)[kEwMaxOps + 1]) {
#pragma unroll
  for (int j = 0; j < kEwMaxOps + 1; ++j) off[j] = 0;
  for (int k = sh.ndim - 1; k >= 0; --k) {
    const index_t sz = static_cast<index_t>(sh.size[k]);
    const index_t q = i / sz;
    const int64_t c = static_cast<int64_t>(i - q * sz);
    i = q;
#pragma unroll
    for (int j = 0; j < kEwMaxOps + 1; ++j) {
      if (j < n) off[j] += c * sh.stride[j][k];
    }
  }
}

// Element i -> the offset of tensor j alone (the VEC kernel's gathers: fewer live registers).
template <typename index_t>
__device__ __forceinline__ int64_t ew_offset(const EwShape& sh, index_t i, int j) {
  int64_t off = 0;
  for (int k = sh.ndim - 1; k >= 0; --k) {
    const index_t sz = static_cast<index_t>(sh.size[k]);
    const index_t q = i / sz;
    off += static_cast<int64_t>(i - q * sz) * sh.stride[j][k];
    i = q;
  }
  return off;
}

template <typename P>
struct EwPointers {
  const typename P::scalar_t* x;
  const typename P::aux_t* ops[kEwMaxOps];
  typename P::scalar_t* loss;  // 'none': contiguous per-element loss, else nullptr
  typename P::scalar_t* grad;  // contiguous gradient, or nullptr
  typename P::acc_t* partial;  // 'mean' / 'sum': one per block, else nullptr
};

// The scalar loop: any strides. One element per thread per step.
template <typename P, typename index_t>
__global__ void __launch_bounds__(kEwThreads)
    ew_strided_kernel(P pol, EwPointers<P> ptr, EwShape sh, index_t numel) {
  using acc_t = typename P::acc_t;
  constexpr int K = P::kOps;
  __shared__ BlockReduceStorage<SumState<acc_t>, kEwThreads> red;
  acc_t sum = acc_t(0);
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += step) {
    int64_t off[kEwMaxOps + 1];
    if (sh.all_flat) {
#pragma unroll
      for (int j = 0; j < kEwMaxOps + 1; ++j) off[j] = static_cast<int64_t>(i);
    } else {
      ew_offsets(sh, i, K + 1, off);
    }
    acc_t o[K > 0 ? K : 1];
#pragma unroll
    for (int j = 0; j < K; ++j) o[j] = static_cast<acc_t>(ptr.ops[j][off[j + 1]]);
    acc_t loss, grad;
    pol(static_cast<acc_t>(ptr.x[off[0]]), o, loss, grad);
    if (ptr.loss) ptr.loss[i] = static_cast<typename P::scalar_t>(loss);
    if (ptr.grad) ptr.grad[i] = static_cast<typename P::scalar_t>(grad);
    sum += loss;
  }
  if (ptr.partial) {
    sum = block_sum(sum, red);
    if (threadIdx.x == 0) ptr.partial[blockIdx.x] = sum;
  }
}

// VEC elements of a flat operand at element e (16-byte aligned): 128-bit loads, kept in the
// operand's own type (16-bit values stay packed: fewer registers than VEC floats).
template <typename T, int VEC>
__device__ __forceinline__ void load_flat(const T* p, int64_t e, T (&out)[VEC]) {
  constexpr int TV = vec_size<T>();
  static_assert(VEC % TV == 0, "whole 128-bit vectors");
#pragma unroll
  for (int b = 0; b < VEC / TV; ++b) {
    const auto v = load_vec(p + e + b * TV);
#pragma unroll
    for (int l = 0; l < TV; ++l) out[b * TV + l] = v.val[l];
  }
}

// The VEC loop: the input flat and 16-byte aligned at element `head` (so are the flat operands:
// checked on the host); elements [head, head + nvec * VEC) in vectors, the rest one by one.
// GATHER: some operand is not flat (its values are gathered by index math); instantiated with
// 32-bit indices only (a 64-bit division is a call whose saved registers spill).
template <typename P, typename index_t, bool GATHER>
__global__ void __launch_bounds__(kEwThreads)
    ew_vec_kernel(P pol, EwPointers<P> ptr, EwShape sh, index_t numel, int64_t head,
                  int64_t nvec) {
  using acc_t = typename P::acc_t;
  using scalar_t = typename P::scalar_t;
  using aux_t = typename P::aux_t;
  constexpr int K = P::kOps;
  constexpr int VEC = vec_size<scalar_t>();
  __shared__ BlockReduceStorage<SumState<acc_t>, kEwThreads> red;
  acc_t sum = acc_t(0);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nt = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = tid; v < nvec; v += nt) {
    const int64_t e = head + v * VEC;
    const AlignedVec<scalar_t, VEC> xv = load_vec(ptr.x + e);
    aux_t o[K > 0 ? K : 1][VEC];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      if (!GATHER || sh.flat[j + 1]) {
        load_flat<aux_t, VEC>(ptr.ops[j], e, o[j]);
      } else {
#pragma unroll
        for (int lane = 0; lane < VEC; ++lane) {
          o[j][lane] = ptr.ops[j][ew_offset(sh, static_cast<index_t>(e + lane), j + 1)];
        }
      }
    }
    AlignedVec<scalar_t, VEC> lv, gv;
#pragma unroll
    for (int lane = 0; lane < VEC; ++lane) {
      acc_t ol[K > 0 ? K : 1];
#pragma unroll
      for (int j = 0; j < K; ++j) ol[j] = static_cast<acc_t>(o[j][lane]);
      acc_t l, g;
      pol(static_cast<acc_t>(xv.val[lane]), ol, l, g);
      sum += l;
      lv.val[lane] = static_cast<scalar_t>(l);
      gv.val[lane] = static_cast<scalar_t>(g);
    }
    if (ptr.loss) store_vec(ptr.loss + e, lv);
    if (ptr.grad) store_vec(ptr.grad + e, gv);
  }
  // head and tail, one element per thread
  const int64_t rest = head + (numel - (head + nvec * VEC));
  for (int64_t r = tid; r < rest; r += nt) {
    const int64_t i = r < head ? r : head + nvec * VEC + (r - head);
    acc_t o[K > 0 ? K : 1];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      o[j] = static_cast<acc_t>(ptr.ops[j][!GATHER || sh.flat[j + 1]
                                               ? i
                                               : ew_offset(sh, static_cast<index_t>(i), j + 1)]);
    }
    acc_t loss, grad;
    pol(static_cast<acc_t>(ptr.x[i]), o, loss, grad);
    if (ptr.loss) ptr.loss[i] = static_cast<scalar_t>(loss);
    if (ptr.grad) ptr.grad[i] = static_cast<scalar_t>(grad);
    sum += loss;
  }
  if (ptr.partial) {
    sum = block_sum(sum, red);
    if (threadIdx.x == 0) ptr.partial[blockIdx.x] = sum;
  }
}

// One block: out = scale * (partial[0] + ... + partial[n-1]), in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kEwThreads)
    ew_finish_kernel(const acc_t* partial, int64_t n, acc_t scale, acc_t* out) {
  __shared__ BlockReduceStorage<SumState<acc_t>, kEwThreads> red;
  acc_t s = acc_t(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) *out = s * scale;
}

// Launches the loss: the VEC kernel when the input is flat and every flat operand shares its
// 16-byte alignment, else the strided one. `partial` must hold `grid` values when reducing;
// ew_grid gives the grid.
inline int64_t ew_grid(int64_t numel, c10::DeviceIndex device) {
  const int64_t max_blocks = static_cast<int64_t>(sm_count(device)) * kEwBlocksPerSM;
  return capped_grid(std::max<int64_t>(numel, 1), kEwThreads, max_blocks);
}

template <typename P>
void launch_elementwise_loss(const P& pol, const EwPointers<P>& ptr, const EwShape& sh,
                             int64_t numel, int64_t grid, cudaStream_t stream) {
  using scalar_t = typename P::scalar_t;
  constexpr int VEC = vec_size<scalar_t>();
  const uint64_t xa = reinterpret_cast<uintptr_t>(ptr.x);
  const RowSplit sp = split_row(xa, numel, static_cast<int64_t>(sizeof(scalar_t)));
  bool vec = sh.flat[0] && sp.nvec > 0;
  for (int j = 0; j < P::kOps && vec; ++j) {
    if (!sh.flat[j + 1]) continue;
    const uint64_t a = reinterpret_cast<uintptr_t>(ptr.ops[j]) +
                       static_cast<uint64_t>(sp.head) * sizeof(typename P::aux_t);
    vec = a % kVecBytes == 0;
  }
  // the outputs are fresh (allocator-aligned) contiguous tensors: aligned at element 0, so at
  // `head` only when head == 0
  vec = vec && sp.head == 0;
  const bool small = numel < (int64_t(1) << 31) && grid * kEwThreads < (int64_t(1) << 31);
  if (vec && small && !sh.all_flat) {
    ew_vec_kernel<P, uint32_t, true><<<grid_1d(grid), kEwThreads, 0, stream>>>(
        pol, ptr, sh, static_cast<uint32_t>(numel), sp.head, sp.nvec);
  } else if (vec && sh.all_flat) {
    ew_vec_kernel<P, uint64_t, false><<<grid_1d(grid), kEwThreads, 0, stream>>>(
        pol, ptr, sh, static_cast<uint64_t>(numel), sp.head, sp.nvec);
  } else if (small) {
    ew_strided_kernel<P, uint32_t><<<grid_1d(grid), kEwThreads, 0, stream>>>(
        pol, ptr, sh, static_cast<uint32_t>(numel));
  } else {
    ew_strided_kernel<P, uint64_t><<<grid_1d(grid), kEwThreads, 0, stream>>>(
        pol, ptr, sh, static_cast<uint64_t>(numel));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The host side of a per-element loss op (bce_fwd, sigmoid_focal_fwd; schemas in
// csrc/registration.cpp): checks, operands (target / weight / pos_weight expanded as views, so read
// by stride; converted only when their dtypes differ from the input's: then all of them are read
// in the accumulation dtype), outputs, the launch and the deterministic finish. `launch(tag,
// aux_is_acc, ptrs, shape, grid, stream)` launches the loss's policy; tag: a value of scalar_t.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> run_ew_loss_cuda(const char* op, const at::Tensor& input,
                                                    const at::Tensor& target,
                                                    const c10::optional<at::Tensor>& weight,
                                                    const c10::optional<at::Tensor>& pos_weight,
                                                    double loss_scale, int64_t reduction,
                                                    bool compute_grad, Launch&& launch) {
  TORCH_CHECK(input.is_cuda(), op, ": expected a CUDA input, got ", input.device());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": input must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0, 1 or 2");
  TORCH_CHECK(target.sizes() == input.sizes(), op, ": target must have the input's shape ",
              input.sizes(), ", got ", target.sizes());
  const at::ScalarType acc = acc_dtype(dt);
  at::Tensor ops[kEwMaxOps] = {target, weight.value_or(at::Tensor()),
                               pos_weight.value_or(at::Tensor())};
  bool aux_acc = false;
  for (auto& o : ops) {
    if (!o.defined()) continue;
    TORCH_CHECK(o.device() == input.device(), op, ": every operand must be on ", input.device());
    TORCH_CHECK(at::isFloatingType(o.scalar_type()), op, ": operands must be floating");
    aux_acc = aux_acc || o.scalar_type() != dt;
  }
  const auto sizes = input.sizes();
  for (auto& o : ops) {
    if (!o.defined()) continue;
    if (o.scalar_type() != (aux_acc ? acc : dt)) o = o.to(aux_acc ? acc : dt);
    o = o.expand(sizes);
  }
  // input, then the present operands in order (the policy's o[0], o[1], ...)
  const at::Tensor* ts[kEwMaxOps + 1] = {&input};
  int n = 1;
  for (const auto& o : ops) {
    if (o.defined()) ts[n++] = &o;
  }
  const EwShape sh = ew_prepare(ts, n);
  at::Tensor loss = reduction == 0 ? at::empty(sizes, input.options()) : at::Tensor();
  at::Tensor grad = compute_grad ? at::empty(sizes, input.options()) : at::empty({0}, input.options());
  const int64_t numel = input.numel();
  c10::cuda::CUDAGuard guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device());
  const int64_t grid = ew_grid(numel, input.get_device());
  at::Tensor partial = reduction != 0 ? at::zeros({grid}, input.options().dtype(acc)) : at::Tensor();
  if (numel > 0) {
    launch(ops, aux_acc && acc != dt, loss, grad, partial, sh, grid, stream);
  }
  if (reduction != 0) {
    loss = at::empty({}, input.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "fusedloss_ew_finish", [&] {
      ew_finish_kernel<scalar_t><<<1, kEwThreads, 0, stream>>>(
          partial.const_data_ptr<scalar_t>(), grid, static_cast<scalar_t>(loss_scale),
          loss.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {loss, grad};
}

// EwPointers for a policy from the op's tensors (absent operands: nullptr).
template <typename P>
EwPointers<P> ew_pointers(const at::Tensor& input, const at::Tensor (&ops)[kEwMaxOps],
                          at::Tensor& loss, at::Tensor& grad, at::Tensor& partial) {
  EwPointers<P> p{};
  p.x = input.const_data_ptr<typename P::scalar_t>();
  int k = 0;
  for (const auto& o : ops) {
    if (o.defined()) p.ops[k++] = static_cast<const typename P::aux_t*>(o.const_data_ptr());
  }
  p.loss = loss.defined() ? loss.mutable_data_ptr<typename P::scalar_t>() : nullptr;
  p.grad = grad.numel() > 0 ? grad.mutable_data_ptr<typename P::scalar_t>() : nullptr;
  p.partial = partial.defined() ? partial.mutable_data_ptr<typename P::acc_t>() : nullptr;
  return p;
}

}  // namespace cuda
}  // namespace fusedloss
