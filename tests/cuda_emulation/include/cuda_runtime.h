// Host stand-in for <cuda_runtime.h> (tests/cuda_emulation): the part of the CUDA runtime and of
// the kernel language that kernels/cuda/*.cu use, so that their sources compile with a host C++
// compiler and run on the CPU, through the same entry points and bindings as on a GPU.
//
// A launch runs every thread of the grid, one block after another and one warp after another;
// the 32 lanes of a warp are fibers (ucontext) on the calling thread, so a warp shuffle works as
// on the device: each lane runs until it reaches the shuffle, and once every lane has, they
// exchange values and go on. A launch whose first warp shuffles nothing runs its other lanes as
// plain calls (fibers cost a microsecond a lane); a lane that shuffles then is reported. What the device would reject is reported the device's way, through
// cudaGetLastError: a launch configuration out of range, and a shuffle that names lanes which
// have exited (undefined on a GPU). Atomics are plain read-modify-writes (one host thread).
//
// Arithmetic is the host's IEEE float/double with round-to-nearest, as on the device, provided
// the caller compiles with -ffp-contract=off (nvcc contracts a·b + c into an FMA on the device;
// relprop's kernels round such products explicitly with __fmul_rn/__dmul_rn where it matters).
//
// Kernel launches `k<<<grid, block, shared, stream>>>(args)` are rewritten to
// `::relprop_emulation::launch(k, grid, block, shared, stream)(args)` by the builder
// (tests/cuda_emulation/__init__.py) before compiling.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};

// The built-in variables of the thread being run.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace relprop_emulation {

constexpr int kWarpSize = 32;
constexpr std::size_t kLaneStackBytes = 256 * 1024;

inline cudaError_t last_error = cudaSuccess;
inline std::string last_error_detail;
inline int current_device = 0;

inline void fail(cudaError_t error, const std::string& detail) {
  if (last_error == cudaSuccess) {
    last_error = error;
    last_error_detail = detail;
  }
}

// The warp being run: its lanes' contexts and stacks, and the values offered at a shuffle.
struct Warp {
  enum class State { Ready, AtShuffle, Done };
  ucontext_t scheduler;
  ucontext_t lane_context[kWarpSize];
  std::vector<char> stacks = std::vector<char>(kWarpSize * kLaneStackBytes);
  State state[kWarpSize];
  std::uint64_t offered[kWarpSize];
  std::uint64_t received[kWarpSize];
  unsigned int delta[kWarpSize];
  unsigned int mask[kWarpSize];
  int lanes = 0;
  int lane = 0;
  bool shuffled = false;  // a lane of this launch reached a shuffle
  bool direct = false;    // lanes run as plain calls, without fibers
  const std::function<void()>* body = nullptr;
};

inline Warp& warp() {
  static Warp instance;
  return instance;
}

inline void lane_entry() {
  Warp& w = warp();
  (*w.body)();
  w.state[w.lane] = Warp::State::Done;  // returning resumes the scheduler (uc_link)
}

// Runs lanes [0, lanes) of the warp whose first thread is `first_thread` to completion.
inline void run_warp(unsigned int first_thread, int lanes) {
  Warp& w = warp();
  w.lanes = lanes;
  for (int l = 0; l < lanes; ++l) {
    getcontext(&w.lane_context[l]);
    w.lane_context[l].uc_stack.ss_sp = w.stacks.data() + l * kLaneStackBytes;
    w.lane_context[l].uc_stack.ss_size = kLaneStackBytes;
    w.lane_context[l].uc_link = &w.scheduler;
    makecontext(&w.lane_context[l], lane_entry, 0);
    w.state[l] = Warp::State::Ready;
  }
  for (;;) {
    for (int l = 0; l < lanes; ++l) {
      if (w.state[l] != Warp::State::Ready) continue;
      w.lane = l;
      threadIdx = uint3{first_thread + l, 0, 0};
      swapcontext(&w.scheduler, &w.lane_context[l]);
    }
    int waiting = 0;
    for (int l = 0; l < lanes; ++l) waiting += w.state[l] == Warp::State::AtShuffle;
    if (waiting == 0) return;
    // Every live lane stopped at a shuffle: deliver, then let them go on.
    const unsigned int all_lanes = lanes == kWarpSize ? 0xffffffffu : ((1u << lanes) - 1u);
    for (int l = 0; l < lanes; ++l) {
      if (w.state[l] != Warp::State::AtShuffle) continue;
      if (waiting != lanes || (w.mask[l] & ~all_lanes) != 0) {
        fail(cudaErrorLaunchFailure,
             "__shfl_down_sync with mask " + std::to_string(w.mask[l]) + " reached by " +
                 std::to_string(waiting) + " of the warp's " + std::to_string(kWarpSize) +
                 " lanes (the others exited or do not exist): undefined on the device");
      }
      const unsigned int source = l + w.delta[l];
      w.received[l] = source < unsigned(lanes) && w.state[source] == Warp::State::AtShuffle
                          ? w.offered[source]
                          : w.offered[l];
    }
    for (int l = 0; l < lanes; ++l) {
      if (w.state[l] == Warp::State::AtShuffle) w.state[l] = Warp::State::Ready;
    }
  }
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  std::size_t shared_bytes;

  template <typename... Args>
  void operator()(Args... args) const {
    // The device's limits for a 1-D launch; relprop's kernels use x only.
    if (block.x < 1 || block.x > 1024 || block.y != 1 || block.z != 1 || grid.x < 1 ||
        grid.x > 0x7fffffffu || grid.y != 1 || grid.z != 1 || shared_bytes > 48 * 1024) {
      fail(cudaErrorInvalidConfiguration,
           "launch of grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
               std::to_string(grid.z) + ") × block (" + std::to_string(block.x) + ", " +
               std::to_string(block.y) + ", " + std::to_string(block.z) + ")");
      return;
    }
    std::lock_guard<std::mutex> lock(launch_mutex());
    const std::function<void()> body = [&] { kernel(args...); };
    Warp& w = warp();
    w.body = &body;
    w.shuffled = false;
    w.direct = false;
    gridDim = grid;
    blockDim = block;
    for (unsigned int b = 0; b < grid.x; ++b) {
      blockIdx = uint3{b, 0, 0};
      for (unsigned int t = 0; t < block.x; t += kWarpSize) {
        const unsigned int left = block.x - t;
        const int lanes = int(left < unsigned(kWarpSize) ? left : unsigned(kWarpSize));
        if (!w.direct) {
          run_warp(t, lanes);
          w.direct = !w.shuffled;  // decided by the launch's first warp
          continue;
        }
        for (int l = 0; l < lanes; ++l) {
          w.lane = l;
          threadIdx = uint3{t + l, 0, 0};
          body();
        }
      }
    }
    w.body = nullptr;
    w.direct = false;
  }
};

template <typename Kernel>
Launch<Kernel> launch(Kernel kernel, dim3 grid, dim3 block, std::size_t shared_bytes = 0,
                      cudaStream_t = nullptr) {
  return Launch<Kernel>{kernel, grid, block, shared_bytes};
}

}  // namespace relprop_emulation

// ---------------------------------------------------------------------------------------------
// Runtime API: one device, 0.

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = relprop_emulation::last_error;
  relprop_emulation::last_error = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument (emulated)";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure (emulated)";
  }
  return "unknown error";
}

inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = relprop_emulation::current_device;
  return cudaSuccess;
}

inline cudaError_t cudaSetDevice(int device) {
  if (device != 0) {
    relprop_emulation::fail(cudaErrorInvalidDevice, "device " + std::to_string(device));
    return cudaErrorInvalidDevice;
  }
  relprop_emulation::current_device = device;
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Device functions.

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }

// Products rounded on their own (never contracted into an FMA: compile with -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

inline int atomicMin(int* address, int value) {
  const int old = *address;
  if (value < old) *address = value;
  return old;
}

inline int atomicMax(int* address, int value) {
  const int old = *address;
  if (value > old) *address = value;
  return old;
}

// Lane l receives lane l + delta's value, or its own where l + delta is past the warp.
template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "emulated shuffles take up to 64 bits");
  relprop_emulation::Warp& w = relprop_emulation::warp();
  if (w.direct) {
    relprop_emulation::fail(cudaErrorLaunchFailure,
                            "emulation: a shuffle in a launch whose first warp had none (its "
                            "lanes run without fibers); extend tests/cuda_emulation");
    return value;
  }
  w.shuffled = true;
  const int l = w.lane;
  w.offered[l] = 0;
  std::memcpy(&w.offered[l], &value, sizeof value);
  w.delta[l] = delta;
  w.mask[l] = mask;
  w.state[l] = relprop_emulation::Warp::State::AtShuffle;
  swapcontext(&w.lane_context[l], &w.scheduler);
  T out;
  std::memcpy(&out, &w.received[l], sizeof out);
  return out;
}
