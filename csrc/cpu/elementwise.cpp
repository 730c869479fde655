// CPU twin of the fused element-wise kernels (kernels/cuda/elementwise.cu).
//
// The work is memory-bound: one pass reads the numerator, the denominator and (optionally) a factor
// of the numerator and the sign reference and writes the result, where the torch composition makes five to eight passes. OpenMP
// threads take contiguous runs of chunks; inside a chunk the loop is branch-free (selects only), so
// -O3 vectorises it, once for the baseline target and once for AVX2 (relprop/cpu_isa.h picks one
// at run time; both give the same bits). Every element is computed on its own: results do not
// depend on the thread count.
#include "relprop/elementwise.h"

#include <stdexcept>
#include <string>

#include "relprop/cpu_isa.h"

namespace relprop {
namespace {

// Elements per OpenMP work item (64 KiB of float32 per input): large enough to amortise the
// scheduling, small enough to balance two to a few dozen threads on activation-sized tensors.
constexpr int64_t kChunk = 16384;
// Below this many elements one thread is faster than waking the team.
constexpr int64_t kParallelThreshold = 4 * kChunk;

// One element, its denominator given (the bias added where there is one).
template <typename T, SignMask kMask, bool kFactor>
RELPROP_ALWAYS_INLINE T divide_one(const T* __restrict numerator, const T* __restrict factor,
                                   T denominator, const T* __restrict reference, T epsilon, T scale,
                                   int64_t i) {
  const T stabilized = stabilize_denominator(denominator, epsilon);
  // Parenthesised as in the reference (python/relprop/ops/elementwise.py): equal bitwise.
  // A zero factor (x = 0) makes a zero relevance x · c even where c overflowed: inf · 0 is NaN.
  const T quotient =
      kFactor ? (scale * (factor[i] == T(0) ? T(0) : numerator[i] * factor[i])) / stabilized
              : (scale * numerator[i]) / stabilized;
  // `&`, not `&&`: a short-circuit would make the reference load conditional.
  bool keep = stabilized != T(0);
  if constexpr (kMask == SignMask::Positive) keep = keep & (reference[i] > T(0));
  if constexpr (kMask == SignMask::Negative) keep = keep & (reference[i] < T(0));
  return keep ? quotient : T(0);
}

// Vectorises only without GCC's default -ftrapping-math (CMakeLists.txt compiles this file with
// -fno-trapping-math, which changes no result, only whether FP exception flags are preserved):
// with it GCC sinks the division into a branch on `keep` and will not if-convert it back.
// `shift`: the denominator's bias, one value for the range (a range of one channel's elements).
template <typename T, SignMask kMask, bool kFactor>
RELPROP_ALWAYS_INLINE void divide_loop(const T* __restrict numerator, const T* __restrict factor,
                                       const T* __restrict denominator,
                                       const T* __restrict reference, T epsilon, T scale,
                                       T* __restrict out, int64_t begin, int64_t end,
                                       bool shifted, T shift) {
  if (shifted) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      out[i] = divide_one<T, kMask, kFactor>(numerator, factor, denominator[i] + shift,
                                              reference, epsilon, scale, i);
    }
    return;
  }
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    out[i] = divide_one<T, kMask, kFactor>(numerator, factor, denominator[i], reference, epsilon,
                                           scale, i);
  }
}

// The loop compiled for each instruction set (always_inline: the AVX2 copy vectorises the loop's
// body with its own target).
template <typename T, SignMask kMask, bool kFactor>
void divide_range_baseline(const T* numerator, const T* factor, const T* denominator,
                           const T* reference, T epsilon, T scale, T* out, int64_t begin,
                           int64_t end, bool shifted, T shift) {
  divide_loop<T, kMask, kFactor>(numerator, factor, denominator, reference, epsilon, scale, out,
                                 begin, end, shifted, shift);
}

#if RELPROP_CPU_AVX2
template <typename T, SignMask kMask, bool kFactor>
RELPROP_TARGET_AVX2 void divide_range_avx2(const T* numerator, const T* factor,
                                           const T* denominator, const T* reference, T epsilon,
                                           T scale, T* out, int64_t begin, int64_t end,
                                           bool shifted, T shift) {
  divide_loop<T, kMask, kFactor>(numerator, factor, denominator, reference, epsilon, scale, out,
                                 begin, end, shifted, shift);
}
#endif

template <typename T, SignMask kMask, bool kFactor>
auto divide_range_for_cpu() {
#if RELPROP_CPU_AVX2
  if (cpu_isa() == CpuIsa::Avx2) return &divide_range_avx2<T, kMask, kFactor>;
#endif
  return &divide_range_baseline<T, kMask, kFactor>;
}

template <typename T, SignMask kMask, bool kFactor>
void divide_all(int64_t numel, const T* numerator, const T* factor, const T* denominator,
                const T* reference, T epsilon, T scale, T* out, const ChannelBias<T>& bias) {
  const auto divide_range = divide_range_for_cpu<T, kMask, kFactor>();
  if (bias.values != nullptr) {
    // Row by row (one channel of one sample), each with its bias as one value.
    const int64_t rows = numel / bias.inner;
#pragma omp parallel for schedule(static) if (numel >= kParallelThreshold)
    for (int64_t row = 0; row < rows; ++row) {
      divide_range(numerator, factor, denominator, reference, epsilon, scale, out,
                   row * bias.inner, (row + 1) * bias.inner, true,
                   bias.values[row % bias.channels]);
    }
    return;
  }
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (numel >= kParallelThreshold)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * kChunk;
    const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
    divide_range(numerator, factor, denominator, reference, epsilon, scale, out, begin, end,
                 false, T(0));
  }
}

template <typename T, bool kFactor>
void divide_masked(int64_t numel, const T* n, const T* f, const T* d, const T* ref, T e, T s,
                   SignMask mask, T* o, const ChannelBias<T>& bias) {
  switch (mask) {
    case SignMask::None:
      return divide_all<T, SignMask::None, kFactor>(numel, n, f, d, ref, e, s, o, bias);
    case SignMask::Positive:
      return divide_all<T, SignMask::Positive, kFactor>(numel, n, f, d, ref, e, s, o, bias);
    case SignMask::Negative:
      return divide_all<T, SignMask::Negative, kFactor>(numel, n, f, d, ref, e, s, o, bias);
  }
  throw std::invalid_argument("stabilized_divide: sign must be -1, 0 or +1, got " +
                              std::to_string(static_cast<int>(mask)));
}

template <typename T>
void divide_typed(int64_t numel, uintptr_t numerator, uintptr_t factor, uintptr_t denominator,
                  const DenominatorBias& denominator_bias, double epsilon, double scale,
                  uintptr_t sign_reference, SignMask mask, uintptr_t out) {
  const auto* n = reinterpret_cast<const T*>(numerator);
  const auto* f = reinterpret_cast<const T*>(factor);
  const auto* d = reinterpret_cast<const T*>(denominator);
  const auto* ref = reinterpret_cast<const T*>(sign_reference);
  auto* o = reinterpret_cast<T*>(out);
  const T e = static_cast<T>(epsilon), s = static_cast<T>(scale);
  const ChannelBias<T> bias{reinterpret_cast<const T*>(denominator_bias.values),
                            denominator_bias.channels, denominator_bias.inner};
  if (factor != 0) return divide_masked<T, true>(numel, n, f, d, ref, e, s, mask, o, bias);
  return divide_masked<T, false>(numel, n, f, d, ref, e, s, mask, o, bias);
}

}  // namespace

void stabilized_divide_cpu(DType dtype, int64_t numel, uintptr_t numerator, uintptr_t factor,
                           uintptr_t denominator, const DenominatorBias& denominator_bias,
                           double epsilon, double scale, uintptr_t sign_reference, SignMask mask,
                           uintptr_t out) {
  check_denominator_bias("stabilized_divide", numel, denominator_bias);
  switch (dtype) {
    case DType::Float32:
      return divide_typed<float>(numel, numerator, factor, denominator, denominator_bias, epsilon,
                                 scale, sign_reference, mask, out);
    case DType::Float64:
      return divide_typed<double>(numel, numerator, factor, denominator, denominator_bias,
                                  epsilon, scale, sign_reference, mask, out);
    default:
      throw std::invalid_argument(
          "stabilized_divide: the CPU kernel takes float32 or float64, got dtype code " +
          std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace relprop
