// Host stand-in for <cuda_bf16.h> (tests/cuda_emulation): the bfloat16 storage type and the two
// conversions relprop's kernels use, with the device's semantics — float → bfloat16 rounds to
// nearest even and keeps NaN a NaN.
#pragma once

#include <cstdint>

#include "relprop_emulation_bits.h"

struct __nv_bfloat16 {
  std::uint16_t bits = 0;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  return relprop_emulation::bits_float(std::uint32_t(h.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16(float f) {
  std::uint32_t bits = relprop_emulation::float_bits(f);
  __nv_bfloat16 out;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    out.bits = std::uint16_t((bits >> 16) | 0x0040u);  // quiet NaN, sign kept
  } else {
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round the dropped half-word to nearest even
    out.bits = std::uint16_t(bits >> 16);
  }
  return out;
}
