// CPU twins of the pooling relevance kernels (kernels/cuda/pool.cu).
//
// One OpenMP thread owns one (n, c) plane and takes every sum in a fixed order (outputs in raster
// order), so results are bitwise reproducible whatever the thread count.
#include "relprop/pool.h"

#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "relprop/elementwise.h"
#include "relprop/pool_geometry.h"

namespace relprop {
namespace {

template <typename T>
void max_pool_relevance_impl(const PlaneShape& s, const T* relevance, const Strides4& rs,
                             const int64_t* indices, const Strides4& is, T* out) {
  const int64_t planes = s.batch * s.channels;
  const int64_t in_numel = s.in_h * s.in_w;
  std::atomic<bool> out_of_range{false};
#pragma omp parallel for schedule(static)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const int64_t n = plane / s.channels, c = plane % s.channels;
    T* out_plane = out + plane * in_numel;
    for (int64_t i = 0; i < in_numel; ++i) out_plane[i] = T(0);
    const T* r = relevance + n * rs[0] + c * rs[1];
    const int64_t* idx = indices + n * is[0] + c * is[1];
    for (int64_t oh = 0; oh < s.out_h; ++oh) {
      for (int64_t ow = 0; ow < s.out_w; ++ow) {
        const int64_t winner = idx[oh * is[2] + ow * is[3]];
        if (winner < 0 || winner >= in_numel) {
          out_of_range.store(true, std::memory_order_relaxed);
          continue;
        }
        out_plane[winner] += r[oh * rs[2] + ow * rs[3]];
      }
    }
  }
  if (out_of_range.load()) {
    throw std::out_of_range("max_pool_relevance: an index lies outside the input plane of " +
                            std::to_string(in_numel) + " elements");
  }
}

// The division of the layer under the pool at its winners, spread (pool.h), in two passes per
// plane: each output's share computed as stabilized_divide's CPU twin computes it
// (csrc/cpu/elementwise.cpp, scale 1) into a buffer — a loop the compiler vectorises (the
// divisions are most of the work) — then added to its winner in raster order as
// max_pool_relevance_impl adds relevance: the same bits as the two ops one after the other.
template <typename T>
void max_pool_divided_relevance_impl(const PlaneShape& s, const T* relevance, const Strides4& rs,
                                     const int64_t* indices, const Strides4& is,
                                     const WinnerDivision& w, T* out) {
  const int64_t planes = s.batch * s.channels;
  const int64_t in_numel = s.in_h * s.in_w;
  const T* addend = reinterpret_cast<const T*>(w.addend);
  const T* factor = reinterpret_cast<const T*>(w.factor);
  const T* reference = reinterpret_cast<const T*>(w.sign_reference);
  const T* denominator = reinterpret_cast<const T*>(w.denominator);
  const T* bias = reinterpret_cast<const T*>(w.denominator_bias);
  const bool at_outputs = w.denominator_at_outputs;
  const T epsilon = static_cast<T>(w.epsilon);
  std::atomic<bool> out_of_range{false};
#pragma omp parallel
  {
    std::vector<T> shares(static_cast<size_t>(s.out_w));
#pragma omp for schedule(static)
    for (int64_t plane = 0; plane < planes; ++plane) {
      const int64_t n = plane / s.channels, c = plane % s.channels;
      T* out_plane = out + plane * in_numel;
      for (int64_t i = 0; i < in_numel; ++i) out_plane[i] = T(0);
      // The denominator at the winners (the pool's input size), or at the outputs.
      const T* d = at_outputs ? denominator : denominator + plane * in_numel;
      const T shift = bias != nullptr ? bias[c] : T(0);
      const int64_t first = n * rs[0] + c * rs[1];
      const int64_t* idx = indices + n * is[0] + c * is[1];
      T* share = shares.data();
      for (int64_t oh = 0; oh < s.out_h; ++oh) {
        const int64_t* row_idx = idx + oh * is[2];
        bool row_in_range = true;
        for (int64_t ow = 0; ow < s.out_w; ++ow) {
          const int64_t winner = row_idx[ow * is[3]];
          row_in_range = row_in_range && winner >= 0 && winner < in_numel;
        }
        if (!row_in_range) {
          out_of_range.store(true, std::memory_order_relaxed);
          continue;
        }
        const int64_t row = first + oh * rs[2];
#pragma omp simd
        for (int64_t ow = 0; ow < s.out_w; ++ow) {
          const int64_t o = row + ow * rs[3];
          const T value = at_outputs ? d[o] : d[row_idx[ow * is[3]]];
          const T stabilized = stabilize_denominator(bias != nullptr ? value + shift : value,
                                                     epsilon);
          const T sum = addend != nullptr ? relevance[o] + addend[o] : relevance[o];
          const T numerator = factor == nullptr ? sum
                              : factor[o] == T(0) ? T(0)
                                                  : sum * factor[o];
          const T quotient = (T(1) * numerator) / stabilized;
          // `&`, not `&&`: a short-circuit would make the reference load conditional.
          bool keep = stabilized != T(0);
          if (reference != nullptr) keep = keep & (reference[o] > T(0));
          share[ow] = keep ? quotient : T(0);
        }
        for (int64_t ow = 0; ow < s.out_w; ++ow) out_plane[row_idx[ow * is[3]]] += share[ow];
      }
    }
  }
  if (out_of_range.load()) {
    throw std::out_of_range("max_pool_divided_relevance: an index lies outside the input plane of " +
                            std::to_string(in_numel) + " elements");
  }
}

// Both average pools, in the two passes of the CUDA kernels: per output, share = R / stab(z, e) /
// divisor with z = P x; per input, x times the sum of the shares of the windows holding it (the
// outputs in raster order, as the GPU gathers them).
template <typename T, typename Windows>
void avg_relevance_impl(const PlaneShape& s, const Windows& windows, const T* x, const Strides4& xs,
                        const T* relevance, const Strides4& rs, T stabilizer, T* out) {
  const int64_t planes = s.batch * s.channels;
  const int64_t in_numel = s.in_h * s.in_w;
  // The axes are independent and the same in every plane: tabulate them once.
  std::vector<AxisWindow> rows(s.out_h), cols(s.out_w);
  for (int64_t oh = 0; oh < s.out_h; ++oh) rows[oh] = windows.rows(s, oh);
  for (int64_t ow = 0; ow < s.out_w; ++ow) cols[ow] = windows.cols(s, ow);
  std::vector<int64_t> row_first(s.in_h), row_last(s.in_h), col_first(s.in_w), col_last(s.in_w);
  for (int64_t ih = 0; ih < s.in_h; ++ih)
    windows.inverse_rows(s, ih, &row_first[ih], &row_last[ih]);
  for (int64_t iw = 0; iw < s.in_w; ++iw)
    windows.inverse_cols(s, iw, &col_first[iw], &col_last[iw]);
#pragma omp parallel
  {
    std::vector<T> share(static_cast<size_t>(s.out_h * s.out_w));
#pragma omp for schedule(static)
    for (int64_t plane = 0; plane < planes; ++plane) {
      const int64_t n = plane / s.channels, c = plane % s.channels;
      const T* xp = x + n * xs[0] + c * xs[1];
      const T* r = relevance + n * rs[0] + c * rs[1];
      for (int64_t oh = 0; oh < s.out_h; ++oh) {
        const AxisWindow& wh = rows[oh];
        for (int64_t ow = 0; ow < s.out_w; ++ow) {
          const AxisWindow& ww = cols[ow];
          T sum = T(0);
          for (int64_t ih = wh.start; ih < wh.end; ++ih) {
            for (int64_t iw = ww.start; iw < ww.end; ++iw) sum += xp[ih * xs[2] + iw * xs[3]];
          }
          const T divisor = T(windows.divisor(wh, ww));
          share[oh * s.out_w + ow] =
              stabilized_ratio(r[oh * rs[2] + ow * rs[3]], sum / divisor, stabilizer) / divisor;
        }
      }
      T* out_plane = out + plane * in_numel;
      for (int64_t ih = 0; ih < s.in_h; ++ih) {
        for (int64_t iw = 0; iw < s.in_w; ++iw) {
          T acc = T(0);
          for (int64_t oh = row_first[ih]; oh <= row_last[ih]; ++oh) {
            for (int64_t ow = col_first[iw]; ow <= col_last[iw]; ++ow) {
              acc += share[oh * s.out_w + ow];
            }
          }
          out_plane[ih * s.in_w + iw] = acc * xp[ih * xs[2] + iw * xs[3]];
        }
      }
    }
  }
}

[[noreturn]] void unsupported_dtype(const char* op, DType dtype) {
  throw std::invalid_argument(std::string(op) + ": the CPU kernel takes float32 or float64, got " +
                              "dtype code " + std::to_string(static_cast<int>(dtype)));
}

}  // namespace

void max_pool_relevance_cpu(DType dtype, const PlaneShape& shape, uintptr_t relevance,
                            const Strides4& relevance_strides, uintptr_t indices,
                            const Strides4& indices_strides, uintptr_t out) {
  const auto* idx = reinterpret_cast<const int64_t*>(indices);
  switch (dtype) {
    case DType::Float32:
      return max_pool_relevance_impl(shape, reinterpret_cast<const float*>(relevance),
                                     relevance_strides, idx, indices_strides,
                                     reinterpret_cast<float*>(out));
    case DType::Float64:
      return max_pool_relevance_impl(shape, reinterpret_cast<const double*>(relevance),
                                     relevance_strides, idx, indices_strides,
                                     reinterpret_cast<double*>(out));
    default:
      unsupported_dtype("max_pool_relevance", dtype);
  }
}

void max_pool_divided_relevance_cpu(DType dtype, const PlaneShape& shape, uintptr_t relevance,
                                    const Strides4& relevance_strides, uintptr_t indices,
                                    const Strides4& indices_strides,
                                    const WinnerDivision& division, uintptr_t out) {
  const auto* idx = reinterpret_cast<const int64_t*>(indices);
  switch (dtype) {
    case DType::Float32:
      return max_pool_divided_relevance_impl(shape, reinterpret_cast<const float*>(relevance),
                                             relevance_strides, idx, indices_strides, division,
                                             reinterpret_cast<float*>(out));
    case DType::Float64:
      return max_pool_divided_relevance_impl(shape, reinterpret_cast<const double*>(relevance),
                                             relevance_strides, idx, indices_strides, division,
                                             reinterpret_cast<double*>(out));
    default:
      unsupported_dtype("max_pool_divided_relevance", dtype);
  }
}

void avg_pool2d_relevance_cpu(DType dtype, const PlaneShape& shape, const AvgPoolGeometry& geometry,
                              uintptr_t x, const Strides4& x_strides, uintptr_t relevance,
                              const Strides4& relevance_strides, double stabilizer, uintptr_t out) {
  switch (dtype) {
    case DType::Float32:
      return avg_relevance_impl(shape, AvgPoolWindows{geometry}, reinterpret_cast<const float*>(x),
                                x_strides, reinterpret_cast<const float*>(relevance),
                                relevance_strides, static_cast<float>(stabilizer),
                                reinterpret_cast<float*>(out));
    case DType::Float64:
      return avg_relevance_impl(shape, AvgPoolWindows{geometry}, reinterpret_cast<const double*>(x),
                                x_strides, reinterpret_cast<const double*>(relevance),
                                relevance_strides, stabilizer, reinterpret_cast<double*>(out));
    default:
      unsupported_dtype("avg_pool2d_relevance", dtype);
  }
}

void adaptive_avg_pool2d_relevance_cpu(DType dtype, const PlaneShape& shape, uintptr_t x,
                                       const Strides4& x_strides, uintptr_t relevance,
                                       const Strides4& relevance_strides, double stabilizer,
                                       uintptr_t out) {
  switch (dtype) {
    case DType::Float32:
      return avg_relevance_impl(shape, AdaptiveAvgPoolWindows{}, reinterpret_cast<const float*>(x),
                                x_strides, reinterpret_cast<const float*>(relevance),
                                relevance_strides, static_cast<float>(stabilizer),
                                reinterpret_cast<float*>(out));
    case DType::Float64:
      return avg_relevance_impl(shape, AdaptiveAvgPoolWindows{}, reinterpret_cast<const double*>(x),
                                x_strides, reinterpret_cast<const double*>(relevance),
                                relevance_strides, stabilizer, reinterpret_cast<double*>(out));
    default:
      unsupported_dtype("adaptive_avg_pool2d_relevance", dtype);
  }
}

}  // namespace relprop
