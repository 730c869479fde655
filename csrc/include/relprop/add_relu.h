// The sum of two tensors and the ReLU after it, in one pass (a ResNet block's end): the pointer
// interface shared by the CPU twin (csrc/cpu/add_relu.cpp), the CUDA kernel
// (kernels/cuda/add_relu.cu) and the bindings. Semantics: python/relprop/ops/add_relu.py and
// docs/ops.md.
#pragma once

#include <cstdint>

#include "relprop/pool.h"

namespace relprop {

// a, b and out are contiguous buffers of numel elements of one dtype: out = v where v = a + b is
// not < 0, else 0 (so NaN stays NaN and −0 stays −0, as torch's ReLU on the CPU keeps them);
// float16 and bfloat16 add in float32 and round once. Deterministic: every element is computed
// on its own. Throws std::invalid_argument for an unsupported dtype.
void add_relu_cpu(DType dtype, int64_t numel, uintptr_t a, uintptr_t b, uintptr_t out);

#ifdef RELPROP_WITH_CUDA
// CUDA launcher. `stream` is a cudaStream_t handle.
void add_relu_cuda(DType dtype, int64_t numel, uintptr_t a, uintptr_t b, uintptr_t out,
                   uintptr_t stream, int device);
#endif

}  // namespace relprop
