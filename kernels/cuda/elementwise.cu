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

using cuda_detail::all_aligned;
using cuda_detail::check;
using cuda_detail::Compute;
using cuda_detail::DeviceGuard;
using cuda_detail::dispatch_dtype;
using cuda_detail::elementwise_blocks;
using cuda_detail::kElementwiseThreads;
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

// The operands of one launch (null: absent). The numerator's addend and the denominator's bias
// are tested at run time: the test is the same for every thread, and templates for them would
// double the kernels twice over.
template <typename T>
struct Operands {
  const T* __restrict__ numerator;
  const T* __restrict__ addend;
  const T* __restrict__ factor;
  const T* __restrict__ denominator;
  ChannelBias<T> bias;
  const T* __restrict__ reference;
  typename Compute<T>::type epsilon, scale;
  T* __restrict__ out;
};

// `width` consecutive elements per thread and step (cuda_scalars.cuh, kWideElements), then the
// last numel % width elements one per thread. Operands the launch leaves out are not read. With a
// denominator bias a step stays in one row (the launcher takes width 1 unless the rows' length is
// a multiple of it), so that one bias value serves the step.
template <typename T, SignMask kMask, bool kFactor, int width>
__global__ void stabilized_divide_kernel(int64_t numel, const Operands<T> o) {
  using C = typename Compute<T>::type;
  constexpr bool kReference = kMask != SignMask::None;
  const bool added = o.addend != nullptr;
  const bool shifted = o.bias.values != nullptr;
  const int64_t packed = numel / width * width;
  const int64_t thread = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x * width;
  for (int64_t i = thread * width; i < packed; i += step) {
    const Pack<T, width> n = load_pack<T, width>(o.numerator, i);
    const Pack<T, width> d = load_pack<T, width>(o.denominator, i);
    Pack<T, width> a, f, r, result;
    if (added) a = load_pack<T, width>(o.addend, i);
    if (kFactor) f = load_pack<T, width>(o.factor, i);
    if (kReference) r = load_pack<T, width>(o.reference, i);
    const C shift = shifted ? load(o.bias.values, (i / o.bias.inner) % o.bias.channels) : C(0);
#pragma unroll
    for (int k = 0; k < width; ++k) {
      const C numerator_k = added ? to_compute(n.v[k]) + to_compute(a.v[k]) : to_compute(n.v[k]);
      const C denominator_k = shifted ? to_compute(d.v[k]) + shift : to_compute(d.v[k]);
      const C value = share<C, kMask, kFactor>(
          numerator_k, kFactor ? to_compute(f.v[k]) : C(1), denominator_k,
          kReference ? to_compute(r.v[k]) : C(0), o.epsilon, o.scale);
      store_share(result.v, k, value);
    }
    store_pack<T, width>(o.out, i, result);
  }
  const int64_t i = packed + thread;
  if (i < numel) {
    const C numerator_i = added ? load(o.numerator, i) + load(o.addend, i) : load(o.numerator, i);
    const C denominator_i =
        shifted ? load(o.denominator, i) +
                      load(o.bias.values, (i / o.bias.inner) % o.bias.channels)
                : load(o.denominator, i);
    const C value = share<C, kMask, kFactor>(
        numerator_i, kFactor ? load(o.factor, i) : C(1), denominator_i,
        kReference ? load(o.reference, i) : C(0), o.epsilon, o.scale);
    store_share(o.out, i, value);
  }
}

template <typename T, SignMask kMask, bool kFactor, int width>
void launch_width(int64_t numel, const Operands<T>& o, cudaStream_t stream) {
  const int64_t packs = numel / width;
  const int64_t rest = numel - packs * width;
  stabilized_divide_kernel<T, kMask, kFactor, width>
      <<<elementwise_blocks(packs > rest ? packs : rest), kElementwiseThreads, 0, stream>>>(numel,
                                                                                           o);
  check(cudaGetLastError(), "stabilized_divide launch");
}

template <typename T, SignMask kMask, bool kFactor>
void launch(int64_t numel, const DivideBuffers& b, const Operands<T>& o, cudaStream_t stream) {
  // A view that starts inside an allocation may not allow 16-byte accesses, nor may rows whose
  // length is not a multiple of the width take one bias value a step: one element a step.
  const bool rows_fit = b.denominator_bias.values == 0 ||
                        b.denominator_bias.inner % kWideElements<T> == 0;
  if (rows_fit && all_aligned({b.numerator, b.numerator_addend, b.factor, b.denominator,
                               b.sign_reference, b.out})) {
    return launch_width<T, kMask, kFactor, kWideElements<T>>(numel, o, stream);
  }
  return launch_width<T, kMask, kFactor, 1>(numel, o, stream);
}

template <typename T, bool kFactor>
void launch_masked(SignMask mask, int64_t numel, const DivideBuffers& b, const Operands<T>& o,
                   cudaStream_t stream) {
  switch (mask) {
    case SignMask::None:
      return launch<T, SignMask::None, kFactor>(numel, b, o, stream);
    case SignMask::Positive:
      return launch<T, SignMask::Positive, kFactor>(numel, b, o, stream);
    case SignMask::Negative:
      return launch<T, SignMask::Negative, kFactor>(numel, b, o, stream);
  }
  throw std::invalid_argument("stabilized_divide: sign must be -1, 0 or +1, got " +
                              std::to_string(static_cast<int>(mask)));
}

template <typename T>
void launch_typed(SignMask mask, int64_t numel, const DivideBuffers& b, double epsilon,
                  double scale, cudaStream_t stream) {
  using C = typename Compute<T>::type;
  const Operands<T> o{reinterpret_cast<const T*>(b.numerator),
                      reinterpret_cast<const T*>(b.numerator_addend),
                      reinterpret_cast<const T*>(b.factor),
                      reinterpret_cast<const T*>(b.denominator),
                      {reinterpret_cast<const T*>(b.denominator_bias.values),
                       b.denominator_bias.channels, b.denominator_bias.inner},
                      reinterpret_cast<const T*>(b.sign_reference),
                      static_cast<C>(epsilon),
                      static_cast<C>(scale),
                      reinterpret_cast<T*>(b.out)};
  if (b.factor != 0) return launch_masked<T, true>(mask, numel, b, o, stream);
  return launch_masked<T, false>(mask, numel, b, o, stream);
}

}  // namespace

void stabilized_divide_cuda(DType dtype, int64_t numel, const DivideBuffers& buffers,
                            double epsilon, double scale, SignMask mask, uintptr_t stream,
                            int device) {
  check_denominator_bias("stabilized_divide", numel, buffers.denominator_bias);
  if (numel == 0) return;
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, "stabilized_divide", [&](auto zero) {
    launch_typed<decltype(zero)>(mask, numel, buffers, epsilon, scale, s);
  });
}

}  // namespace relprop
