// CUDA fused element-wise kernels; CPU twin in csrc/cpu/elementwise.cpp, semantics in
// csrc/include/relprop/elementwise.h and python/relprop/ops/elementwise.py.
//
// Memory-bound: a grid-stride loop, one element per thread and step, float16 and bfloat16
// computed in float32. Every element is computed on its own, so results are deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "relprop/cuda_common.cuh"
#include "relprop/elementwise.h"

namespace relprop {
namespace {

using cuda_detail::check;
using cuda_detail::DeviceGuard;

constexpr int kThreads = 256;
// Enough resident blocks to saturate the memory system of any current GPU (a grid-stride loop
// covers the rest); a bounded grid avoids launching millions of short-lived blocks.
constexpr int64_t kMaxBlocks = 65536;

template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(double* p, int64_t i, double v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16(v);
}

template <typename T, SignMask kMask>
__global__ void stabilized_divide_kernel(int64_t numel, const T* __restrict__ numerator,
                                         const T* __restrict__ denominator,
                                         const T* __restrict__ reference,
                                         typename Compute<T>::type epsilon,
                                         typename Compute<T>::type scale, T* __restrict__ out) {
  using C = typename Compute<T>::type;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    const C stabilized = stabilize_denominator(load(denominator, i), epsilon);
    bool keep = stabilized != C(0);
    if (kMask == SignMask::Positive) keep = keep && load(reference, i) > C(0);
    if (kMask == SignMask::Negative) keep = keep && load(reference, i) < C(0);
    store(out, i, keep ? (scale * load(numerator, i)) / stabilized : C(0));
  }
}


template <typename T, SignMask kMask>
void launch(int64_t numel, uintptr_t numerator, uintptr_t denominator, double epsilon,
            double scale, uintptr_t reference, uintptr_t out, cudaStream_t stream) {
  using C = typename Compute<T>::type;
  int64_t blocks = (numel + kThreads - 1) / kThreads;
  blocks = blocks > kMaxBlocks ? kMaxBlocks : blocks;
  stabilized_divide_kernel<T, kMask><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      numel, reinterpret_cast<const T*>(numerator), reinterpret_cast<const T*>(denominator),
      reinterpret_cast<const T*>(reference), static_cast<C>(epsilon), static_cast<C>(scale),
      reinterpret_cast<T*>(out));
  check(cudaGetLastError(), "stabilized_divide launch");
}

template <typename T>
void launch_masked(SignMask mask, int64_t numel, uintptr_t numerator, uintptr_t denominator,
                   double epsilon, double scale, uintptr_t reference, uintptr_t out,
                   cudaStream_t stream) {
  switch (mask) {
    case SignMask::None:
      return launch<T, SignMask::None>(numel, numerator, denominator, epsilon, scale, reference,
                                       out, stream);
    case SignMask::Positive:
      return launch<T, SignMask::Positive>(numel, numerator, denominator, epsilon, scale,
                                           reference, out, stream);
    case SignMask::Negative:
      return launch<T, SignMask::Negative>(numel, numerator, denominator, epsilon, scale,
                                           reference, out, stream);
  }
  throw std::invalid_argument("stabilized_divide: sign must be -1, 0 or +1, got " +
                              std::to_string(static_cast<int>(mask)));
}

}  // namespace

void stabilized_divide_cuda(DType dtype, int64_t numel, uintptr_t numerator, uintptr_t denominator,
                            double epsilon, double scale, uintptr_t sign_reference, SignMask mask,
                            uintptr_t out, uintptr_t stream, int device) {
  if (numel == 0) return;
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32:
      return launch_masked<float>(mask, numel, numerator, denominator, epsilon, scale,
                                  sign_reference, out, s);
    case DType::Float64:
      return launch_masked<double>(mask, numel, numerator, denominator, epsilon, scale,
                                   sign_reference, out, s);
    case DType::Float16:
      return launch_masked<__half>(mask, numel, numerator, denominator, epsilon, scale,
                                   sign_reference, out, s);
    case DType::BFloat16:
      return launch_masked<__nv_bfloat16>(mask, numel, numerator, denominator, epsilon, scale,
                                          sign_reference, out, s);
  }
  throw std::invalid_argument("stabilized_divide: unknown dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

}  // namespace relprop
