// CUDA kernel of the sum of two tensors and the ReLU after it, in one pass; CPU twin in
// csrc/cpu/add_relu.cpp, semantics in csrc/include/relprop/add_relu.h and
// python/relprop/ops/add_relu.py.
//
// A ResNet block ends in relu(a + b): torch's add writes the sum and its ReLU reads and writes it
// again. This is one read of each operand and one write. Memory-bound: a grid-stride loop, 16
// bytes of each operand per thread and step where the addresses allow it (cuda_scalars.cuh),
// float16 and bfloat16 added in float32 and rounded once. Every element is computed on its own,
// so results are deterministic.
#include <cuda_runtime.h>


#include "relprop/add_relu.h"
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

template <typename T>
__device__ __forceinline__ T relu_of_sum(T a, T b) {
  using C = typename Compute<T>::type;
  const C v = to_compute(a) + to_compute(b);
  // Not fmax: NaN stays NaN, as in torch's ReLU.
  return from_compute<T>(v < C(0) ? C(0) : v);
}

// `width` consecutive elements per thread and step, then the last numel % width one per thread.
template <typename T, int width>
__global__ void add_relu_kernel(int64_t numel, const T* __restrict__ a, const T* __restrict__ b,
                                T* __restrict__ out) {
  const int64_t packed = numel / width * width;
  const int64_t thread = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x * width;
  for (int64_t i = thread * width; i < packed; i += step) {
    const Pack<T, width> first = load_pack<T, width>(a, i);
    const Pack<T, width> second = load_pack<T, width>(b, i);
    Pack<T, width> result;
#pragma unroll
    for (int k = 0; k < width; ++k) result.v[k] = relu_of_sum(first.v[k], second.v[k]);
    store_pack<T, width>(out, i, result);
  }
  const int64_t i = packed + thread;
  if (i < numel) out[i] = relu_of_sum(a[i], b[i]);
}

template <typename T, int width>
void launch_width(int64_t numel, const T* a, const T* b, T* out, cudaStream_t stream) {
  const int64_t packs = numel / width;
  const int64_t rest = numel - packs * width;
  add_relu_kernel<T, width>
      <<<elementwise_blocks(packs > rest ? packs : rest), kElementwiseThreads, 0, stream>>>(
          numel, a, b, out);
  check(cudaGetLastError(), "add_relu launch");
}

template <typename T>
void launch(int64_t numel, uintptr_t a, uintptr_t b, uintptr_t out, cudaStream_t stream) {
  const auto* first = reinterpret_cast<const T*>(a);
  const auto* second = reinterpret_cast<const T*>(b);
  auto* result = reinterpret_cast<T*>(out);
  // A view that starts inside an allocation may not allow 16-byte accesses: one element a step.
  if (all_aligned({a, b, out})) {
    return launch_width<T, kWideElements<T>>(numel, first, second, result, stream);
  }
  return launch_width<T, 1>(numel, first, second, result, stream);
}

}  // namespace

void add_relu_cuda(DType dtype, int64_t numel, uintptr_t a, uintptr_t b, uintptr_t out,
                   uintptr_t stream, int device) {
  if (numel == 0) return;
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, "add_relu",
                 [&](auto zero) { launch<decltype(zero)>(numel, a, b, out, s); });
}

}  // namespace relprop
