// scale_grad_(grad!, grad_loss): the loss-agnostic scale of a saved gradient by the upstream
// gradient (schema in csrc/registration.cpp, contract in docs/KERNELS.md):
//   grad (N, C, D) any strides; grad_loss (N, D) float32/float64, or one scalar (numel 1, or every
//   stride 0). Scalar s == 1: nothing is written, checked ON THE DEVICE (every block reads s first
//   and returns; no host sync). Scalar s: grad *= s; else grad[n, :, d] *= grad_loss[n, d]. The
//   multiply is in the accumulation dtype (float32; float64 for float64 grad), rounded once, and an
//   element that is exactly 0 stays 0 whatever the factor (ignored rows keep torch's exact 0 under
//   a NaN / inf upstream gradient).
// Kernels are grid-stride loops over a capped 1-D grid (capped_grid: SMs x 8 blocks, never past
// gridDim.x's limit), so any size launches (linear CE scales grad_weight viewed as
// (1, V*H, 1), V*H up to 2^33 and beyond). A dense gradient with a scalar factor is scaled flat in
// 128-bit vectors (head / aligned body / tail).

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "common.cuh"

namespace fusedloss {
namespace cuda {
namespace {

constexpr int kScaleThreads = 256;
constexpr int kScaleBlocksPerSM = 8;

// g == 0 stays 0: a NaN / inf upstream gradient must not reach ignored rows (torch gives 0).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t scale_keep_zero(scalar_t g, acc_t s) {
  const acc_t v = static_cast<acc_t>(g);
  return static_cast<scalar_t>(v == acc_t(0) ? acc_t(0) : v * s);
}

// The elements of a dense grad fill [g, g + numel) in some order: one scalar factor, scaled flat.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kScaleThreads)
    scale_flat_kernel(scalar_t* g, int64_t numel, const acc_t* sp) {
  constexpr int VEC = vec_size<scalar_t>();
  using Vec = AlignedVec<scalar_t, VEC>;
  const acc_t s = *sp;
  if (s == acc_t(1)) return;
  const RowSplit sp_ = row_split(g, numel);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nt = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (tid < sp_.head) g[tid] = scale_keep_zero<scalar_t>(g[tid], s);
  for (int64_t v = tid; v < sp_.nvec; v += nt) {
    scalar_t* ptr = g + sp_.head + v * VEC;
    Vec val = load_vec(ptr);
#pragma unroll
    for (int i = 0; i < VEC; ++i) val.val[i] = scale_keep_zero<scalar_t>(val.val[i], s);
    store_vec(ptr, val);
  }
  for (int64_t i = sp_.tail + tid; i < numel; i += nt) {
    g[i] = scale_keep_zero<scalar_t>(g[i], s);
  }
}

// grad (N, C, D) with any strides, walked in logical order (d fastest). SCALAR: one factor *gl;
// else grad[n, c, d] *= gl[n * lN + d * lD]. index_t: uint32_t when numel + the grid's step fits.
template <typename scalar_t, typename acc_t, bool SCALAR, typename index_t>
__global__ void __launch_bounds__(kScaleThreads)
    scale_strided_kernel(scalar_t* g, index_t numel, index_t CD, index_t D, int64_t gN, int64_t gC,
                         int64_t gD, const acc_t* gl, int64_t lN, int64_t lD) {
  acc_t s = acc_t(1);
  if constexpr (SCALAR) {
    s = *gl;
    if (s == acc_t(1)) return;
  }
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += step) {
    const index_t n = i / CD;
    const index_t rem = i - n * CD;
    index_t c = rem, d = 0;
    if (D != 1) {
      c = rem / D;
      d = rem - c * D;
    }
    acc_t f = s;
    if constexpr (!SCALAR) f = gl[static_cast<int64_t>(n) * lN + static_cast<int64_t>(d) * lD];
    scalar_t* ptr = g + static_cast<int64_t>(n) * gN + static_cast<int64_t>(c) * gC +
                    static_cast<int64_t>(d) * gD;
    *ptr = scale_keep_zero<scalar_t>(*ptr, f);
  }
}

template <typename scalar_t, typename acc_t, bool SCALAR>
void launch_scale_strided(scalar_t* gp, int64_t numel, int64_t C, int64_t D, int64_t gN,
                          int64_t gC, int64_t gD, const acc_t* lp, int64_t lN, int64_t lD,
                          int64_t grid, cudaStream_t stream) {
  // 32-bit indices when i + step cannot wrap: numel < 2^31 and a step below 2^31.
  const bool small = numel < (int64_t(1) << 31) && grid * kScaleThreads < (int64_t(1) << 31);
  if (small) {
    using index_t = uint32_t;
    scale_strided_kernel<scalar_t, acc_t, SCALAR, index_t>
        <<<grid_1d(grid), kScaleThreads, 0, stream>>>(
            gp, static_cast<index_t>(numel), static_cast<index_t>(C * D), static_cast<index_t>(D),
            gN, gC, gD, lp, lN, lD);
  } else {
    using index_t = uint64_t;
    scale_strided_kernel<scalar_t, acc_t, SCALAR, index_t>
        <<<grid_1d(grid), kScaleThreads, 0, stream>>>(
            gp, static_cast<index_t>(numel), static_cast<index_t>(C * D), static_cast<index_t>(D),
            gN, gC, gD, lp, lN, lD);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scale_grad_cuda(const at::Tensor& grad, const at::Tensor& grad_loss) {
  const char* op = "fusedloss_C::scale_grad_";
  check_ncd_input(grad, op, "grad");
  TORCH_CHECK(grad_loss.device() == grad.device(), op, ": grad_loss is on ", grad_loss.device(),
              ", grad on ", grad.device(), " (the scalar is read on the device; no host sync)");
  TORCH_CHECK(grad_loss.scalar_type() == at::kFloat || grad_loss.scalar_type() == at::kDouble, op,
              ": grad_loss must be float32 or float64, got ", grad_loss.scalar_type());
  const int64_t N = grad.size(0), C = grad.size(1), D = grad.size(2);
  bool all_zero_strides = true;
  for (int64_t i = 0; i < grad_loss.dim(); ++i) all_zero_strides &= grad_loss.stride(i) == 0;
  const bool scalar = grad_loss.numel() == 1 || (grad_loss.numel() > 0 && all_zero_strides);
  if (!scalar) {
    TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == N && grad_loss.size(1) == D, op,
                ": grad_loss must have shape (N, D) = (", N, ", ", D, ") or be a scalar, got ",
                grad_loss.sizes());
  }
  if (grad.numel() == 0) return;
  at::assert_no_internal_overlap(grad);

  c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.get_device());
  const at::ScalarType acc = acc_dtype(grad.scalar_type());
  at::Tensor gl = grad_loss;
  if (scalar) {
    gl = grad_loss.as_strided({}, {}, grad_loss.storage_offset());  // the one value, as 0-d
  }
  if (gl.scalar_type() != acc) gl = gl.to(acc);  // a device op, no sync
  const int64_t numel = grad.numel();
  const int64_t max_blocks = static_cast<int64_t>(sm_count(grad.get_device())) * kScaleBlocksPerSM;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "fusedloss_scale_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int VEC = vec_size<scalar_t>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const acc_t* lp = gl.const_data_ptr<acc_t>();
    if (scalar && grad.is_non_overlapping_and_dense()) {
      const int64_t grid = capped_grid(ceil_div(numel, VEC), kScaleThreads, max_blocks);
      scale_flat_kernel<scalar_t, acc_t>
          <<<grid_1d(grid), kScaleThreads, 0, stream>>>(gp, numel, lp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t grid = capped_grid(numel, kScaleThreads, max_blocks);
    const int64_t lN = scalar ? 0 : gl.stride(0);
    const int64_t lD = scalar ? 0 : (D == 1 ? 0 : gl.stride(1));
    const int64_t gN = grad.stride(0), gC = grad.stride(1), gD = grad.stride(2);
    if (scalar) {
      launch_scale_strided<scalar_t, acc_t, true>(gp, numel, C, D, gN, gC, gD, lp, lN, lD, grid,
                                                  stream);
    } else {
      launch_scale_strided<scalar_t, acc_t, false>(gp, numel, C, D, gN, gC, gD, lp, lN, lD, grid,
                                                   stream);
    }
  });
}

}  // namespace
}  // namespace cuda
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss_C, CUDA, m) {
  m.impl("scale_grad_", &fusedloss::cuda::scale_grad_cuda);
}
