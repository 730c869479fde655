// CUDA fused element-wise kernels; CPU twin in csrc/cpu/elementwise.cpp, semantics in
// csrc/include/relprop/elementwise.h and python/relprop/ops/elementwise.py.
//
// Memory-bound: a grid-stride loop, 16 bytes of each operand per thread and step where the
// addresses allow it (cuda_scalars.cuh), float16 and bfloat16 computed in float32. Every element
// is computed on its own, so results are deterministic (and do not depend on the width).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "relprop/cuda_common.cuh"
#include "relprop/cuda_scalars.cuh"
#include "relprop/elementwise.h"

namespace relprop {
namespace {

using cuda_detail::check;
using cuda_detail::Compute;
using cuda_detail::DeviceGuard;
using cuda_detail::elementwise_blocks;
using cuda_detail::kElementwiseThreads;
using cuda_detail::all_aligned;
using cuda_detail::kWideElements;
using cuda_detail::load;
using cuda_detail::load_pack;
using cuda_detail::Pack;
using cuda_detail::store_pack;
using cuda_detail::store_share;
using cuda_detail::to_compute;

// One element: the relevance's factor (x of the layer above, when the relevance arrives as c · x)
// is used only when kFactor: the product is formed here instead of in a pass of its own before
// the division; the reference's sign only under a mask.
template <typename C, SignMask kMask, bool kFactor>
__device__ __forceinline__ C share(C numerator, C factor, C denominator, C reference, C epsilon,
                                   C scale) {
  const C stabilized = stabilize_denominator(denominator, epsilon);
  bool keep = stabilized != C(0);
  if (kMask == SignMask::Positive) keep = keep && reference > C(0);
  if (kMask == SignMask::Negative) keep = keep && reference < C(0);
  // A zero factor (x = 0) makes a zero relevance x · c even where c overflowed (float16): inf ·
  // 0 is NaN.
  const C value = kFactor ? (factor == C(0) ? C(0) : numerator * factor) : numerator;
  return keep ? (scale * value) / stabilized : C(0);
}

// The denominator's per-channel bias at element i (ChannelBias, elementwise.h), or nothing.
template <typename T>
__device__ __forceinline__ typename Compute<T>::type with_bias(typename Compute<T>::type d,
                                                               const ChannelBias<T>& bias,
                                                               int64_t i) {
  return bias.values == nullptr ? d : d + load(bias.values, (i / bias.inner) % bias.channels);
}

// `width` consecutive elements per thread and step (cuda_scalars.cuh, kWideElements), then the
// last numel % width elements one per thread. Operands the template leaves unused are not read.
// With a denominator bias a step stays in one row (the launcher takes width 1 unless the rows'
// length is a multiple of it), so that one bias value serves the step.
template <typename T, SignMask kMask, bool kFactor, int width>
__global__ void stabilized_divide_kernel(int64_t numel, const T* __restrict__ numerator,
                                         const T* __restrict__ factor,
                                         const T* __restrict__ denominator,
                                         const ChannelBias<T> bias,
                                         const T* __restrict__ reference,
                                         typename Compute<T>::type epsilon,
                                         typename Compute<T>::type scale, T* __restrict__ out) {
  using C = typename Compute<T>::type;
  constexpr bool kReference = kMask != SignMask::None;
  const int64_t packed = numel / width * width;
  const int64_t thread = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x * width;
  for (int64_t i = thread * width; i < packed; i += step) {
    const Pack<T, width> n = load_pack<T, width>(numerator, i);
    const Pack<T, width> d = load_pack<T, width>(denominator, i);
    Pack<T, width> f, r, result;
    if (kFactor) f = load_pack<T, width>(factor, i);
    if (kReference) r = load_pack<T, width>(reference, i);
    const bool shifted = bias.values != nullptr;
    const C shift = shifted ? load(bias.values, (i / bias.inner) % bias.channels) : C(0);
#pragma unroll
    for (int k = 0; k < width; ++k) {
      const C denominator_k = shifted ? to_compute(d.v[k]) + shift : to_compute(d.v[k]);
      const C value = share<C, kMask, kFactor>(
          to_compute(n.v[k]), kFactor ? to_compute(f.v[k]) : C(1), denominator_k,
          kReference ? to_compute(r.v[k]) : C(0), epsilon, scale);
      store_share(result.v, k, value);
    }
    store_pack<T, width>(out, i, result);
  }
  const int64_t i = packed + thread;
  if (i < numel) {
    const C value = share<C, kMask, kFactor>(
        load(numerator, i), kFactor ? load(factor, i) : C(1),
        with_bias(load(denominator, i), bias, i), kReference ? load(reference, i) : C(0),
        epsilon, scale);
    store_share(out, i, value);
  }
}

struct Buffers {
  uintptr_t numerator, factor, denominator, reference, out;
  DenominatorBias bias;
};

template <typename T, SignMask kMask, bool kFactor, int width>
void launch_width(int64_t numel, const Buffers& b, double epsilon, double scale,
                  cudaStream_t stream) {
  using C = typename Compute<T>::type;
  const int64_t packs = numel / width;
  const int64_t rest = numel - packs * width;
  const ChannelBias<T> bias{reinterpret_cast<const T*>(b.bias.values), b.bias.channels,
                            b.bias.inner};
  stabilized_divide_kernel<T, kMask, kFactor, width>
      <<<elementwise_blocks(packs > rest ? packs : rest), kElementwiseThreads, 0, stream>>>(
          numel, reinterpret_cast<const T*>(b.numerator), reinterpret_cast<const T*>(b.factor),
          reinterpret_cast<const T*>(b.denominator), bias,
          reinterpret_cast<const T*>(b.reference), static_cast<C>(epsilon),
          static_cast<C>(scale), reinterpret_cast<T*>(b.out));
  check(cudaGetLastError(), "stabilized_divide launch");
}

template <typename T, SignMask kMask, bool kFactor>
void launch(int64_t numel, const Buffers& b, double epsilon, double scale, cudaStream_t stream) {
  // A view that starts inside an allocation may not allow 16-byte accesses, nor may rows whose
  // length is not a multiple of the width take one bias value a step: one element a step.
  const bool rows_fit = b.bias.values == 0 || b.bias.inner % kWideElements<T> == 0;
  if (rows_fit && all_aligned({b.numerator, b.factor, b.denominator, b.reference, b.out})) {
    return launch_width<T, kMask, kFactor, kWideElements<T>>(numel, b, epsilon, scale, stream);
  }
  return launch_width<T, kMask, kFactor, 1>(numel, b, epsilon, scale, stream);
}

template <typename T, bool kFactor>
void launch_masked(SignMask mask, int64_t numel, const Buffers& b, double epsilon, double scale,
                   cudaStream_t stream) {
  switch (mask) {
    case SignMask::None:
      return launch<T, SignMask::None, kFactor>(numel, b, epsilon, scale, stream);
    case SignMask::Positive:
      return launch<T, SignMask::Positive, kFactor>(numel, b, epsilon, scale, stream);
    case SignMask::Negative:
      return launch<T, SignMask::Negative, kFactor>(numel, b, epsilon, scale, stream);
  }
  throw std::invalid_argument("stabilized_divide: sign must be -1, 0 or +1, got " +
                              std::to_string(static_cast<int>(mask)));
}

template <typename T>
void launch_typed(SignMask mask, int64_t numel, const Buffers& b, double epsilon, double scale,
                  cudaStream_t stream) {
  if (b.factor != 0) return launch_masked<T, true>(mask, numel, b, epsilon, scale, stream);
  return launch_masked<T, false>(mask, numel, b, epsilon, scale, stream);
}

}  // namespace

void stabilized_divide_cuda(DType dtype, int64_t numel, uintptr_t numerator, uintptr_t factor,
                            uintptr_t denominator, const DenominatorBias& denominator_bias,
                            double epsilon, double scale, uintptr_t sign_reference, SignMask mask,
                            uintptr_t out, uintptr_t stream, int device) {
  check_denominator_bias("stabilized_divide", numel, denominator_bias);
  if (numel == 0) return;
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const Buffers b{numerator, factor, denominator, sign_reference, out, denominator_bias};
  switch (dtype) {
    case DType::Float32:
      return launch_typed<float>(mask, numel, b, epsilon, scale, s);
    case DType::Float64:
      return launch_typed<double>(mask, numel, b, epsilon, scale, s);
    case DType::Float16:
      return launch_typed<__half>(mask, numel, b, epsilon, scale, s);
    case DType::BFloat16:
      return launch_typed<__nv_bfloat16>(mask, numel, b, epsilon, scale, s);
  }
  throw std::invalid_argument("stabilized_divide: unknown dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

}  // namespace relprop
