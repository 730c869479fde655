// Host stand-in for <cuda_fp16.h> (tests/cuda_emulation): the float16 storage type and the two
// conversions relprop's kernels use, with the device's semantics — float → half rounds to nearest
// even, overflows to ±inf past 65519.99…, keeps subnormals and NaN.
#pragma once

#include <cstdint>

#include "relprop_emulation_bits.h"

struct __half {
  std::uint16_t bits = 0;
};

inline float __half2float(__half h) {
  const std::uint32_t sign = std::uint32_t(h.bits & 0x8000u) << 16;
  const std::uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const std::uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1fu) {
    return relprop_emulation::bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  }
  if (exponent != 0) {  // rebias 15 → 127
    return relprop_emulation::bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
  // Zero or subnormal: mantissa · 2^-24 is exact in float.
  const float magnitude = float(mantissa) * (1.0f / 16777216.0f);
  return relprop_emulation::bits_float(relprop_emulation::float_bits(magnitude) | sign);
}

inline __half __float2half(float f) {
  const std::uint32_t bits = relprop_emulation::float_bits(f);
  const std::uint16_t sign = std::uint16_t((bits >> 16) & 0x8000u);
  std::uint32_t magnitude = bits & 0x7fffffffu;
  __half out;
  if (magnitude > 0x7f800000u) {
    out.bits = std::uint16_t(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));  // quiet NaN
  } else if (magnitude >= 0x477ff000u) {
    out.bits = sign | 0x7c00u;  // 65520 and above (and inf) round to inf
  } else if (magnitude < 0x38800000u) {
    // Below 2^-14: a half subnormal (or zero). Adding 0.5 puts the value's bits where a float's
    // last place is 2^-24, the half subnormal spacing, so the FPU's own rounding is the half's.
    const float shifted = relprop_emulation::bits_float(magnitude) + 0.5f;
    out.bits = std::uint16_t(sign | (relprop_emulation::float_bits(shifted) - 0x3f000000u));
  } else {
    // Normal: rebias the exponent (127 → 15) and round the 13 dropped bits to nearest even.
    const std::uint32_t odd = (magnitude >> 13) & 1u;
    magnitude += 0xc8000fffu + odd;
    out.bits = std::uint16_t(sign | (magnitude >> 13));
  }
  return out;
}
