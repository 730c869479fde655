// Run-time choice of the element-wise loops' instruction set (see relprop/cpu_isa.h).
#include "relprop/cpu_isa.h"

#include <atomic>
#include <stdexcept>

namespace relprop {
namespace {

bool machine_has_avx2() {
#if RELPROP_CPU_AVX2
  // GCC's and Clang's check reads CPUID and, for AVX, whether the OS saves the ymm registers.
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

CpuIsa best_supported() { return machine_has_avx2() ? CpuIsa::Avx2 : CpuIsa::Baseline; }

std::atomic<int>& selected() {
  static std::atomic<int> isa{static_cast<int>(best_supported())};
  return isa;
}

}  // namespace

bool cpu_isa_supported(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Baseline:
      return true;
    case CpuIsa::Avx2:
      return machine_has_avx2();
  }
  return false;
}

CpuIsa cpu_isa() { return static_cast<CpuIsa>(selected().load(std::memory_order_relaxed)); }

void set_cpu_isa(CpuIsa isa) {
  if (!cpu_isa_supported(isa)) {
    throw std::invalid_argument(
        "set_cpu_isa: this machine or build cannot run '" + cpu_isa_name(isa) +
        "' loops; supported: baseline" + (machine_has_avx2() ? ", avx2" : ""));
  }
  selected().store(static_cast<int>(isa), std::memory_order_relaxed);
}

std::string cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Baseline:
      return "baseline";
    case CpuIsa::Avx2:
      return "avx2";
  }
  return "unknown(" + std::to_string(static_cast<int>(isa)) + ")";
}

}  // namespace relprop
