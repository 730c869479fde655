// Device-side element access shared by the CUDA kernels (kernels/cuda/*.cu): float16 and
// bfloat16 are loaded into float32, computed (and accumulated) there, and rounded once on store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "relprop/pool.h"

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

// Consecutive elements an element-wise kernel's thread takes per step: as many as one 16-byte
// access holds (4 float, 2 double, 8 half or bfloat16) where every operand's address allows it
// (`all_aligned`), else 1. Wide accesses are what torch's element-wise kernels use; with single
// elements the stabilised division moved 2.1 TB/s on an H100 where torch's ReLU backward moved
// 3.0 (ResNet50: times in benchmarks/results/gpu_h100_profile_resnet50.md, bytes counted by
// benchmarks/traffic.py --by-op).
template <typename T>
constexpr int kWideElements = 16 / static_cast<int>(sizeof(T));

// `width` elements of T accessed as one (one instruction for the whole pack).
template <typename T, int width>
struct alignas(sizeof(T) * width) Pack {
  T v[width];
};

template <typename T, int width>
__device__ __forceinline__ Pack<T, width> load_pack(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T, width>*>(p + i);
}
template <typename T, int width>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, width>& pack) {
  *reinterpret_cast<Pack<T, width>*>(p + i) = pack;
}

// Whether every non-null address is aligned for 16-byte accesses (address 0: an absent operand).
inline bool all_aligned(std::initializer_list<uintptr_t> addresses) {
  for (uintptr_t a : addresses) {
    if (a % 16 != 0) return false;
  }
  return true;
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

// Calls `body(T{})` with T the C++ type of `dtype` (host side: the launchers pick their
// kernels' storage type with it); throws std::invalid_argument naming `op` for another code.
template <typename Body>
void dispatch_dtype(DType dtype, const char* op, Body&& body) {
  switch (dtype) {
    case DType::Float32:
      return body(float{});
    case DType::Float64:
      return body(double{});
    case DType::Float16:
      return body(__half{});
    case DType::BFloat16:
      return body(__nv_bfloat16{});
  }
  throw std::invalid_argument(std::string(op) + ": unknown dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

}  // namespace cuda_detail
}  // namespace relprop
