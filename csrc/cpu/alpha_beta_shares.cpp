// CPU twin of kernels/cuda/alpha_beta_shares.cu: the α-β rule's two shares in one pass.
//
// Memory-bound, like the stabilised division (csrc/cpu/elementwise.cpp): one pass reads R, its
// factor, z and zp and writes both shares, where the torch composition makes a subtraction and
// two divisions, and the two transposed products after them an addition. OpenMP threads take
// runs of one sample's elements; the inner loop is branch-free (selects only), so -O3
// vectorises it (compiled with -fno-trapping-math, see CMakeLists.txt). Every element is
// computed on its own: results do not depend on the thread count.
#include "relprop/alpha_beta_shares.h"

#include <stdexcept>
#include <string>

namespace relprop {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int64_t kParallelThreshold = 4 * kChunk;

template <typename T, bool kFactor>
void shares_range(const T* __restrict relevance, const T* __restrict factor, const T* __restrict z,
                  const T* __restrict zp, T epsilon, T alpha, T negative_beta,
                  T* __restrict positive, T* __restrict negative, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) {
    const T r = kFactor ? relevance[j] * factor[j] : relevance[j];
    const T stab_p = stabilize_denominator(zp[j], epsilon);
    const T stab_n = stabilize_denominator(z[j] - zp[j], epsilon);
    // Parenthesised as in the reference (python/relprop/ops/alpha_beta_shares.py): equal bitwise.
    const T share_p = (alpha * r) / stab_p;
    const T share_n = (negative_beta * r) / stab_n;
    positive[j] = stab_p != T(0) ? share_p : T(0);
    negative[j] = stab_n != T(0) ? share_n : T(0);
  }
}

template <typename T, bool kFactor>
void shares_all(int64_t samples, int64_t inner, const T* relevance, const T* factor, const T* z,
                const T* zp, T epsilon, T alpha, T negative_beta, T* out) {
  const int64_t chunks_per_sample = (inner + kChunk - 1) / kChunk;
  const int64_t chunks = samples * chunks_per_sample;
#pragma omp parallel for schedule(static) if (samples * inner >= kParallelThreshold)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t sample = chunk / chunks_per_sample;
    const int64_t begin = (chunk % chunks_per_sample) * kChunk;
    const int64_t end = begin + kChunk < inner ? begin + kChunk : inner;
    const int64_t in = sample * inner;
    T* positive = out + 2 * in;
    shares_range<T, kFactor>(relevance + in, kFactor ? factor + in : factor, z + in, zp + in,
                             epsilon, alpha, negative_beta, positive, positive + inner, begin,
                             end);
  }
}

template <typename T>
void shares_typed(int64_t samples, int64_t inner, uintptr_t relevance, uintptr_t factor,
                  uintptr_t z, uintptr_t zp, double epsilon, double alpha, double beta,
                  uintptr_t out) {
  const auto* r = reinterpret_cast<const T*>(relevance);
  const auto* f = reinterpret_cast<const T*>(factor);
  const auto* zs = reinterpret_cast<const T*>(z);
  const auto* zps = reinterpret_cast<const T*>(zp);
  auto* o = reinterpret_cast<T*>(out);
  const T e = static_cast<T>(epsilon), a = static_cast<T>(alpha), nb = static_cast<T>(-beta);
  if (factor != 0) return shares_all<T, true>(samples, inner, r, f, zs, zps, e, a, nb, o);
  return shares_all<T, false>(samples, inner, r, f, zs, zps, e, a, nb, o);
}

}  // namespace

void alpha_beta_shares_cpu(DType dtype, int64_t samples, int64_t inner, uintptr_t relevance,
                           uintptr_t factor, uintptr_t z, uintptr_t zp, double epsilon,
                           double alpha, double beta, uintptr_t out) {
  switch (dtype) {
    case DType::Float32:
      return shares_typed<float>(samples, inner, relevance, factor, z, zp, epsilon, alpha, beta,
                                 out);
    case DType::Float64:
      return shares_typed<double>(samples, inner, relevance, factor, z, zp, epsilon, alpha, beta,
                                  out);
    default:
      throw std::invalid_argument(
          "alpha_beta_shares: the CPU kernel takes float32 or float64, got dtype code " +
          std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace relprop
