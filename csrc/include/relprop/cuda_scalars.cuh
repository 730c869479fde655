// Device-side element access shared by the element-wise CUDA kernels (kernels/cuda/*.cu):
// float16 and bfloat16 are loaded into float32, computed there, and rounded once on store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace relprop {
namespace cuda_detail {

// The type a kernel computes in for storage type T.
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

// Threads per block of the element-wise kernels, and a grid bound: enough resident blocks to
// saturate the memory system of any current GPU (a grid-stride loop covers the rest) without
// launching millions of short-lived blocks.
constexpr int kElementwiseThreads = 256;
constexpr int64_t kElementwiseMaxBlocks = 65536;

inline unsigned int elementwise_blocks(int64_t numel) {
  const int64_t blocks = (numel + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned int>(blocks > kElementwiseMaxBlocks ? kElementwiseMaxBlocks
                                                                  : blocks);
}

}  // namespace cuda_detail
}  // namespace relprop
