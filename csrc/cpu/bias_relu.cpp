// CPU twin of kernels/cuda/bias_relu.cu: a layer's bias and the ReLU after it, in place.
//
// relprop's CPU path does not call it (oneDNN adds a convolution's bias inside the convolution,
// so the ReLU after it is one pass there already); it is the CUDA kernel's semantics on the CPU,
// tested against the reference like every twin. OpenMP threads take whole rows (one channel of
// one sample each); the inner loop is an add and a select, which -O3 vectorises. Every element
// is computed on its own: results do not depend on the thread count.
#include "relprop/bias_relu.h"

#include <stdexcept>
#include <string>

namespace relprop {
namespace {

// Below this many elements one thread is faster than waking the team.
constexpr int64_t kParallelThreshold = 65536;

template <typename T>
void bias_relu_rows(int64_t rows, int64_t channels, int64_t inner, T* z, const T* bias) {
#pragma omp parallel for schedule(static) if (rows * inner >= kParallelThreshold)
  for (int64_t row = 0; row < rows; ++row) {
    const T b = bias[row % channels];
    T* __restrict values = z + row * inner;
#pragma omp simd
    for (int64_t j = 0; j < inner; ++j) {
      const T v = values[j] + b;
      values[j] = v < T(0) ? T(0) : v;
    }
  }
}

}  // namespace

void bias_relu_cpu(DType dtype, int64_t rows, int64_t channels, int64_t inner, uintptr_t z,
                   uintptr_t bias) {
  if (channels <= 0 && rows > 0) {
    throw std::invalid_argument("bias_relu: channels must be positive, got " +
                                std::to_string(channels));
  }
  switch (dtype) {
    case DType::Float32:
      return bias_relu_rows(rows, channels, inner, reinterpret_cast<float*>(z),
                            reinterpret_cast<const float*>(bias));
    case DType::Float64:
      return bias_relu_rows(rows, channels, inner, reinterpret_cast<double*>(z),
                            reinterpret_cast<const double*>(bias));
    default:
      throw std::invalid_argument(
          "bias_relu: the CPU kernel takes float32 or float64, got dtype code " +
          std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace relprop
