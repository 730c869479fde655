// CUDA kernel of a layer's bias and the ReLU after it, in place; CPU twin in
// csrc/cpu/bias_relu.cpp, semantics in csrc/include/relprop/bias_relu.h and
// python/relprop/ops/bias_relu.py.
//
// torch adds a convolution's bias in a pass of its own after cuDNN's product, and the ReLU is
// another: one read and one write of the layer's output each. This is both in one. Memory-bound:
// a grid-stride loop, 16 bytes per thread and step where the address and the per-row size allow
// it (cuda_scalars.cuh), float16 and bfloat16 added in float32 and rounded once. Every element is
// computed on its own, so results are deterministic.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "relprop/bias_relu.h"
#include "relprop/cuda_common.cuh"
#include "relprop/cuda_scalars.cuh"

namespace relprop {
namespace {

using cuda_detail::all_aligned;
using cuda_detail::check;
using cuda_detail::Compute;
using cuda_detail::DeviceGuard;
using cuda_detail::dispatch_dtype;
using cuda_detail::elementwise_blocks;
using cuda_detail::from_compute;
using cuda_detail::kElementwiseThreads;
using cuda_detail::kWideElements;
using cuda_detail::load_pack;
using cuda_detail::Pack;
using cuda_detail::store_pack;
using cuda_detail::to_compute;

// `width` consecutive elements of one row per thread and step (the launcher takes width 1 unless
// `inner` is a multiple of it). Index: 32 bits where numel fits, as it does for any activation of
// today's models: the row of each step is a division, four times cheaper in 32 bits than in 64.
template <typename T, typename Index, int width>
__global__ void bias_relu_kernel(Index numel, Index channels, Index inner, T* z,
                                 const T* __restrict__ bias) {
  using C = typename Compute<T>::type;
  const Index step = Index(gridDim.x) * blockDim.x * width;
  // The last start below numel is at most numel - 1, and numel + step stays in Index's range
  // (the launcher leaves that headroom): the loop's index cannot wrap.
  for (Index i = (Index(blockIdx.x) * blockDim.x + threadIdx.x) * width; i < numel; i += step) {
    const C b = to_compute(bias[(i / inner) % channels]);
    Pack<T, width> values = load_pack<T, width>(z, i);
#pragma unroll
    for (int k = 0; k < width; ++k) {
      const C v = to_compute(values.v[k]) + b;
      // Not fmax: NaN stays NaN, as in torch's ReLU.
      values.v[k] = from_compute<T>(v < C(0) ? C(0) : v);
    }
    store_pack<T, width>(z, i, values);
  }
}

template <typename T, typename Index, int width>
void launch_kernel(int64_t numel, int64_t channels, int64_t inner, T* z, const T* bias,
                   cudaStream_t stream) {
  bias_relu_kernel<T, Index, width>
      <<<elementwise_blocks(numel / width), kElementwiseThreads, 0, stream>>>(
          Index(numel), Index(channels), Index(inner), z, bias);
  check(cudaGetLastError(), "bias_relu launch");
}

template <typename T, typename Index>
void launch_indexed(int64_t numel, int64_t channels, int64_t inner, T* z, const T* bias,
                    cudaStream_t stream) {
  constexpr int wide = kWideElements<T>;
  if (all_aligned({reinterpret_cast<uintptr_t>(z)}) && inner % wide == 0) {
    return launch_kernel<T, Index, wide>(numel, channels, inner, z, bias, stream);
  }
  return launch_kernel<T, Index, 1>(numel, channels, inner, z, bias, stream);
}

template <typename T>
void launch(int64_t rows, int64_t channels, int64_t inner, uintptr_t z, uintptr_t bias,
            cudaStream_t stream) {
  const int64_t numel = rows * inner;
  auto* values = reinterpret_cast<T*>(z);
  const auto* b = reinterpret_cast<const T*>(bias);
  // Headroom for the last step of the grid-stride loop (kernel comment above).
  const int64_t largest_step = int64_t(kElementwiseThreads) * cuda_detail::kElementwiseMaxBlocks *
                               kWideElements<T>;
  if (numel + largest_step <= INT32_MAX) {
    return launch_indexed<T, int32_t>(numel, channels, inner, values, b, stream);
  }
  return launch_indexed<T, int64_t>(numel, channels, inner, values, b, stream);
}

}  // namespace

void bias_relu_cuda(DType dtype, int64_t rows, int64_t channels, int64_t inner, uintptr_t z,
                    uintptr_t bias, uintptr_t stream, int device) {
  if (rows == 0 || inner == 0) return;
  if (channels <= 0) {
    throw std::invalid_argument("bias_relu: channels must be positive, got " +
                                std::to_string(channels));
  }
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, "bias_relu",
                 [&](auto zero) { launch<decltype(zero)>(rows, channels, inner, z, bias, s); });
}

}  // namespace relprop
