// CPU twin of kernels/cuda/add_relu.cu: the sum of two tensors and the ReLU after it, in one pass.
//
// relprop's CPU path does not call it (torch's own `add` and in-place ReLU are as fast there); it
// is the CUDA kernel's semantics on the CPU, tested against the reference like every twin. OpenMP
// threads take contiguous chunks; the loop is an add and a select, which -O3 vectorises. Every
// element is computed on its own: results do not depend on the thread count.
#include "relprop/add_relu.h"

#include <stdexcept>
#include <string>

namespace relprop {
namespace {

constexpr int64_t kChunk = 16384;
// Below this many elements one thread is faster than waking the team.
constexpr int64_t kParallelThreshold = 4 * kChunk;

template <typename T>
void add_relu_all(int64_t numel, const T* a, const T* b, T* out) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (numel >= kParallelThreshold)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * kChunk;
    const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
    const T* __restrict first = a;
    const T* __restrict second = b;
    T* __restrict result = out;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const T v = first[i] + second[i];
      result[i] = v < T(0) ? T(0) : v;
    }
  }
}

}  // namespace

void add_relu_cpu(DType dtype, int64_t numel, uintptr_t a, uintptr_t b, uintptr_t out) {
  switch (dtype) {
    case DType::Float32:
      return add_relu_all(numel, reinterpret_cast<const float*>(a),
                          reinterpret_cast<const float*>(b), reinterpret_cast<float*>(out));
    case DType::Float64:
      return add_relu_all(numel, reinterpret_cast<const double*>(a),
                          reinterpret_cast<const double*>(b), reinterpret_cast<double*>(out));
    default:
      throw std::invalid_argument(
          "add_relu: the CPU kernel takes float32 or float64, got dtype code " +
          std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace relprop
