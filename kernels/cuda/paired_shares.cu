// CUDA kernel of two shares of a relevance in one pass (the α-β rule's, the γ rule's); CPU twin
// in csrc/cpu/paired_shares.cpp, semantics in csrc/include/relprop/paired_shares.h and
// python/relprop/ops/paired_shares.py.
//
// Memory-bound: a grid-stride loop over the (samples, inner) elements of R, each thread reading
// R (and its factor), z and zp once and writing both shares, 16 bytes of each operand per step
// where the addresses and `inner` allow it (cuda_scalars.cuh), float16 and bfloat16 computed in
// float32. Every element is computed on its own, so results are deterministic.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "relprop/cuda_common.cuh"
#include "relprop/cuda_scalars.cuh"
#include "relprop/paired_shares.h"

namespace relprop {
namespace {

using cuda_detail::check;
using cuda_detail::Compute;
using cuda_detail::DeviceGuard;
using cuda_detail::dispatch_dtype;
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

// z_weight · z rounded on its own, as the reference and the CPU twin round it: nvcc would
// otherwise contract the product and the subtraction after it into one FMA, and where that
// difference cancels, the missing rounding would show as a different last digit of the share.
__device__ __forceinline__ float product_rounded(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double product_rounded(double a, double b) { return __dmul_rn(a, b); }

template <typename C>
struct Scalars {
  C epsilon, scale, second_scale, z_weight;
};

// The two shares of one element, into `first` and `second`: α-β's (positive and negative part)
// or γ's.
template <typename C, bool kFactor, bool kMasks>
__device__ __forceinline__ void shares(C relevance, C factor, C output, C modified,
                                       const Scalars<C>& p, C& first, C& second) {
  // A zero factor (x = 0) makes a zero relevance x · c even where c overflowed (float16): inf ·
  // 0 is NaN.
  const C r = kFactor ? (factor == C(0) ? C(0) : relevance * factor) : relevance;
  const C stab_first = stabilize_denominator(modified, p.epsilon);
  const C stab_second =
      stabilize_denominator(product_rounded(p.z_weight, output) - modified, p.epsilon);
  bool keep_first = stab_first != C(0);
  bool keep_second = stab_second != C(0);
  if (kMasks) {
    keep_first = keep_first && output > C(0);
    keep_second = keep_second && output < C(0);
  }
  first = keep_first ? (p.scale * r) / stab_first : C(0);
  second = keep_second ? (p.second_scale * r) / stab_second : C(0);
}

// `width` consecutive elements per thread and step (cuda_scalars.cuh, kWideElements; the
// launcher takes width 1 unless `inner`, and with a bias of zp each channel's elements, are a
// multiple of it, so that a step stays in one sample and one channel).
template <typename T, bool kFactor, bool kMasks, int width>
__global__ void paired_shares_kernel(int64_t numel, int64_t inner,
                                     const T* __restrict__ relevance,
                                     const T* __restrict__ factor, const T* __restrict__ z,
                                     const T* __restrict__ zp, const ChannelBias<T> zp_bias,
                                     Scalars<typename Compute<T>::type> p, T* __restrict__ out) {
  using C = typename Compute<T>::type;
  const int64_t step = int64_t(gridDim.x) * blockDim.x * width;
  const bool shifted = zp_bias.values != nullptr;
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * width; i < numel;
       i += step) {
    const Pack<T, width> r = load_pack<T, width>(relevance, i);
    const Pack<T, width> output = load_pack<T, width>(z, i);
    const Pack<T, width> modified = load_pack<T, width>(zp, i);
    Pack<T, width> f, first, second;
    if (kFactor) f = load_pack<T, width>(factor, i);
    const C shift =
        shifted ? load(zp_bias.values, (i / zp_bias.inner) % zp_bias.channels) : C(0);
#pragma unroll
    for (int k = 0; k < width; ++k) {
      C a, b;
      const C modified_k =
          shifted ? to_compute(modified.v[k]) + shift : to_compute(modified.v[k]);
      shares<C, kFactor, kMasks>(to_compute(r.v[k]), kFactor ? to_compute(f.v[k]) : C(1),
                                 to_compute(output.v[k]), modified_k, p, a, b);
      store_share(first.v, k, a);
      store_share(second.v, k, b);
    }
    // Sample n's shares are the rows (n, 0, ·) and (n, 1, ·) of the (samples, 2, inner) output.
    const int64_t sample = i / inner;
    const int64_t at = i + sample * inner;
    store_pack<T, width>(out, at, first);
    store_pack<T, width>(out, at + inner, second);
  }
}

// The kernel's pointer operands.
template <typename T>
struct Operands {
  const T* r;
  const T* f;
  const T* z;
  const T* zp;
  ChannelBias<T> zp_bias;
  T* out;
};

template <typename T, bool kFactor, bool kMasks, int width>
void launch_kernel(int64_t numel, int64_t inner, const Operands<T>& o,
                   Scalars<typename Compute<T>::type> p, cudaStream_t stream) {
  paired_shares_kernel<T, kFactor, kMasks, width>
      <<<elementwise_blocks(numel / width), kElementwiseThreads, 0, stream>>>(
          numel, inner, o.r, o.f, o.z, o.zp, o.zp_bias, p, o.out);
  check(cudaGetLastError(), "paired_shares launch");
}

template <typename T, bool kFactor, bool kMasks>
void launch_aligned(int64_t numel, int64_t inner, const Operands<T>& o,
                    Scalars<typename Compute<T>::type> p, cudaStream_t stream) {
  constexpr int wide = kWideElements<T>;
  const bool aligned = all_aligned(
      {reinterpret_cast<uintptr_t>(o.r), reinterpret_cast<uintptr_t>(o.f),
       reinterpret_cast<uintptr_t>(o.z), reinterpret_cast<uintptr_t>(o.zp),
       reinterpret_cast<uintptr_t>(o.out)});
  const bool rows_fit = o.zp_bias.values == nullptr || o.zp_bias.inner % wide == 0;
  if (aligned && rows_fit && inner % wide == 0) {
    return launch_kernel<T, kFactor, kMasks, wide>(numel, inner, o, p, stream);
  }
  return launch_kernel<T, kFactor, kMasks, 1>(numel, inner, o, p, stream);
}

template <typename T>
void launch(int64_t samples, int64_t inner, uintptr_t relevance, uintptr_t factor, uintptr_t z,
            uintptr_t zp, const DenominatorBias& zp_bias, const PairedSharesParams& params,
            uintptr_t out, cudaStream_t stream) {
  using C = typename Compute<T>::type;
  const int64_t numel = samples * inner;
  const Operands<T> o{reinterpret_cast<const T*>(relevance),
                      reinterpret_cast<const T*>(factor),
                      reinterpret_cast<const T*>(z),
                      reinterpret_cast<const T*>(zp),
                      {reinterpret_cast<const T*>(zp_bias.values), zp_bias.channels, zp_bias.inner},
                      reinterpret_cast<T*>(out)};
  const Scalars<C> p{static_cast<C>(params.epsilon), static_cast<C>(params.scale),
                     static_cast<C>(params.second_scale), static_cast<C>(params.z_weight)};
  if (factor != 0) {
    if (params.sign_masks) return launch_aligned<T, true, true>(numel, inner, o, p, stream);
    return launch_aligned<T, true, false>(numel, inner, o, p, stream);
  }
  if (params.sign_masks) return launch_aligned<T, false, true>(numel, inner, o, p, stream);
  return launch_aligned<T, false, false>(numel, inner, o, p, stream);
}

}  // namespace

void paired_shares_cuda(DType dtype, int64_t samples, int64_t inner, uintptr_t relevance,
                        uintptr_t factor, uintptr_t z, uintptr_t zp,
                        const DenominatorBias& zp_bias, const PairedSharesParams& params,
                        uintptr_t out, uintptr_t stream, int device) {
  check_denominator_bias("paired_shares", samples * inner, zp_bias);
  if (samples == 0 || inner == 0) return;
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, "paired_shares", [&](auto zero) {
    launch<decltype(zero)>(samples, inner, relevance, factor, z, zp, zp_bias, params, out, s);
  });
}

}  // namespace relprop
