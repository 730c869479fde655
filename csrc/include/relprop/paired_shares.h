// Two shares of a relevance in one pass (the α-β rule's, the γ rule's): the pointer interface
// shared by the CPU twin (csrc/cpu/paired_shares.cpp), the CUDA kernel
// (kernels/cuda/paired_shares.cu) and the bindings. Semantics: python/relprop/ops/paired_shares.py
// and docs/ops.md.
#pragma once

#include <cstdint>

#include "relprop/elementwise.h"
#include "relprop/pool.h"

namespace relprop {

// Parameters of the two shares (plain struct, passed to kernels by value).
struct PairedSharesParams {
  double epsilon;       // stabiliser of both divisions
  double scale;         // of the first share (α; 1 for γ)
  double second_scale;  // of the second share (−β; 1 for γ)
  double z_weight;      // the second denominator is z_weight · z − zp (1 for α-β, 2 + γ for γ)
  bool sign_masks;      // keep the first share only where z > 0, the second where z < 0 (γ)
};

// For a relevance R (times `factor` where its address is not 0), the layer's output z and a
// modified pre-activation zp, all contiguous (samples, inner) buffers of one dtype, writes the
// contiguous (samples, 2, inner) buffer `out`:
//   out[n, 0, j] = scale · R / stab(zp, e)                          [z > 0 with sign_masks]
//   out[n, 1, j] = second_scale · R / stab(z_weight · z − zp, e)    [z < 0 with sign_masks]
// each 0 where its stabilised denominator is 0 or its mask fails, so that one transposed product
// with two weight sets stacked along the outputs sums both terms. With `zp_bias` (elementwise.h's
// DenominatorBias; its `inner` is the elements per channel, inner / channels) zp is
// zp + bias[channel] wherever it is read, added in the compute type. The second denominator is not
// rounded to the dtype before the division (16-bit types are computed in float32).
// Deterministic: every element is computed on its own. Throws std::invalid_argument for an
// unsupported dtype.
void paired_shares_cpu(DType dtype, int64_t samples, int64_t inner, uintptr_t relevance,
                       uintptr_t factor, uintptr_t z, uintptr_t zp, const DenominatorBias& zp_bias,
                       const PairedSharesParams& params, uintptr_t out);

#ifdef RELPROP_WITH_CUDA
// CUDA launcher; float16 and bfloat16 compute in float32. `stream` is a cudaStream_t handle.
void paired_shares_cuda(DType dtype, int64_t samples, int64_t inner, uintptr_t relevance,
                        uintptr_t factor, uintptr_t z, uintptr_t zp,
                        const DenominatorBias& zp_bias, const PairedSharesParams& params,
                        uintptr_t out, uintptr_t stream, int device);
#endif

}  // namespace relprop
