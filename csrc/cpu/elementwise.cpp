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

// Vectorises only without GCC's default -ftrapping-math (CMakeLists.txt compiles this file with
// -fno-trapping-math, which changes no result, only whether FP exception flags are preserved):
// with it GCC sinks the division into a branch on `keep` and will not if-convert it back.
template <typename T, SignMask kMask, bool kFactor>
RELPROP_ALWAYS_INLINE void divide_loop(const T* __restrict numerator, const T* __restrict factor,
                                       const T* __restrict denominator,
                                       const T* __restrict reference, T epsilon, T scale,
                                       T* __restrict out, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const T stabilized = stabilize_denominator(denominator[i], epsilon);
    // Parenthesised as in the reference (python/relprop/ops/elementwise.py): equal bitwise.
    // A zero factor (x = 0) makes a zero relevance x · c even where c overflowed: inf · 0 is NaN.
    const T quotient =
        kFactor ? (scale * (factor[i] == T(0) ? T(0) : numerator[i] * factor[i])) / stabilized
                : (scale * numerator[i]) / stabilized;
    // `&`, not `&&`: a short-circuit would make the reference load conditional.
    bool keep = stabilized != T(0);
    if constexpr (kMask == SignMask::Positive) keep = keep & (reference[i] > T(0));
    if constexpr (kMask == SignMask::Negative) keep = keep & (reference[i] < T(0));
    out[i] = keep ? quotient : T(0);
  }
}

// The loop compiled for each instruction set (always_inline: the AVX2 copy vectorises the loop's
// body with its own target).
template <typename T, SignMask kMask, bool kFactor>
void divide_range_baseline(const T* numerator, const T* factor, const T* denominator,
                           const T* reference, T epsilon, T scale, T* out, int64_t begin,
                           int64_t end) {
  divide_loop<T, kMask, kFactor>(numerator, factor, denominator, reference, epsilon, scale, out,
                                 begin, end);
}

#if RELPROP_CPU_AVX2
template <typename T, SignMask kMask, bool kFactor>
RELPROP_TARGET_AVX2 void divide_range_avx2(const T* numerator, const T* factor,
                                           const T* denominator, const T* reference, T epsilon,
                                           T scale, T* out, int64_t begin, int64_t end) {
  divide_loop<T, kMask, kFactor>(numerator, factor, denominator, reference, epsilon, scale, out,
                                 begin, end);
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
                const T* reference, T epsilon, T scale, T* out) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  const auto divide_range = divide_range_for_cpu<T, kMask, kFactor>();
#pragma omp parallel for schedule(static) if (numel >= kParallelThreshold)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * kChunk;
    const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
    divide_range(numerator, factor, denominator, reference, epsilon, scale, out, begin, end);
  }
}

template <typename T, bool kFactor>
void divide_masked(int64_t numel, const T* n, const T* f, const T* d, const T* ref, T e, T s,
                   SignMask mask, T* o) {
  switch (mask) {
    case SignMask::None:
      return divide_all<T, SignMask::None, kFactor>(numel, n, f, d, ref, e, s, o);
    case SignMask::Positive:
      return divide_all<T, SignMask::Positive, kFactor>(numel, n, f, d, ref, e, s, o);
    case SignMask::Negative:
      return divide_all<T, SignMask::Negative, kFactor>(numel, n, f, d, ref, e, s, o);
  }
  throw std::invalid_argument("stabilized_divide: sign must be -1, 0 or +1, got " +
                              std::to_string(static_cast<int>(mask)));
}

template <typename T>
void divide_typed(int64_t numel, uintptr_t numerator, uintptr_t factor, uintptr_t denominator,
                  double epsilon, double scale, uintptr_t sign_reference, SignMask mask,
                  uintptr_t out) {
  const auto* n = reinterpret_cast<const T*>(numerator);
  const auto* f = reinterpret_cast<const T*>(factor);
  const auto* d = reinterpret_cast<const T*>(denominator);
  const auto* ref = reinterpret_cast<const T*>(sign_reference);
  auto* o = reinterpret_cast<T*>(out);
  const T e = static_cast<T>(epsilon), s = static_cast<T>(scale);
  if (factor != 0) return divide_masked<T, true>(numel, n, f, d, ref, e, s, mask, o);
  return divide_masked<T, false>(numel, n, f, d, ref, e, s, mask, o);
}

}  // namespace

void stabilized_divide_cpu(DType dtype, int64_t numel, uintptr_t numerator, uintptr_t factor,
                           uintptr_t denominator, double epsilon, double scale,
                           uintptr_t sign_reference, SignMask mask, uintptr_t out) {
  switch (dtype) {
    case DType::Float32:
      return divide_typed<float>(numel, numerator, factor, denominator, epsilon, scale,
                                 sign_reference, mask, out);
    case DType::Float64:
      return divide_typed<double>(numel, numerator, factor, denominator, epsilon, scale,
                                  sign_reference, mask, out);
    default:
      throw std::invalid_argument(
          "stabilized_divide: the CPU kernel takes float32 or float64, got dtype code " +
          std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace relprop
