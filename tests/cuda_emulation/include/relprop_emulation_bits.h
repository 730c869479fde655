// The bits of a float and back, for the stand-in float16/bfloat16 conversions (tests/cuda_emulation).
#pragma once

#include <cstdint>
#include <cstring>

namespace relprop_emulation {

inline std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace relprop_emulation
