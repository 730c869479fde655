// Device-side element access shared by the CUDA kernels (kernels/cuda/*.cu): float16 and
// bfloat16 are loaded into float32, computed (and accumulated) there, and rounded once on store.
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

__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_compute(typename Compute<T>::type v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_compute<__half>(float v) {
  return __float2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

template <typename T>
__device__ __forceinline__ typename Compute<T>::type load(const T* p, int64_t i) {
  return to_compute(p[i]);
}
template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, typename Compute<T>::type v) {
  p[i] = from_compute<T>(v);
}

// A share R / stab(z) stored in T: float16 saturates at ±65504 instead of overflowing to ±inf,
// as the reference does (relprop/ops/elementwise.py): an infinite share times a zero weight is
// NaN in the transposed product. Comparisons keep a NaN a NaN (fminf/fmaxf would not).
template <typename T>
__device__ __forceinline__ void store_share(T* p, int64_t i, typename Compute<T>::type v) {
  store(p, i, v);
}
template <>
__device__ __forceinline__ void store_share<__half>(__half* p, int64_t i, float v) {
  constexpr float kHalfMax = 65504.0f;
  p[i] = __float2half(v > kHalfMax ? kHalfMax : (v < -kHalfMax ? -kHalfMax : v));
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
