// Fused element-wise kernels of the relevance rules: the pointer interface shared by the CPU twin
// (csrc/cpu/elementwise.cpp), the CUDA kernel (kernels/cuda/elementwise.cu) and the bindings.
//
// All tensors are contiguous buffers of `numel` elements of one dtype (DType codes of pool.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "relprop/pool.h"

namespace relprop {

// Which entries of a stabilised division survive: all of them, those whose sign reference is
// > 0, or those whose sign reference is < 0 (the others become exactly 0).
enum class SignMask : int { None = 0, Positive = 1, Negative = -1 };

// stab(d, e) = d + e * (sign(d) + [d == 0]); zero, -0.0 included, counts as positive.
// copysign alone would send -0.0 to -e; adding +0.0 first turns -0.0 into +0.0 and leaves every
// other value alone (compilers keep `d + 0` unless told to ignore signed zeros, as -ffast-math
// does). copysign is a bit operation, so the CPU loop has no branch here to vectorise around.
template <typename T>
RELPROP_HD T stabilize_denominator(T d, T e) {
  return d + std::copysign(e, d + T(0));
}

// A per-channel bias of the denominator: element i of an (N, C, *rest) buffer gets
// values[(i / inner) % channels] (inner: the product of rest). Address 0: no bias. The layer's
// bias, added here instead of in a pass of its own after the product that made the denominator
// (torch adds a convolution's bias after cuDNN's product, a read and a write of the output).
struct DenominatorBias {
  uintptr_t values = 0;
  int64_t channels = 1;
  int64_t inner = 1;
};

// The same with typed values (the kernels' form).
template <typename T>
struct ChannelBias {
  const T* values;
  int64_t channels;
  int64_t inner;
};

// Throws std::invalid_argument, naming `op`, unless a given bias describes whole rows of a
// numel-element buffer.
inline void check_denominator_bias(const char* op, int64_t numel, const DenominatorBias& bias) {
  if (bias.values == 0) return;
  if (bias.channels <= 0 || bias.inner <= 0 || numel % (bias.channels * bias.inner) != 0) {
    throw std::invalid_argument(
        std::string(op) +
        ": a bias needs channels > 0 and inner > 0 dividing the buffer into whole (sample, "
        "channel) rows");
  }
}

// The buffers of one division: contiguous, numel elements each, of one dtype, except the bias
// (DenominatorBias). Address 0: an absent operand.
struct DivideBuffers {
  uintptr_t numerator = 0;
  uintptr_t numerator_addend = 0;  // added to the numerator
  uintptr_t factor = 0;            // multiplies the numerator (after the addend)
  uintptr_t denominator = 0;
  DenominatorBias denominator_bias;
  uintptr_t sign_reference = 0;
  uintptr_t out = 0;
};

// out = keep ? (scale * ((numerator + addend) * factor)) / stab(denominator + bias, e) : 0, and 0
// wherever the stabilised denominator is 0 (for e = 0: where the denominator is 0). Absent
// operands drop out: no addend, no factor (the numerator taken as it is), no bias. The factor lets
// a relevance that is a product c * x (x the layer input above) be divided without first being
// formed; the addend, one that reached the tensor along two paths (c1 + c2) * x without first
// being summed; the bias, a layer's bias added here instead of in a pass of its own. The sums
// are rounded once in the compute type, the factor's product is exactly 0 where the factor is 0.
// `keep` follows `mask` applied to `sign_reference` (ignored, and may be 0, when mask is
// SignMask::None). Deterministic: every element is computed on its own. Throws
// std::invalid_argument for an unsupported dtype or a bias that does not fit.
void stabilized_divide_cpu(DType dtype, int64_t numel, const DivideBuffers& buffers,
                           double epsilon, double scale, SignMask mask);

#ifdef RELPROP_WITH_CUDA
// CUDA launcher; float16 and bfloat16 compute in float32. `stream` is a cudaStream_t handle.
void stabilized_divide_cuda(DType dtype, int64_t numel, const DivideBuffers& buffers,
                            double epsilon, double scale, SignMask mask, uintptr_t stream,
                            int device);
#endif

}  // namespace relprop
