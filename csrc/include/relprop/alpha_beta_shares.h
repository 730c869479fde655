// The α-β rule's two shares in one pass: the pointer interface shared by the CPU twin
// (csrc/cpu/alpha_beta_shares.cpp), the CUDA kernel (kernels/cuda/alpha_beta_shares.cu) and the
// bindings. Semantics: python/relprop/ops/alpha_beta_shares.py and docs/ops.md.
#pragma once

#include <cstdint>

#include "relprop/elementwise.h"
#include "relprop/pool.h"

namespace relprop {

// For a relevance R (times `factor` where its address is not 0), the layer's output z and its
// positive part zp = W⁺x + b⁺, all contiguous (samples, inner) buffers of one dtype, writes the
// contiguous (samples, 2, inner) buffer `out`:
//   out[n, 0, j] = alpha · R / stab(zp, e)        (0 where stab(zp, e) = 0)
//   out[n, 1, j] = -beta · R / stab(z − zp, e)    (0 where stab(z − zp, e) = 0)
// so that one transposed product with the weights [W⁺; W⁻] stacked along the outputs gives
// α·W⁺ᵀ(R/zp) − β·W⁻ᵀ(R/zn). z − zp is not rounded to the dtype before the division (16-bit types
// are computed in float32). Deterministic: every element is computed on its own. Throws
// std::invalid_argument for an unsupported dtype.
void alpha_beta_shares_cpu(DType dtype, int64_t samples, int64_t inner, uintptr_t relevance,
                           uintptr_t factor, uintptr_t z, uintptr_t zp, double epsilon,
                           double alpha, double beta, uintptr_t out);

#ifdef RELPROP_WITH_CUDA
// CUDA launcher; float16 and bfloat16 compute in float32. `stream` is a cudaStream_t handle.
void alpha_beta_shares_cuda(DType dtype, int64_t samples, int64_t inner, uintptr_t relevance,
                            uintptr_t factor, uintptr_t z, uintptr_t zp, double epsilon,
                            double alpha, double beta, uintptr_t out, uintptr_t stream,
                            int device);
#endif

}  // namespace relprop
