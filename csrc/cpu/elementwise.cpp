// CPU twin of the fused element-wise kernels (kernels/cuda/elementwise.cu).
//
// The work is memory-bound: one pass reads the numerator, the denominator and (optionally) an
// addend and a factor of the numerator, the sign reference and a per-channel bias of the
// denominator, and writes the result, where the torch composition makes five to eight passes.
// OpenMP threads take contiguous runs of chunks; inside a chunk the loop is branch-free (selects only), so
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

// The operands of one division (addresses of absent ones are null and never read).
template <typename T>
struct Operands {
  const T* numerator;
  const T* addend;  // added to the numerator (a relevance reaching a tensor along two paths)
  const T* factor;
  const T* denominator;
  const T* reference;
  T epsilon, scale;
  T* out;
};

// One element, its denominator given (the bias added where there is one).
template <typename T, SignMask kMask, bool kFactor, bool kAddend>
RELPROP_ALWAYS_INLINE T divide_one(const Operands<T>& o, T denominator, int64_t i) {
  const T stabilized = stabilize_denominator(denominator, o.epsilon);
  const T n = kAddend ? o.numerator[i] + o.addend[i] : o.numerator[i];
  // Parenthesised as in the reference (python/relprop/ops/elementwise.py): equal bitwise.
  // A zero factor (x = 0) makes a zero relevance x · c even where c overflowed: inf · 0 is NaN.
  const T quotient = kFactor
                         ? (o.scale * (o.factor[i] == T(0) ? T(0) : n * o.factor[i])) / stabilized
                         : (o.scale * n) / stabilized;
  // `&`, not `&&`: a short-circuit would make the reference load conditional.
  bool keep = stabilized != T(0);
  if constexpr (kMask == SignMask::Positive) keep = keep & (o.reference[i] > T(0));
  if constexpr (kMask == SignMask::Negative) keep = keep & (o.reference[i] < T(0));
  return keep ? quotient : T(0);
}

// Vectorises only without GCC's default -ftrapping-math (CMakeLists.txt compiles this file with
// -fno-trapping-math, which changes no result, only whether FP exception flags are preserved):
// with it GCC sinks the division into a branch on `keep` and will not if-convert it back.
// `shift`: the denominator's bias, one value for the range (a range of one channel's elements).
template <typename T, SignMask kMask, bool kFactor, bool kAddend>
RELPROP_ALWAYS_INLINE void divide_loop(const Operands<T>& o, int64_t begin, int64_t end,
                                       bool shifted, T shift) {
  const T* __restrict denominator = o.denominator;
  T* __restrict out = o.out;
  if (shifted) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      out[i] = divide_one<T, kMask, kFactor, kAddend>(o, denominator[i] + shift, i);
    }
    return;
  }
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    out[i] = divide_one<T, kMask, kFactor, kAddend>(o, denominator[i], i);
  }
}

// The loop compiled for each instruction set (always_inline: the AVX2 copy vectorises the loop's
// body with its own target).
template <typename T, SignMask kMask, bool kFactor, bool kAddend>
void divide_range_baseline(const Operands<T>& o, int64_t begin, int64_t end, bool shifted,
                           T shift) {
  divide_loop<T, kMask, kFactor, kAddend>(o, begin, end, shifted, shift);
}

#if RELPROP_CPU_AVX2
template <typename T, SignMask kMask, bool kFactor, bool kAddend>
RELPROP_TARGET_AVX2 void divide_range_avx2(const Operands<T>& o, int64_t begin, int64_t end,
                                           bool shifted, T shift) {
  divide_loop<T, kMask, kFactor, kAddend>(o, begin, end, shifted, shift);
}
#endif

template <typename T, SignMask kMask, bool kFactor, bool kAddend>
auto divide_range_for_cpu() {
#if RELPROP_CPU_AVX2
  if (cpu_isa() == CpuIsa::Avx2) return &divide_range_avx2<T, kMask, kFactor, kAddend>;
#endif
  return &divide_range_baseline<T, kMask, kFactor, kAddend>;
}

template <typename T, SignMask kMask, bool kFactor, bool kAddend>
void divide_all(int64_t numel, const Operands<T>& o, const ChannelBias<T>& bias) {
  const auto divide_range = divide_range_for_cpu<T, kMask, kFactor, kAddend>();
  if (bias.values != nullptr) {
    // Row by row (one channel of one sample), each with its bias as one value.
    const int64_t rows = numel / bias.inner;
#pragma omp parallel for schedule(static) if (numel >= kParallelThreshold)
    for (int64_t row = 0; row < rows; ++row) {
      divide_range(o, row * bias.inner, (row + 1) * bias.inner, true,
                   bias.values[row % bias.channels]);
    }
    return;
  }
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (numel >= kParallelThreshold)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * kChunk;
    const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
    divide_range(o, begin, end, false, T(0));
  }
}

template <typename T, bool kFactor, bool kAddend>
void divide_masked(int64_t numel, const Operands<T>& o, SignMask mask,
                   const ChannelBias<T>& bias) {
  switch (mask) {
    case SignMask::None:
      return divide_all<T, SignMask::None, kFactor, kAddend>(numel, o, bias);
    case SignMask::Positive:
      return divide_all<T, SignMask::Positive, kFactor, kAddend>(numel, o, bias);
    case SignMask::Negative:
      return divide_all<T, SignMask::Negative, kFactor, kAddend>(numel, o, bias);
  }
  throw std::invalid_argument("stabilized_divide: sign must be -1, 0 or +1, got " +
                              std::to_string(static_cast<int>(mask)));
}

template <typename T>
void divide_typed(int64_t numel, const DivideBuffers& b, double epsilon, double scale,
                  SignMask mask) {
  const Operands<T> o{reinterpret_cast<const T*>(b.numerator),
                      reinterpret_cast<const T*>(b.numerator_addend),
                      reinterpret_cast<const T*>(b.factor),
                      reinterpret_cast<const T*>(b.denominator),
                      reinterpret_cast<const T*>(b.sign_reference),
                      static_cast<T>(epsilon),
                      static_cast<T>(scale),
                      reinterpret_cast<T*>(b.out)};
  const ChannelBias<T> bias{reinterpret_cast<const T*>(b.denominator_bias.values),
                            b.denominator_bias.channels, b.denominator_bias.inner};
  const bool factor = b.factor != 0, addend = b.numerator_addend != 0;
  if (factor && addend) return divide_masked<T, true, true>(numel, o, mask, bias);
  if (factor) return divide_masked<T, true, false>(numel, o, mask, bias);
  if (addend) return divide_masked<T, false, true>(numel, o, mask, bias);
  return divide_masked<T, false, false>(numel, o, mask, bias);
}

}  // namespace

void stabilized_divide_cpu(DType dtype, int64_t numel, const DivideBuffers& buffers,
                           double epsilon, double scale, SignMask mask) {
  check_denominator_bias("stabilized_divide", numel, buffers.denominator_bias);
  switch (dtype) {
    case DType::Float32:
      return divide_typed<float>(numel, buffers, epsilon, scale, mask);
    case DType::Float64:
      return divide_typed<double>(numel, buffers, epsilon, scale, mask);
    default:
      throw std::invalid_argument(
          "stabilized_divide: the CPU kernel takes float32 or float64, got dtype code " +
          std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace relprop
