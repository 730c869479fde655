// Host-side helpers shared by the CUDA sources of relprop._C: error checks and a device guard.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace relprop {
namespace cuda_detail {

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("relprop._C (CUDA): ") + what + ": " +
                             cudaGetErrorString(status));
  }
}

// Selects the caller's device for the launches and restores the previous one afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      cudaGetLastError();  // clear the sticky "no device" status
      throw std::runtime_error(
          "relprop._C: no CUDA device is available to the native kernels (no GPU or no driver)");
    }
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace cuda_detail
}  // namespace relprop
