// CPU twin of kernels/cuda/paired_shares.cu: two shares of a relevance in one pass.
//
// Memory-bound, like the stabilised division (csrc/cpu/elementwise.cpp): one pass reads R, its
// factor, z and zp and writes both shares, where the torch composition makes the second
// denominator and two divisions, and the two transposed products after them an addition.
// OpenMP threads take runs of one sample's elements; the inner loop is branch-free (selects
// only), so -O3 vectorises it (compiled with -fno-trapping-math, see CMakeLists.txt), once for
// the baseline target and once for AVX2 (relprop/cpu_isa.h picks one at run time; both give the
// same bits). Every element is computed on its own: results do not depend on the thread count.
#include "relprop/paired_shares.h"

#include <stdexcept>
#include <string>

#include "relprop/cpu_isa.h"

namespace relprop {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int64_t kParallelThreshold = 4 * kChunk;

template <typename T>
struct Scalars {
  T epsilon, scale, second_scale, z_weight;
};

// `shift`: zp's bias, one value for the range (a range of one channel's elements).
template <typename T, bool kFactor, bool kMasks, bool kShifted>
RELPROP_ALWAYS_INLINE void shares_loop(const T* __restrict relevance, const T* __restrict factor,
                                       const T* __restrict z, const T* __restrict zp,
                                       Scalars<T> p, T* __restrict first, T* __restrict second,
                                       int64_t begin, int64_t end, T shift) {
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) {
    // A zero factor (x = 0) makes a zero relevance x · c even where c overflowed: inf · 0 is NaN.
    const T r = kFactor ? (factor[j] == T(0) ? T(0) : relevance[j] * factor[j]) : relevance[j];
    const T modified = kShifted ? zp[j] + shift : zp[j];
    const T stab_first = stabilize_denominator(modified, p.epsilon);
    // Parenthesised as in the reference (python/relprop/ops/paired_shares.py): equal bitwise.
    const T stab_second = stabilize_denominator(p.z_weight * z[j] - modified, p.epsilon);
    const T share_first = (p.scale * r) / stab_first;
    const T share_second = (p.second_scale * r) / stab_second;
    // `&`, not `&&`: a short-circuit would make the load of z conditional.
    bool keep_first = stab_first != T(0);
    bool keep_second = stab_second != T(0);
    if constexpr (kMasks) {
      keep_first = keep_first & (z[j] > T(0));
      keep_second = keep_second & (z[j] < T(0));
    }
    first[j] = keep_first ? share_first : T(0);
    second[j] = keep_second ? share_second : T(0);
  }
}

// The loop compiled for each instruction set, as in csrc/cpu/elementwise.cpp.
template <typename T, bool kFactor, bool kMasks, bool kShifted>
void shares_range_baseline(const T* relevance, const T* factor, const T* z, const T* zp,
                           Scalars<T> p, T* first, T* second, int64_t begin, int64_t end,
                           T shift) {
  shares_loop<T, kFactor, kMasks, kShifted>(relevance, factor, z, zp, p, first, second, begin,
                                            end, shift);
}

#if RELPROP_CPU_AVX2
template <typename T, bool kFactor, bool kMasks, bool kShifted>
RELPROP_TARGET_AVX2 void shares_range_avx2(const T* relevance, const T* factor, const T* z,
                                           const T* zp, Scalars<T> p, T* first, T* second,
                                           int64_t begin, int64_t end, T shift) {
  shares_loop<T, kFactor, kMasks, kShifted>(relevance, factor, z, zp, p, first, second, begin,
                                            end, shift);
}
#endif

template <typename T, bool kFactor, bool kMasks, bool kShifted>
auto shares_range_for_cpu() {
#if RELPROP_CPU_AVX2
  if (cpu_isa() == CpuIsa::Avx2) return &shares_range_avx2<T, kFactor, kMasks, kShifted>;
#endif
  return &shares_range_baseline<T, kFactor, kMasks, kShifted>;
}

template <typename T, bool kFactor, bool kMasks>
void shares_all(int64_t samples, int64_t inner, const T* relevance, const T* factor, const T* z,
                const T* zp, const ChannelBias<T>& bias, Scalars<T> p, T* out) {
  if (bias.values != nullptr) {
    // Row by row (one channel of one sample), each with zp's bias as one value.
    const auto shares_range = shares_range_for_cpu<T, kFactor, kMasks, true>();
    const int64_t rows = samples * bias.channels;
#pragma omp parallel for schedule(static) if (samples * inner >= kParallelThreshold)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t sample = row / bias.channels;
      const int64_t channel = row % bias.channels;
      const int64_t in = sample * inner;
      T* first = out + 2 * in;
      shares_range(relevance + in, kFactor ? factor + in : factor, z + in, zp + in, p, first,
                   first + inner, channel * bias.inner, (channel + 1) * bias.inner,
                   bias.values[channel]);
    }
    return;
  }
  const int64_t chunks_per_sample = (inner + kChunk - 1) / kChunk;
  const int64_t chunks = samples * chunks_per_sample;
  const auto shares_range = shares_range_for_cpu<T, kFactor, kMasks, false>();
#pragma omp parallel for schedule(static) if (samples * inner >= kParallelThreshold)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t sample = chunk / chunks_per_sample;
    const int64_t begin = (chunk % chunks_per_sample) * kChunk;
    const int64_t end = begin + kChunk < inner ? begin + kChunk : inner;
    const int64_t in = sample * inner;
    T* first = out + 2 * in;
    shares_range(relevance + in, kFactor ? factor + in : factor, z + in, zp + in, p, first,
                 first + inner, begin, end, T(0));
  }
}

template <typename T>
void shares_typed(int64_t samples, int64_t inner, uintptr_t relevance, uintptr_t factor,
                  uintptr_t z, uintptr_t zp, const DenominatorBias& zp_bias,
                  const PairedSharesParams& params, uintptr_t out) {
  const auto* r = reinterpret_cast<const T*>(relevance);
  const auto* f = reinterpret_cast<const T*>(factor);
  const auto* zs = reinterpret_cast<const T*>(z);
  const auto* zps = reinterpret_cast<const T*>(zp);
  auto* o = reinterpret_cast<T*>(out);
  const Scalars<T> p{static_cast<T>(params.epsilon), static_cast<T>(params.scale),
                     static_cast<T>(params.second_scale), static_cast<T>(params.z_weight)};
  const ChannelBias<T> b{reinterpret_cast<const T*>(zp_bias.values), zp_bias.channels,
                         zp_bias.inner};
  if (factor != 0) {
    if (params.sign_masks) {
      return shares_all<T, true, true>(samples, inner, r, f, zs, zps, b, p, o);
    }
    return shares_all<T, true, false>(samples, inner, r, f, zs, zps, b, p, o);
  }
  if (params.sign_masks) return shares_all<T, false, true>(samples, inner, r, f, zs, zps, b, p, o);
  return shares_all<T, false, false>(samples, inner, r, f, zs, zps, b, p, o);
}

}  // namespace

void paired_shares_cpu(DType dtype, int64_t samples, int64_t inner, uintptr_t relevance,
                       uintptr_t factor, uintptr_t z, uintptr_t zp, const DenominatorBias& zp_bias,
                       const PairedSharesParams& params, uintptr_t out) {
  check_denominator_bias("paired_shares", samples * inner, zp_bias);
  switch (dtype) {
    case DType::Float32:
      return shares_typed<float>(samples, inner, relevance, factor, z, zp, zp_bias, params, out);
    case DType::Float64:
      return shares_typed<double>(samples, inner, relevance, factor, z, zp, zp_bias, params, out);
    default:
      throw std::invalid_argument(
          "paired_shares: the CPU kernel takes float32 or float64, got dtype code " +
          std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace relprop
