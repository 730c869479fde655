// Which vector instructions the CPU twins' element-wise loops run with.
//
// The module is built for the compiler's baseline target (x86-64: SSE2, four floats per
// instruction) so that one wheel loads on every machine. The element-wise loops are memory- and
// division-bound, and with SSE2 they ran at half the speed of torch's own element-wise kernels,
// which pick AVX2 or AVX-512 at run time. Each such loop is therefore compiled twice, once for the
// baseline and once with `target("avx2")`, and the AVX2 copy runs where the CPU (and the OS, for
// the ymm state) supports it. Division, multiplication, copysign and selects are exact IEEE
// operations in both, and contraction to FMA is off (CMakeLists.txt), so both copies give bitwise
// the same result; the tests compare them.
#pragma once

#include <string>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__CUDACC__)
#define RELPROP_CPU_AVX2 1
#define RELPROP_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define RELPROP_CPU_AVX2 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define RELPROP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RELPROP_ALWAYS_INLINE inline
#endif

namespace relprop {

enum class CpuIsa : int { Baseline = 0, Avx2 = 1 };

// True when this build has a copy of the loops for `isa` and the machine can run it.
bool cpu_isa_supported(CpuIsa isa);

// The instruction set the loops use now: the best supported one unless set_cpu_isa chose another.
CpuIsa cpu_isa();

// Choose the loops' instruction set (tests run both copies); throws std::invalid_argument naming
// the machine's choices when `isa` is not supported here.
void set_cpu_isa(CpuIsa isa);

// "baseline" or "avx2".
std::string cpu_isa_name(CpuIsa isa);

}  // namespace relprop
