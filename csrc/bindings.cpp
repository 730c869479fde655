// relprop._C: the pybind11 face of the native kernels.
//
// Every function takes data pointers as Python ints, shapes, element strides and dtype codes
// (relprop._native builds them from tensors), so the module does not link libtorch and works
// with any torch version. CUDA entry points exist only when nvcc compiled kernels/cuda/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "relprop/add_relu.h"
#include "relprop/bias_relu.h"
#include "relprop/cpu_isa.h"
#include "relprop/elementwise.h"
#include "relprop/paired_shares.h"
#include "relprop/pool.h"

namespace py = pybind11;

namespace relprop {
namespace {

using Pair = std::array<int64_t, 2>;
using Shape6 = std::array<int64_t, 6>;
using StrideList = std::array<int64_t, 4>;

Strides4 strides(const StrideList& s) { return {{s[0], s[1], s[2], s[3]}}; }

PlaneShape plane_shape(const Shape6& s) { return {s[0], s[1], s[2], s[3], s[4], s[5]}; }

#ifdef RELPROP_WITH_CUDA
// The max-pool CUDA entries' `offset_bounds`: the winners' offsets known on the host, or empty
// (the kernel measures them on the device, into its workspace).
std::optional<OffsetBounds> known_offset_bounds(const std::vector<int>& bounds) {
  if (bounds.empty()) return std::nullopt;
  if (bounds.size() != 4) {
    throw std::invalid_argument(
        "offset_bounds: [row_min, row_max, col_min, col_max] or empty (measured)");
  }
  return OffsetBounds{bounds[0], bounds[1], bounds[2], bounds[3]};
}
#endif

AvgPoolGeometry avg_geometry(const Pair& kernel, const Pair& stride, const Pair& padding,
                             bool count_include_pad, int64_t divisor_override) {
  return {kernel[0],  kernel[1],  stride[0],         stride[1],
          padding[0], padding[1], count_include_pad, divisor_override};
}

// zp's bias in paired shares: `channels` channels per sample of `inner` elements.
DenominatorBias channel_bias(uintptr_t values, int64_t channels, int64_t inner) {
  if (values != 0 && (channels <= 0 || inner % channels != 0)) {
    throw std::invalid_argument("paired_shares: zp_bias needs channels > 0 dividing inner, got " +
                                std::to_string(channels) + " channels of " +
                                std::to_string(inner));
  }
  return {values, values == 0 ? 1 : channels, values == 0 ? 1 : inner / channels};
}

SignMask sign_mask(int sign) {
  if (sign < -1 || sign > 1) {
    throw std::invalid_argument("stabilized_divide: sign must be -1, 0 or +1, got " +
                                std::to_string(sign));
  }
  return static_cast<SignMask>(sign);
}

constexpr const char* kStabilizedDivideDoc =
    "out = scale * ((numerator + numerator_addend) * factor) / stab(denominator, epsilon), "
    "stab(d, e) = d + e*(sign(d) + [d == 0]), 0 where stab is 0; numerator_addend = 0 (no "
    "address) adds nothing; factor = 0 (no address) takes the numerator as it is; denominator_bias = 0 (no address) adds nothing, else the denominator of element i is "
    "denominator[i] + denominator_bias[(i / inner) % channels]; sign = +1 / -1 keeps only "
    "entries with sign_reference > 0 / < 0 (0 "
    "elsewhere), sign = 0 ignores sign_reference. All buffers contiguous, numel elements; dtype: "
    "0 float32, 1 float64, 2 float16, 3 bfloat16 (CUDA only).";

constexpr const char* kMaxPoolDividedDoc =
    "out[n, c, i] = sum over o with indices[n, c, o] = i (raster order) of keep ? ((relevance[o] "
    "+ addend[o]) * factor[o]) / stab(D + denominator_bias[c], epsilon) : 0, D = "
    "denominator[n, c, i] (denominator[o] with denominator_at_outputs), keep = stab != 0 and "
    "sign_reference[o] > 0; addend, factor, sign_reference, denominator_bias = 0 (no address): "
    "absent. addend, factor and sign_reference (and the denominator at the outputs) have the "
    "relevance's shape and strides; out (and the denominator at the winners) are contiguous "
    "(N, C, H, W) of the pool's input size; dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 "
    "(CUDA only). On CUDA, workspace and offset_bounds as for max_pool_relevance_cuda. "
    "Deterministic (gather, no float atomics).";

constexpr const char* kPairedSharesDoc =
    "out[n, 0, j] = scale * R / stab(zp, epsilon), out[n, 1, j] = second_scale * R / "
    "stab(z_weight * z - zp, epsilon), each 0 where its stab is 0 and, with sign_masks, where "
    "z > 0 (first) / z < 0 (second) fails; R = relevance * factor (factor = 0: relevance alone); "
    "zp_bias = 0 (no address) adds nothing, else zp is zp + zp_bias[channel] for `channels` "
    "channels per sample; "
    "relevance, factor, z, zp are contiguous (samples, inner) buffers, out (samples, 2, inner); "
    "dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 (CUDA only).";

constexpr const char* kAddReluDoc =
    "out = relu(a + b) with relu(v) = 0 where v < 0 (NaN and -0 kept); a, b, out contiguous "
    "buffers of numel elements of one dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 (CUDA "
    "only; added in float32, rounded once).";

constexpr const char* kBiasReluDoc =
    "In place, z = relu(z + bias[channel]) with relu(v) = 0 where v < 0 (NaN and -0 kept): z is "
    "a contiguous (rows, inner) buffer whose row r is channel r % channels, bias a contiguous "
    "(channels,) buffer of z's dtype; dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 (CUDA "
    "only; added in float32, rounded once).";

constexpr const char* kShapeDoc =
    "shape = (N, C, H, W, OH, OW); strides are element strides of (N, C, H, W) views; "
    "dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16; out is a contiguous buffer.";

}  // namespace
}  // namespace relprop

PYBIND11_MODULE(_C, m) {
  using namespace relprop;
  m.doc() = "relprop native kernels (pointer interface, no libtorch linkage)";

  m.def(
      "cuda_compiled",
      []() {
#ifdef RELPROP_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels were compiled into this module.");

  m.def(
      "cuda_device_count",
      []() {
#ifdef RELPROP_WITH_CUDA
        return cuda_device_count();
#else
        return 0;
#endif
      },
      "Number of CUDA devices visible to the module's runtime (0 without a driver or GPU).");

  m.def(
      "cpu_isa", []() { return cpu_isa_name(cpu_isa()); },
      "The instruction set the CPU element-wise loops run with: 'avx2' or 'baseline'.");

  m.def(
      "cpu_isas",
      []() {
        py::list names;
        for (const CpuIsa isa : {CpuIsa::Baseline, CpuIsa::Avx2}) {
          if (cpu_isa_supported(isa)) names.append(cpu_isa_name(isa));
        }
        return names;
      },
      "The instruction sets this build and machine can run the CPU element-wise loops with.");

  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        for (const CpuIsa isa : {CpuIsa::Baseline, CpuIsa::Avx2}) {
          if (name == cpu_isa_name(isa)) return set_cpu_isa(isa);
        }
        throw std::invalid_argument("set_cpu_isa: unknown instruction set '" + name +
                                    "'; expected 'baseline' or 'avx2'");
      },
      py::arg("name"),
      "Run the CPU element-wise loops with this instruction set ('baseline' or 'avx2'; both give "
      "the same bits). Raises ValueError where the machine or build cannot.");

  const auto release_gil = py::call_guard<py::gil_scoped_release>();

  m.def(
      "max_pool_relevance_cpu",
      [](int dtype, const Shape6& shape, uintptr_t relevance, const StrideList& relevance_strides,
         uintptr_t indices, const StrideList& indices_strides, uintptr_t out) {
        max_pool_relevance_cpu(static_cast<DType>(dtype), plane_shape(shape), relevance,
                               strides(relevance_strides), indices, strides(indices_strides), out);
      },
      py::arg("dtype"), py::arg("shape"), py::arg("relevance"), py::arg("relevance_strides"),
      py::arg("indices"), py::arg("indices_strides"), py::arg("out"), release_gil, kShapeDoc);

  m.def(
      "max_pool_divided_relevance_cpu",
      [](int dtype, const Shape6& shape, uintptr_t relevance, const StrideList& relevance_strides,
         uintptr_t indices, const StrideList& indices_strides, uintptr_t addend, uintptr_t factor,
         uintptr_t sign_reference, uintptr_t denominator, uintptr_t denominator_bias,
         bool denominator_at_outputs, double epsilon, uintptr_t out) {
        max_pool_divided_relevance_cpu(
            static_cast<DType>(dtype), plane_shape(shape), relevance, strides(relevance_strides),
            indices, strides(indices_strides),
            WinnerDivision{addend, factor, sign_reference, denominator, denominator_bias,
                           denominator_at_outputs, epsilon},
            out);
      },
      py::arg("dtype"), py::arg("shape"), py::arg("relevance"), py::arg("relevance_strides"),
      py::arg("indices"), py::arg("indices_strides"), py::arg("addend"), py::arg("factor"),
      py::arg("sign_reference"), py::arg("denominator"), py::arg("denominator_bias"),
      py::arg("denominator_at_outputs"), py::arg("epsilon"), py::arg("out"), release_gil,
      kMaxPoolDividedDoc);

  m.def(
      "avg_pool2d_relevance_cpu",
      [](int dtype, const Shape6& shape, const Pair& kernel, const Pair& stride,
         const Pair& padding, bool count_include_pad, int64_t divisor_override, uintptr_t x,
         const StrideList& x_strides, uintptr_t relevance, const StrideList& relevance_strides,
         double stabilizer, uintptr_t out) {
        avg_pool2d_relevance_cpu(
            static_cast<DType>(dtype), plane_shape(shape),
            avg_geometry(kernel, stride, padding, count_include_pad, divisor_override), x,
            strides(x_strides), relevance, strides(relevance_strides), stabilizer, out);
      },
      py::arg("dtype"), py::arg("shape"), py::arg("kernel_size"), py::arg("stride"),
      py::arg("padding"), py::arg("count_include_pad"), py::arg("divisor_override"), py::arg("x"),
      py::arg("x_strides"), py::arg("relevance"), py::arg("relevance_strides"),
      py::arg("stabilizer"), py::arg("out"), release_gil, kShapeDoc);

  m.def(
      "adaptive_avg_pool2d_relevance_cpu",
      [](int dtype, const Shape6& shape, uintptr_t x, const StrideList& x_strides,
         uintptr_t relevance, const StrideList& relevance_strides, double stabilizer,
         uintptr_t out) {
        adaptive_avg_pool2d_relevance_cpu(static_cast<DType>(dtype), plane_shape(shape), x,
                                          strides(x_strides), relevance, strides(relevance_strides),
                                          stabilizer, out);
      },
      py::arg("dtype"), py::arg("shape"), py::arg("x"), py::arg("x_strides"), py::arg("relevance"),
      py::arg("relevance_strides"), py::arg("stabilizer"), py::arg("out"), release_gil, kShapeDoc);

  m.def(
      "stabilized_divide_cpu",
      [](int dtype, int64_t numel, uintptr_t numerator, uintptr_t numerator_addend,
         uintptr_t factor, uintptr_t denominator, uintptr_t denominator_bias, int64_t channels,
         int64_t inner, double epsilon, double scale, uintptr_t sign_reference, int sign,
         uintptr_t out) {
        const DivideBuffers buffers{numerator, numerator_addend, factor, denominator,
                                    {denominator_bias, channels, inner}, sign_reference, out};
        stabilized_divide_cpu(static_cast<DType>(dtype), numel, buffers, epsilon, scale,
                              sign_mask(sign));
      },
      py::arg("dtype"), py::arg("numel"), py::arg("numerator"), py::arg("numerator_addend"),
      py::arg("factor"), py::arg("denominator"), py::arg("denominator_bias"), py::arg("channels"),
      py::arg("inner"), py::arg("epsilon"), py::arg("scale"), py::arg("sign_reference"),
      py::arg("sign"), py::arg("out"), release_gil, kStabilizedDivideDoc);

  m.def(
      "paired_shares_cpu",
      [](int dtype, int64_t samples, int64_t inner, uintptr_t relevance, uintptr_t factor,
         uintptr_t z, uintptr_t zp, uintptr_t zp_bias, int64_t channels, double epsilon,
         double scale, double second_scale, double z_weight, bool sign_masks, uintptr_t out) {
        paired_shares_cpu(static_cast<DType>(dtype), samples, inner, relevance, factor, z, zp,
                          channel_bias(zp_bias, channels, inner),
                          {epsilon, scale, second_scale, z_weight, sign_masks}, out);
      },
      py::arg("dtype"), py::arg("samples"), py::arg("inner"), py::arg("relevance"),
      py::arg("factor"), py::arg("z"), py::arg("zp"), py::arg("zp_bias"), py::arg("channels"),
      py::arg("epsilon"), py::arg("scale"), py::arg("second_scale"), py::arg("z_weight"),
      py::arg("sign_masks"), py::arg("out"), release_gil, kPairedSharesDoc);

  m.def(
      "add_relu_cpu",
      [](int dtype, int64_t numel, uintptr_t a, uintptr_t b, uintptr_t out) {
        add_relu_cpu(static_cast<DType>(dtype), numel, a, b, out);
      },
      py::arg("dtype"), py::arg("numel"), py::arg("a"), py::arg("b"), py::arg("out"), release_gil,
      kAddReluDoc);

  m.def(
      "bias_relu_cpu",
      [](int dtype, int64_t rows, int64_t channels, int64_t inner, uintptr_t z, uintptr_t bias) {
        bias_relu_cpu(static_cast<DType>(dtype), rows, channels, inner, z, bias);
      },
      py::arg("dtype"), py::arg("rows"), py::arg("channels"), py::arg("inner"), py::arg("z"),
      py::arg("bias"), release_gil, kBiasReluDoc);

#ifdef RELPROP_WITH_CUDA
  m.def(
      "add_relu_cuda",
      [](int dtype, int64_t numel, uintptr_t a, uintptr_t b, uintptr_t out, uintptr_t stream,
         int device) { add_relu_cuda(static_cast<DType>(dtype), numel, a, b, out, stream, device); },
      py::arg("dtype"), py::arg("numel"), py::arg("a"), py::arg("b"), py::arg("out"),
      py::arg("stream"), py::arg("device"), release_gil, kAddReluDoc);

  m.def(
      "bias_relu_cuda",
      [](int dtype, int64_t rows, int64_t channels, int64_t inner, uintptr_t z, uintptr_t bias,
         uintptr_t stream, int device) {
        bias_relu_cuda(static_cast<DType>(dtype), rows, channels, inner, z, bias, stream, device);
      },
      py::arg("dtype"), py::arg("rows"), py::arg("channels"), py::arg("inner"), py::arg("z"),
      py::arg("bias"), py::arg("stream"), py::arg("device"), release_gil, kBiasReluDoc);

  m.def(
      "paired_shares_cuda",
      [](int dtype, int64_t samples, int64_t inner, uintptr_t relevance, uintptr_t factor,
         uintptr_t z, uintptr_t zp, uintptr_t zp_bias, int64_t channels, double epsilon,
         double scale, double second_scale, double z_weight, bool sign_masks, uintptr_t out,
         uintptr_t stream, int device) {
        paired_shares_cuda(static_cast<DType>(dtype), samples, inner, relevance, factor, z, zp,
                           channel_bias(zp_bias, channels, inner),
                           {epsilon, scale, second_scale, z_weight, sign_masks}, out, stream,
                           device);
      },
      py::arg("dtype"), py::arg("samples"), py::arg("inner"), py::arg("relevance"),
      py::arg("factor"), py::arg("z"), py::arg("zp"), py::arg("zp_bias"), py::arg("channels"),
      py::arg("epsilon"), py::arg("scale"), py::arg("second_scale"), py::arg("z_weight"),
      py::arg("sign_masks"), py::arg("out"), py::arg("stream"), py::arg("device"), release_gil,
      kPairedSharesDoc);

  m.def(
      "stabilized_divide_cuda",
      [](int dtype, int64_t numel, uintptr_t numerator, uintptr_t numerator_addend,
         uintptr_t factor, uintptr_t denominator, uintptr_t denominator_bias, int64_t channels,
         int64_t inner, double epsilon, double scale, uintptr_t sign_reference, int sign,
         uintptr_t out, uintptr_t stream, int device) {
        const DivideBuffers buffers{numerator, numerator_addend, factor, denominator,
                                    {denominator_bias, channels, inner}, sign_reference, out};
        stabilized_divide_cuda(static_cast<DType>(dtype), numel, buffers, epsilon, scale,
                               sign_mask(sign), stream, device);
      },
      py::arg("dtype"), py::arg("numel"), py::arg("numerator"), py::arg("numerator_addend"),
      py::arg("factor"), py::arg("denominator"), py::arg("denominator_bias"), py::arg("channels"),
      py::arg("inner"), py::arg("epsilon"), py::arg("scale"), py::arg("sign_reference"),
      py::arg("sign"), py::arg("out"), py::arg("stream"), py::arg("device"), release_gil,
      kStabilizedDivideDoc);

  m.def(
      "max_pool_divided_relevance_cuda",
      [](int dtype, const Shape6& shape, uintptr_t relevance, const StrideList& relevance_strides,
         uintptr_t indices, const StrideList& indices_strides, uintptr_t addend, uintptr_t factor,
         uintptr_t sign_reference, uintptr_t denominator, uintptr_t denominator_bias,
         bool denominator_at_outputs, double epsilon, uintptr_t out, uintptr_t workspace,
         const std::vector<int>& offset_bounds, uintptr_t stream, int device) {
        const std::optional<OffsetBounds> known = known_offset_bounds(offset_bounds);
        max_pool_divided_relevance_cuda(
            static_cast<DType>(dtype), plane_shape(shape), relevance, strides(relevance_strides),
            indices, strides(indices_strides),
            WinnerDivision{addend, factor, sign_reference, denominator, denominator_bias,
                           denominator_at_outputs, epsilon},
            out, workspace, known ? &*known : nullptr, stream, device);
      },
      py::arg("dtype"), py::arg("shape"), py::arg("relevance"), py::arg("relevance_strides"),
      py::arg("indices"), py::arg("indices_strides"), py::arg("addend"), py::arg("factor"),
      py::arg("sign_reference"), py::arg("denominator"), py::arg("denominator_bias"),
      py::arg("denominator_at_outputs"), py::arg("epsilon"), py::arg("out"), py::arg("workspace"),
      py::arg("offset_bounds"), py::arg("stream"), py::arg("device"), release_gil,
      kMaxPoolDividedDoc);

  m.def(
      "max_pool_relevance_cuda",
      [](int dtype, const Shape6& shape, uintptr_t relevance, const StrideList& relevance_strides,
         uintptr_t indices, const StrideList& indices_strides, uintptr_t out, uintptr_t workspace,
         const std::vector<int>& offset_bounds, uintptr_t stream, int device) {
        const std::optional<OffsetBounds> known = known_offset_bounds(offset_bounds);
        max_pool_relevance_cuda(static_cast<DType>(dtype), plane_shape(shape), relevance,
                                strides(relevance_strides), indices, strides(indices_strides), out,
                                workspace, known ? &*known : nullptr, stream,
                                device);
      },
      py::arg("dtype"), py::arg("shape"), py::arg("relevance"), py::arg("relevance_strides"),
      py::arg("indices"), py::arg("indices_strides"), py::arg("out"), py::arg("workspace"),
      py::arg("offset_bounds"), py::arg("stream"), py::arg("device"), release_gil,
      "workspace: 4 int32 on the device, where offset_bounds is empty (measured there); "
      "offset_bounds: the winners' [row_min, row_max, col_min, col_max] offsets from their "
      "outputs' nominal positions, known from a regular pool's geometry. Deterministic (gather, "
      "no float atomics).");

  m.def(
      "avg_pool2d_relevance_cuda",
      [](int dtype, const Shape6& shape, const Pair& kernel, const Pair& stride,
         const Pair& padding, bool count_include_pad, int64_t divisor_override, uintptr_t x,
         const StrideList& x_strides, uintptr_t relevance, const StrideList& relevance_strides,
         double stabilizer, uintptr_t out, uintptr_t workspace, uintptr_t stream, int device) {
        avg_pool2d_relevance_cuda(
            static_cast<DType>(dtype), plane_shape(shape),
            avg_geometry(kernel, stride, padding, count_include_pad, divisor_override), x,
            strides(x_strides), relevance, strides(relevance_strides), stabilizer, out, workspace,
            stream, device);
      },
      py::arg("dtype"), py::arg("shape"), py::arg("kernel_size"), py::arg("stride"),
      py::arg("padding"), py::arg("count_include_pad"), py::arg("divisor_override"), py::arg("x"),
      py::arg("x_strides"), py::arg("relevance"), py::arg("relevance_strides"),
      py::arg("stabilizer"), py::arg("out"), py::arg("workspace"), py::arg("stream"),
      py::arg("device"), release_gil,
      "workspace: N*C*OH*OW float32 (float64 for float64 inputs) on the device.");

  m.def(
      "adaptive_avg_pool2d_relevance_cuda",
      [](int dtype, const Shape6& shape, uintptr_t x, const StrideList& x_strides,
         uintptr_t relevance, const StrideList& relevance_strides, double stabilizer, uintptr_t out,
         uintptr_t workspace, uintptr_t stream, int device) {
        adaptive_avg_pool2d_relevance_cuda(
            static_cast<DType>(dtype), plane_shape(shape), x, strides(x_strides), relevance,
            strides(relevance_strides), stabilizer, out, workspace, stream, device);
      },
      py::arg("dtype"), py::arg("shape"), py::arg("x"), py::arg("x_strides"), py::arg("relevance"),
      py::arg("relevance_strides"), py::arg("stabilizer"), py::arg("out"), py::arg("workspace"),
      py::arg("stream"), py::arg("device"), release_gil,
      "workspace: N*C*OH*OW float32 (float64 for float64 inputs) on the device.");
#endif
}
