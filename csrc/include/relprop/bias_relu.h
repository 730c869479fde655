// A layer's bias and the ReLU after it, in place, in one pass: the pointer interface shared by
// the CPU twin (csrc/cpu/bias_relu.cpp), the CUDA kernel (kernels/cuda/bias_relu.cu) and the
// bindings. Semantics: python/relprop/ops/bias_relu.py and docs/ops.md.
#pragma once

#include <cstdint>

#include "relprop/pool.h"

namespace relprop {

// z is a contiguous (rows, inner) buffer whose row r belongs to channel r % channels (an
// (N, C, *rest) tensor: rows = N·C, inner = the product of rest), bias a contiguous (channels,)
// buffer of z's dtype. Every element becomes v = z + bias[channel], then 0 where v < 0 (so NaN
// stays NaN and −0 stays −0, as torch's ReLU on the CPU keeps them); float16 and bfloat16 add in
// float32 and round once. Deterministic: every element is computed on its own. Throws
// std::invalid_argument for an unsupported dtype.
void bias_relu_cpu(DType dtype, int64_t rows, int64_t channels, int64_t inner, uintptr_t z,
                   uintptr_t bias);

#ifdef RELPROP_WITH_CUDA
// CUDA launcher. `stream` is a cudaStream_t handle.
void bias_relu_cuda(DType dtype, int64_t rows, int64_t channels, int64_t inner, uintptr_t z,
                    uintptr_t bias, uintptr_t stream, int device);
#endif

}  // namespace relprop
