// CUDA kernel of the α-β rule's two shares in one pass; CPU twin in
// csrc/cpu/alpha_beta_shares.cpp, semantics in csrc/include/relprop/alpha_beta_shares.h and
// python/relprop/ops/alpha_beta_shares.py.
//
// Memory-bound: a grid-stride loop over the (samples, inner) elements of R, each thread reading
// R (and its factor), z and zp once and writing both shares, float16 and bfloat16 computed in
// float32. Every element is computed on its own, so results are deterministic.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "relprop/alpha_beta_shares.h"
#include "relprop/cuda_common.cuh"
#include "relprop/cuda_scalars.cuh"

namespace relprop {
namespace {

using cuda_detail::check;
using cuda_detail::Compute;
using cuda_detail::DeviceGuard;
using cuda_detail::elementwise_blocks;
using cuda_detail::kElementwiseThreads;
using cuda_detail::load;
using cuda_detail::store;

template <typename T, bool kFactor>
__global__ void alpha_beta_shares_kernel(int64_t numel, int64_t inner,
                                         const T* __restrict__ relevance,
                                         const T* __restrict__ factor, const T* __restrict__ z,
                                         const T* __restrict__ zp,
                                         typename Compute<T>::type epsilon,
                                         typename Compute<T>::type alpha,
                                         typename Compute<T>::type negative_beta,
                                         T* __restrict__ out) {
  using C = typename Compute<T>::type;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    const C r = kFactor ? load(relevance, i) * load(factor, i) : load(relevance, i);
    const C positive_part = load(zp, i);
    const C stab_p = stabilize_denominator(positive_part, epsilon);
    const C stab_n = stabilize_denominator(load(z, i) - positive_part, epsilon);
    // Sample n's shares are the rows (n, 0, ·) and (n, 1, ·) of the (samples, 2, inner) output.
    const int64_t sample = i / inner;
    const int64_t at = i + sample * inner;
    store(out, at, stab_p != C(0) ? (alpha * r) / stab_p : C(0));
    store(out, at + inner, stab_n != C(0) ? (negative_beta * r) / stab_n : C(0));
  }
}

template <typename T>
void launch(int64_t samples, int64_t inner, uintptr_t relevance, uintptr_t factor, uintptr_t z,
            uintptr_t zp, double epsilon, double alpha, double beta, uintptr_t out,
            cudaStream_t stream) {
  using C = typename Compute<T>::type;
  const int64_t numel = samples * inner;
  const auto* r = reinterpret_cast<const T*>(relevance);
  const auto* f = reinterpret_cast<const T*>(factor);
  const auto* zs = reinterpret_cast<const T*>(z);
  const auto* zps = reinterpret_cast<const T*>(zp);
  auto* o = reinterpret_cast<T*>(out);
  const C e = static_cast<C>(epsilon), a = static_cast<C>(alpha), nb = static_cast<C>(-beta);
  if (factor != 0) {
    alpha_beta_shares_kernel<T, true><<<elementwise_blocks(numel), kElementwiseThreads, 0,
                                        stream>>>(numel, inner, r, f, zs, zps, e, a, nb, o);
  } else {
    alpha_beta_shares_kernel<T, false><<<elementwise_blocks(numel), kElementwiseThreads, 0,
                                         stream>>>(numel, inner, r, f, zs, zps, e, a, nb, o);
  }
  check(cudaGetLastError(), "alpha_beta_shares launch");
}

}  // namespace

void alpha_beta_shares_cuda(DType dtype, int64_t samples, int64_t inner, uintptr_t relevance,
                            uintptr_t factor, uintptr_t z, uintptr_t zp, double epsilon,
                            double alpha, double beta, uintptr_t out, uintptr_t stream,
                            int device) {
  if (samples == 0 || inner == 0) return;
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32:
      return launch<float>(samples, inner, relevance, factor, z, zp, epsilon, alpha, beta, out, s);
    case DType::Float64:
      return launch<double>(samples, inner, relevance, factor, z, zp, epsilon, alpha, beta, out,
                            s);
    case DType::Float16:
      return launch<__half>(samples, inner, relevance, factor, z, zp, epsilon, alpha, beta, out,
                            s);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(samples, inner, relevance, factor, z, zp, epsilon, alpha, beta,
                                   out, s);
  }
  throw std::invalid_argument("alpha_beta_shares: unknown dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

}  // namespace relprop
