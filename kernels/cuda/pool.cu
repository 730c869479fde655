// CUDA pooling relevance kernels; CPU twins in csrc/cpu/pool.cpp, semantics in docs/ops.md.
//
// Determinism: no floating-point atomics. Every kernel that produces input relevance runs one
// thread per *input* element and gathers its contributions from the outputs in raster order, the
// same order in which the CPU twin scatters them, so repeated runs are bitwise equal.
#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "relprop/cuda_common.cuh"
#include "relprop/cuda_scalars.cuh"
#include "relprop/elementwise.h"
#include "relprop/pool.h"
#include "relprop/pool_geometry.h"

namespace relprop {
namespace {

using cuda_detail::dispatch_dtype;

using cuda_detail::check;
using cuda_detail::Compute;
using cuda_detail::DeviceGuard;
using cuda_detail::from_compute;
using cuda_detail::to_compute;

constexpr int kThreads = 256;

unsigned int blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > INT_MAX ? INT_MAX : blocks));
}

// ---------------------------------------------------------------------------------------------
// Max pool (winner takes all). The forward's indices are arbitrary positions in the plane, so the
// gather needs to know which outputs can point at an input. Output (oh, ow) has a *nominal* input
// position (floor(oh*H/OH), floor(ow*W/OW)); a first pass measures the range of the winners'
// offsets from it (integer min/max atomics, which are order-independent), and each input then scans
// only the outputs whose nominal position lies within that range of it. For regular pools this is
// exactly the set of windows holding the input.

__global__ void init_offset_bounds_kernel(int* bounds) {
  bounds[0] = INT_MAX;  // min row offset
  bounds[1] = INT_MIN;  // max row offset
  bounds[2] = INT_MAX;  // min column offset
  bounds[3] = INT_MIN;  // max column offset
}

// Index arithmetic in I: int where every index and product below fits (the usual case), where a
// 64-bit division costs several times a 32-bit one and the gather is mostly index arithmetic.

// Sample, channel, row and column of element k of a contiguous (N, C, height, width) tensor.
template <typename I>
struct PlaneIndex {
  I n, c, row, col;
};

template <typename I>
__device__ __forceinline__ PlaneIndex<I> plane_index(I k, I channels, I height, I width) {
  const I rest = k / width;
  const I plane = rest / height;
  return {plane / channels, plane % channels, rest % height, k % width};
}

template <typename I>
__global__ void winner_offset_bounds_kernel(PlaneShape s, const int64_t* indices, Strides4 is,
                                            int* bounds) {
  const I out_w = I(s.out_w), out_h = I(s.out_h), channels = I(s.channels);
  const I in_w = I(s.in_w), in_h = I(s.in_h);
  const I total = I(s.batch) * channels * out_h * out_w;
  int row_min = INT_MAX, row_max = INT_MIN, col_min = INT_MAX, col_max = INT_MIN;
  for (I k = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); k < total;
       k += I(gridDim.x) * I(blockDim.x)) {
    const PlaneIndex<I> at = plane_index<I>(k, channels, out_h, out_w);
    const I n = at.n, c = at.c, oh = at.row, ow = at.col;
    const I winner = I(indices[n * is[0] + c * is[1] + oh * is[2] + ow * is[3]]);
    const int row_offset = static_cast<int>(winner / in_w - (oh * in_h) / out_h);
    const int col_offset = static_cast<int>(winner % in_w - (ow * in_w) / out_w);
    row_min = min(row_min, row_offset);
    row_max = max(row_max, row_offset);
    col_min = min(col_min, col_offset);
    col_max = max(col_max, col_offset);
  }
  for (int delta = 16; delta > 0; delta /= 2) {
    row_min = min(row_min, __shfl_down_sync(0xffffffffu, row_min, delta));
    row_max = max(row_max, __shfl_down_sync(0xffffffffu, row_max, delta));
    col_min = min(col_min, __shfl_down_sync(0xffffffffu, col_min, delta));
    col_max = max(col_max, __shfl_down_sync(0xffffffffu, col_max, delta));
  }
  if ((threadIdx.x & 31) == 0) {
    atomicMin(&bounds[0], row_min);
    atomicMax(&bounds[1], row_max);
    atomicMin(&bounds[2], col_min);
    atomicMax(&bounds[3], col_max);
  }
}

// Outputs o in [0, out_size) whose nominal position floor(o*in/out) lies in [i - hi, i - lo].
template <typename I>
__device__ __forceinline__ void nominal_inverse(I i, I in_size, I out_size, int lo, int hi,
                                                I* first, I* last) {
  const I begin = ceil_div<I>((i - I(hi)) * out_size, in_size);
  const I end = ceil_div<I>((i - I(lo) + 1) * out_size, in_size) - 1;
  *first = begin > 0 ? begin : I(0);
  *last = end < out_size - 1 ? end : out_size - 1;
}

// The outputs whose winner input k can be: its sample and channel, its flat position in the
// plane, and the output rows and columns to scan. The bounds are those measured by the pass
// before, or known from the pool's geometry (uniform: every thread takes the same branch).
template <typename I>
struct Candidates {
  I n, c;
  int64_t flat;
  I oh0, oh1, ow0, ow1;
};

template <typename I>
__device__ __forceinline__ Candidates<I> candidates(const PlaneShape& s, I k, const int* measured,
                                                    const OffsetBounds& known) {
  const I in_w = I(s.in_w), in_h = I(s.in_h);
  const PlaneIndex<I> at = plane_index<I>(k, I(s.channels), in_h, in_w);
  const OffsetBounds b =
      measured != nullptr ? OffsetBounds{measured[0], measured[1], measured[2], measured[3]} : known;
  Candidates<I> found{at.n, at.c, int64_t(at.row) * s.in_w + at.col, 0, 0, 0, 0};
  nominal_inverse<I>(at.row, in_h, I(s.out_h), b.row_min, b.row_max, &found.oh0, &found.oh1);
  nominal_inverse<I>(at.col, in_w, I(s.out_w), b.col_min, b.col_max, &found.ow0, &found.ow1);
  return found;
}

template <typename T, typename I>
__global__ void max_pool_gather_kernel(PlaneShape s, const T* relevance, Strides4 rs,
                                       const int64_t* indices, Strides4 is, const int* measured,
                                       OffsetBounds known, T* out) {
  using Acc = typename Compute<T>::type;
  const I total = I(s.batch) * I(s.channels) * I(s.in_h) * I(s.in_w);
  const I k = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x);
  if (k >= total) return;
  const Candidates<I> at = candidates<I>(s, k, measured, known);
  const T* r = relevance + at.n * rs[0] + at.c * rs[1];
  const int64_t* idx = indices + at.n * is[0] + at.c * is[1];
  Acc acc = Acc(0);
  for (I oh = at.oh0; oh <= at.oh1; ++oh) {
    for (I ow = at.ow0; ow <= at.ow1; ++ow) {
      if (idx[oh * is[2] + ow * is[3]] == at.flat) acc += to_compute(r[oh * rs[2] + ow * rs[3]]);
    }
  }
  out[k] = from_compute<T>(acc);
}

// The division of the layer under the pool at its winners, spread (pool.h): the gather above,
// each matching output's share computed as stabilized_divide computes it (elementwise.cu's
// `share`, scale 1) with this input's denominator, summed in the compute type and rounded once.
template <typename T>
struct WinnerOperands {
  const T* addend;     // null: none
  const T* factor;     // null: none
  const T* reference;  // null: no sign test
  const T* denominator;
  const T* bias;  // null: none
  bool at_outputs;  // the denominator has the relevance's shape: read per output
  typename Compute<T>::type epsilon;
};

template <typename T, typename I>
__global__ void max_pool_divided_gather_kernel(PlaneShape s, const T* relevance, Strides4 rs,
                                               const int64_t* indices, Strides4 is,
                                               const int* measured, OffsetBounds known,
                                               WinnerOperands<T> w, T* out) {
  using Acc = typename Compute<T>::type;
  const I total = I(s.batch) * I(s.channels) * I(s.in_h) * I(s.in_w);
  const I k = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x);
  if (k >= total) return;
  const Candidates<I> at = candidates<I>(s, k, measured, known);
  const int64_t first = at.n * rs[0] + at.c * rs[1];
  const int64_t* idx = indices + at.n * is[0] + at.c * is[1];
  // The input's stabilised denominator, read once (coalesced: consecutive threads, consecutive
  // inputs) whether or not the input won a window — or each winning output's (uniform branch).
  const Acc shift = w.bias != nullptr ? to_compute(w.bias[at.c]) : Acc(0);
  const Acc own = w.at_outputs ? Acc(0)
                  : stabilize_denominator(to_compute(w.denominator[k]) + shift, w.epsilon);
  Acc acc = Acc(0);
  for (I oh = at.oh0; oh <= at.oh1; ++oh) {
    for (I ow = at.ow0; ow <= at.ow1; ++ow) {
      if (idx[oh * is[2] + ow * is[3]] != at.flat) continue;
      const int64_t o = first + oh * rs[2] + ow * rs[3];
      const Acc stabilized =
          w.at_outputs ? stabilize_denominator(to_compute(w.denominator[o]) + shift, w.epsilon)
                       : own;
      bool keep = stabilized != Acc(0);
      if (w.reference != nullptr) keep = keep && to_compute(w.reference[o]) > Acc(0);
      const Acc r = w.addend != nullptr ? to_compute(relevance[o]) + to_compute(w.addend[o])
                                        : to_compute(relevance[o]);
      Acc numerator = r;
      if (w.factor != nullptr) {
        const Acc f = to_compute(w.factor[o]);
        numerator = f == Acc(0) ? Acc(0) : r * f;
      }
      acc += keep ? (Acc(1) * numerator) / stabilized : Acc(0);
    }
  }
  out[k] = from_compute<T>(acc);
}

// ---------------------------------------------------------------------------------------------
// Average pools (z-rule), as in the CPU twin. Pass 1, one thread per output:
// share = R / stab(z, e) / divisor with z = P x. Pass 2, one thread per input:
// out = x * sum of the shares of the windows holding it.

template <typename T, typename Windows>
__global__ void avg_share_kernel(PlaneShape s, Windows windows, const T* x, Strides4 xs,
                                 const T* relevance, Strides4 rs,
                                 typename Compute<T>::type stabilizer,
                                 typename Compute<T>::type* share) {
  using Acc = typename Compute<T>::type;
  const int64_t total = s.batch * s.channels * s.out_h * s.out_w;
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= total) return;
  const int64_t ow = k % s.out_w;
  const int64_t oh = (k / s.out_w) % s.out_h;
  const int64_t c = (k / (s.out_w * s.out_h)) % s.channels;
  const int64_t n = k / (s.out_w * s.out_h * s.channels);
  const AxisWindow wh = windows.rows(s, oh);
  const AxisWindow ww = windows.cols(s, ow);
  const T* xp = x + n * xs[0] + c * xs[1];
  Acc sum = Acc(0);
  for (int64_t ih = wh.start; ih < wh.end; ++ih) {
    for (int64_t iw = ww.start; iw < ww.end; ++iw) sum += to_compute(xp[ih * xs[2] + iw * xs[3]]);
  }
  const Acc divisor = Acc(windows.divisor(wh, ww));
  const Acc r = to_compute(relevance[n * rs[0] + c * rs[1] + oh * rs[2] + ow * rs[3]]);
  share[k] = stabilized_ratio(r, sum / divisor, stabilizer) / divisor;
}

template <typename T, typename Windows>
__global__ void avg_gather_kernel(PlaneShape s, Windows windows, const T* x, Strides4 xs,
                                  const typename Compute<T>::type* share, T* out) {
  using Acc = typename Compute<T>::type;
  const int64_t total = s.batch * s.channels * s.in_h * s.in_w;
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= total) return;
  const int64_t iw = k % s.in_w;
  const int64_t ih = (k / s.in_w) % s.in_h;
  const int64_t c = (k / (s.in_w * s.in_h)) % s.channels;
  const int64_t n = k / (s.in_w * s.in_h * s.channels);
  int64_t oh0, oh1, ow0, ow1;
  windows.inverse_rows(s, ih, &oh0, &oh1);
  windows.inverse_cols(s, iw, &ow0, &ow1);
  const Acc* plane_share = share + (n * s.channels + c) * s.out_h * s.out_w;
  Acc acc = Acc(0);
  for (int64_t oh = oh0; oh <= oh1; ++oh) {
    for (int64_t ow = ow0; ow <= ow1; ++ow) acc += plane_share[oh * s.out_w + ow];
  }
  out[k] = from_compute<T>(acc * to_compute(x[n * xs[0] + c * xs[1] + ih * xs[2] + iw * xs[3]]));
}

// ---------------------------------------------------------------------------------------------
// Host launchers.

// The winners' offset bounds a gather reads: null where they are known (the kernel takes them by
// value), else `bounds` after two launches that measure them on the device.
template <typename I>
const int* measured_bounds(const PlaneShape& s, const int64_t* idx, const Strides4& is,
                           int* bounds, const OffsetBounds* known, cudaStream_t stream) {
  if (known != nullptr) return nullptr;
  const int64_t out_total = s.batch * s.channels * s.out_h * s.out_w;
  init_offset_bounds_kernel<<<1, 1, 0, stream>>>(bounds);
  // Grid-stride loop: a bounded grid keeps the global atomics to a few per block.
  const unsigned int bound_blocks = min(blocks_for(out_total), 1024u);
  winner_offset_bounds_kernel<I><<<bound_blocks, kThreads, 0, stream>>>(s, idx, is, bounds);
  return bounds;
}

// Whether a gather's index arithmetic fits 32 bits (see I above): the element counts (a grid's
// last block runs past them by up to kThreads), and nominal_inverse's (i - lo + 1) * out_size
// with |lo|, |hi| at most the plane's side.
bool narrow_gather(const PlaneShape& s) {
  const int64_t limit = INT_MAX - kThreads;
  return s.batch * s.channels * s.in_h * s.in_w < limit &&
         s.batch * s.channels * s.out_h * s.out_w < limit && 3 * s.in_h * (s.out_h + 1) < limit &&
         3 * s.in_w * (s.out_w + 1) < limit;
}

template <typename T, typename I>
void launch_max_pool_with(const PlaneShape& s, uintptr_t relevance, const Strides4& rs,
                          const int64_t* idx, const Strides4& is, int* bounds,
                          const OffsetBounds* known, uintptr_t out, cudaStream_t stream) {
  const int64_t in_total = s.batch * s.channels * s.in_h * s.in_w;
  const int* measured = measured_bounds<I>(s, idx, is, bounds, known, stream);
  max_pool_gather_kernel<T, I><<<blocks_for(in_total), kThreads, 0, stream>>>(
      s, reinterpret_cast<const T*>(relevance), rs, idx, is, measured,
      known != nullptr ? *known : OffsetBounds{0, 0, 0, 0}, reinterpret_cast<T*>(out));
}

template <typename T>
void launch_max_pool(const PlaneShape& s, uintptr_t relevance, const Strides4& rs,
                     uintptr_t indices, const Strides4& is, uintptr_t out, uintptr_t workspace,
                     const OffsetBounds* known, cudaStream_t stream) {
  const auto* idx = reinterpret_cast<const int64_t*>(indices);
  auto* bounds = reinterpret_cast<int*>(workspace);
  if (s.batch * s.channels * s.in_h * s.in_w == 0) return;
  if (narrow_gather(s)) {
    launch_max_pool_with<T, int>(s, relevance, rs, idx, is, bounds, known, out, stream);
  } else {
    launch_max_pool_with<T, int64_t>(s, relevance, rs, idx, is, bounds, known, out, stream);
  }
  check(cudaGetLastError(), "max_pool_relevance launch");
}

template <typename T, typename I>
void launch_max_pool_divided_with(const PlaneShape& s, uintptr_t relevance, const Strides4& rs,
                                  const int64_t* idx, const Strides4& is,
                                  const WinnerOperands<T>& w, int* bounds,
                                  const OffsetBounds* known, uintptr_t out, cudaStream_t stream) {
  const int64_t in_total = s.batch * s.channels * s.in_h * s.in_w;
  const int* measured = measured_bounds<I>(s, idx, is, bounds, known, stream);
  max_pool_divided_gather_kernel<T, I><<<blocks_for(in_total), kThreads, 0, stream>>>(
      s, reinterpret_cast<const T*>(relevance), rs, idx, is, measured,
      known != nullptr ? *known : OffsetBounds{0, 0, 0, 0}, w, reinterpret_cast<T*>(out));
}

template <typename T>
void launch_max_pool_divided(const PlaneShape& s, uintptr_t relevance, const Strides4& rs,
                             uintptr_t indices, const Strides4& is, const WinnerDivision& d,
                             uintptr_t out, uintptr_t workspace, const OffsetBounds* known,
                             cudaStream_t stream) {
  using Acc = typename Compute<T>::type;
  const auto* idx = reinterpret_cast<const int64_t*>(indices);
  auto* bounds = reinterpret_cast<int*>(workspace);
  if (s.batch * s.channels * s.in_h * s.in_w == 0) return;
  const WinnerOperands<T> w{reinterpret_cast<const T*>(d.addend),
                            reinterpret_cast<const T*>(d.factor),
                            reinterpret_cast<const T*>(d.sign_reference),
                            reinterpret_cast<const T*>(d.denominator),
                            reinterpret_cast<const T*>(d.denominator_bias),
                            d.denominator_at_outputs,
                            static_cast<Acc>(d.epsilon)};
  if (narrow_gather(s)) {
    launch_max_pool_divided_with<T, int>(s, relevance, rs, idx, is, w, bounds, known, out, stream);
  } else {
    launch_max_pool_divided_with<T, int64_t>(s, relevance, rs, idx, is, w, bounds, known, out,
                                             stream);
  }
  check(cudaGetLastError(), "max_pool_divided_relevance launch");
}

template <typename T, typename Windows>
void launch_avg(const PlaneShape& s, const Windows& windows, uintptr_t x, const Strides4& xs,
                uintptr_t relevance, const Strides4& rs, double stabilizer, uintptr_t out,
                uintptr_t workspace, cudaStream_t stream) {
  using Acc = typename Compute<T>::type;
  const int64_t out_total = s.batch * s.channels * s.out_h * s.out_w;
  const int64_t in_total = s.batch * s.channels * s.in_h * s.in_w;
  if (in_total == 0) return;
  auto* share = reinterpret_cast<Acc*>(workspace);
  if (out_total > 0) {
    avg_share_kernel<T, Windows><<<blocks_for(out_total), kThreads, 0, stream>>>(
        s, windows, reinterpret_cast<const T*>(x), xs, reinterpret_cast<const T*>(relevance), rs,
        static_cast<Acc>(stabilizer), share);
  }
  avg_gather_kernel<T, Windows><<<blocks_for(in_total), kThreads, 0, stream>>>(
      s, windows, reinterpret_cast<const T*>(x), xs, share, reinterpret_cast<T*>(out));
  check(cudaGetLastError(), "average pool relevance launch");
}

}  // namespace

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

void max_pool_relevance_cuda(DType dtype, const PlaneShape& shape, uintptr_t relevance,
                             const Strides4& relevance_strides, uintptr_t indices,
                             const Strides4& indices_strides, uintptr_t out, uintptr_t workspace,
                             const OffsetBounds* known, uintptr_t stream, int device) {
  DeviceGuard guard(device);
  dispatch_dtype(dtype, "max_pool_relevance", [&](auto tag) {
    using T = decltype(tag);
    launch_max_pool<T>(shape, relevance, relevance_strides, indices, indices_strides, out,
                       workspace, known, reinterpret_cast<cudaStream_t>(stream));
  });
}

void max_pool_divided_relevance_cuda(DType dtype, const PlaneShape& shape, uintptr_t relevance,
                                     const Strides4& relevance_strides, uintptr_t indices,
                                     const Strides4& indices_strides,
                                     const WinnerDivision& division, uintptr_t out,
                                     uintptr_t workspace, const OffsetBounds* known,
                                     uintptr_t stream, int device) {
  DeviceGuard guard(device);
  dispatch_dtype(dtype, "max_pool_divided_relevance", [&](auto tag) {
    using T = decltype(tag);
    launch_max_pool_divided<T>(shape, relevance, relevance_strides, indices, indices_strides,
                               division, out, workspace, known,
                               reinterpret_cast<cudaStream_t>(stream));
  });
}

void avg_pool2d_relevance_cuda(DType dtype, const PlaneShape& shape,
                               const AvgPoolGeometry& geometry, uintptr_t x,
                               const Strides4& x_strides, uintptr_t relevance,
                               const Strides4& relevance_strides, double stabilizer, uintptr_t out,
                               uintptr_t workspace, uintptr_t stream, int device) {
  DeviceGuard guard(device);
  dispatch_dtype(dtype, "avg_pool2d_relevance", [&](auto tag) {
    using T = decltype(tag);
    launch_avg<T>(shape, AvgPoolWindows{geometry}, x, x_strides, relevance, relevance_strides,
                  stabilizer, out, workspace, reinterpret_cast<cudaStream_t>(stream));
  });
}

void adaptive_avg_pool2d_relevance_cuda(DType dtype, const PlaneShape& shape, uintptr_t x,
                                        const Strides4& x_strides, uintptr_t relevance,
                                        const Strides4& relevance_strides, double stabilizer,
                                        uintptr_t out, uintptr_t workspace, uintptr_t stream,
                                        int device) {
  DeviceGuard guard(device);
  dispatch_dtype(dtype, "adaptive_avg_pool2d_relevance", [&](auto tag) {
    using T = decltype(tag);
    launch_avg<T>(shape, AdaptiveAvgPoolWindows{}, x, x_strides, relevance, relevance_strides,
                  stabilizer, out, workspace, reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace relprop
