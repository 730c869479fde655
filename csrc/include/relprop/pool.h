// Pooling relevance kernels: the pointer interface shared by the CPU twins (csrc/cpu/pool.cpp),
// the CUDA kernels (kernels/cuda/pool.cu) and the pybind11 bindings (csrc/bindings.cpp).
//
// Tensors arrive as raw data pointers plus element strides of an (N, C, H, W) view, so the module
// never links libtorch. Outputs are always contiguous (N, C, H, W) buffers. 1-D pooling is passed
// as H = 1. Semantics are those of docs/ops.md.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RELPROP_HD __host__ __device__ __forceinline__
#else
#define RELPROP_HD inline
#endif

namespace relprop {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Element strides of an (N, C, H, W) view; a plain struct so that kernels take it by value.
struct Strides4 {
  int64_t values[4];
  RELPROP_HD int64_t operator[](int dim) const { return values[dim]; }
};

struct PlaneShape {
  int64_t batch, channels, in_h, in_w, out_h, out_w;
};

// Window geometry of torch.nn.functional.avg_pool2d (the output size is given by the caller).
struct AvgPoolGeometry {
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
  bool count_include_pad;
  int64_t divisor_override;  // <= 0: none
};

// Range of the winners' offsets from their outputs' nominal positions (floor(o * in / out) along
// each side), which bounds the outputs a CUDA gather thread scans: known on the host from a
// regular pool's window geometry, else measured on the device (kernels/cuda/pool.cu).
struct OffsetBounds {
  int row_min, row_max, col_min, col_max;
};

// Winner takes all: out[n, c, idx[n, c, o]] += relevance[n, c, o], idx flat in the (H, W) plane.
// Throws std::out_of_range for an index outside the plane.
void max_pool_relevance_cpu(DType dtype, const PlaneShape& shape, uintptr_t relevance,
                            const Strides4& relevance_strides, uintptr_t indices,
                            const Strides4& indices_strides, uintptr_t out);

// The division a layer under a max pool makes at the pool's winners (max_pool_divided_relevance):
// `addend`, `factor` and `sign_reference` have the relevance's shape and strides; `denominator`
// is a contiguous (N, C, H, W) buffer of the pool's input size — or, with
// `denominator_at_outputs`, of the relevance's shape and strides (a denominator the pool's output
// gives: an ε layer's, whose output at a winner is the pool's); `denominator_bias` C values.
// Address 0: an absent operand.
struct WinnerDivision {
  uintptr_t addend = 0;
  uintptr_t factor = 0;
  uintptr_t sign_reference = 0;
  uintptr_t denominator = 0;
  uintptr_t denominator_bias = 0;
  bool denominator_at_outputs = false;
  double epsilon = 0;
};

// Winner takes all of shares: out[n, c, i] = sum over the outputs o with idx[n, c, o] = i, in
// raster order, of keep ? ((R[o] + a[o]) * f[o]) / stab(D + b[c], epsilon) : 0 with D = d[n, c, i]
// (d[o] with denominator_at_outputs), keep = stab != 0 and (no sign reference, or
// sign_reference[o] > 0); (R + a) * f is 0 where f is 0, and a = 0, f = 1, b = 0 where absent. The
// same arithmetic as stabilized_divide (elementwise.h) at the pool's output size with the
// denominator read at the winners, followed by max_pool_relevance: one pass instead of two or
// three (docs/ops.md). Throws std::out_of_range for an index outside the plane.
void max_pool_divided_relevance_cpu(DType dtype, const PlaneShape& shape, uintptr_t relevance,
                                    const Strides4& relevance_strides, uintptr_t indices,
                                    const Strides4& indices_strides,
                                    const WinnerDivision& division, uintptr_t out);

// z-rule: out = x * P^T (R / stab(P x, stabilizer)), P the average pooling.
void avg_pool2d_relevance_cpu(DType dtype, const PlaneShape& shape, const AvgPoolGeometry& geometry,
                              uintptr_t x, const Strides4& x_strides, uintptr_t relevance,
                              const Strides4& relevance_strides, double stabilizer, uintptr_t out);

void adaptive_avg_pool2d_relevance_cpu(DType dtype, const PlaneShape& shape, uintptr_t x,
                                       const Strides4& x_strides, uintptr_t relevance,
                                       const Strides4& relevance_strides, double stabilizer,
                                       uintptr_t out);

#ifdef RELPROP_WITH_CUDA
// CUDA launchers. `stream` is a cudaStream_t handle; `device` the CUDA device index.
// `workspace` is caller-allocated device memory: max_pool needs 4 int32, the average pools need
// batch * channels * out_h * out_w elements of float (float64 for DType::Float64).
// All throw std::runtime_error when no device is present or a launch fails.
int cuda_device_count();

// `known`: the winners' offset bounds where the caller knows them (a regular pool's geometry:
// every winner lies in its window), which spares the device pass that measures them; null to
// measure into `workspace` (4 int32). Bounds wider than the winners' cost scans, never results.
void max_pool_relevance_cuda(DType dtype, const PlaneShape& shape, uintptr_t relevance,
                             const Strides4& relevance_strides, uintptr_t indices,
                             const Strides4& indices_strides, uintptr_t out, uintptr_t workspace,
                             const OffsetBounds* known, uintptr_t stream, int device);

// As max_pool_divided_relevance_cpu, gathered as max_pool_relevance_cuda gathers (the same
// `workspace` and `known`); float16 and bfloat16 compute in float32 and round once per input.
void max_pool_divided_relevance_cuda(DType dtype, const PlaneShape& shape, uintptr_t relevance,
                                     const Strides4& relevance_strides, uintptr_t indices,
                                     const Strides4& indices_strides,
                                     const WinnerDivision& division, uintptr_t out,
                                     uintptr_t workspace, const OffsetBounds* known,
                                     uintptr_t stream, int device);

void avg_pool2d_relevance_cuda(DType dtype, const PlaneShape& shape,
                               const AvgPoolGeometry& geometry, uintptr_t x,
                               const Strides4& x_strides, uintptr_t relevance,
                               const Strides4& relevance_strides, double stabilizer, uintptr_t out,
                               uintptr_t workspace, uintptr_t stream, int device);

void adaptive_avg_pool2d_relevance_cuda(DType dtype, const PlaneShape& shape, uintptr_t x,
                                        const Strides4& x_strides, uintptr_t relevance,
                                        const Strides4& relevance_strides, double stabilizer,
                                        uintptr_t out, uintptr_t workspace, uintptr_t stream,
                                        int device);
#endif

}  // namespace relprop
