// Window arithmetic shared by the CPU and CUDA pooling kernels (host and device code).
#pragma once

#include <cstdint>

#include "relprop/pool.h"

namespace relprop {

// For b > 0, in any signed integer type (the CUDA max-pool gather runs in int where it fits).
template <typename I>
RELPROP_HD I floor_div(I a, I b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

template <typename I>
RELPROP_HD I ceil_div(I a, I b) {
  return -floor_div<I>(-a, b);
}

RELPROP_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
RELPROP_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// stab(d, e) = d + e * (sign(d) + [d == 0]): zero counts as positive (docs/ops.md).
template <typename T>
RELPROP_HD T stabilize(T d, T e) {
  return d >= T(0) ? d + e : d - e;
}

// r / stab(d, e), with 0 where the stabilised denominator is 0 (only possible for e = 0), as the
// reference's rules.divide does.
template <typename T>
RELPROP_HD T stabilized_ratio(T r, T d, T e) {
  const T denominator = stabilize(d, e);
  return denominator == T(0) ? T(0) : r / denominator;
}

// One axis of a pooling window: inputs [start, end) are summed; `padded_size` is the extent that
// count_include_pad divides by.
struct AxisWindow {
  int64_t start, end, padded_size;
};

// One axis of avg_pool2d's window of output `o`, as ATen computes it: clipped to the padded
// extent for the count_include_pad divisor, then to the image for summation.
RELPROP_HD AxisWindow avg_window(int64_t o, int64_t in_size, int64_t kernel, int64_t stride,
                                 int64_t pad) {
  int64_t start = o * stride - pad;
  int64_t end = min64(start + kernel, in_size + pad);
  const int64_t padded_size = end - start;
  start = max64(start, 0);
  end = min64(end, in_size);
  return {start, end, padded_size};
}

// The outputs [*first, *last] whose avg_pool window [o*stride - pad, o*stride - pad + kernel)
// holds input `i`.
RELPROP_HD void avg_window_inverse(int64_t i, int64_t out_size, int64_t kernel, int64_t stride,
                                   int64_t pad, int64_t* first, int64_t* last) {
  *first = max64(ceil_div(i + pad - kernel + 1, stride), 0);
  *last = min64(floor_div(i + pad, stride), out_size - 1);
}

// One axis of adaptive_avg_pool2d's window of output `o`: [floor(o*in/out), ceil((o+1)*in/out)).
RELPROP_HD AxisWindow adaptive_window(int64_t o, int64_t in_size, int64_t out_size) {
  const int64_t start = (o * in_size) / out_size;
  const int64_t end = ((o + 1) * in_size + out_size - 1) / out_size;
  return {start, end, end - start};
}

// The outputs [*first, *last] whose adaptive window holds input `i`.
RELPROP_HD void adaptive_window_inverse(int64_t i, int64_t in_size, int64_t out_size,
                                        int64_t* first, int64_t* last) {
  *first = (i * out_size) / in_size;
  *last = min64(ceil_div((i + 1) * out_size, in_size) - 1, out_size - 1);
}

// The windows of a pooling per axis, forwards (output -> summed inputs, divisor) and backwards
// (input -> the outputs whose windows hold it). Both axes are independent, so the CPU kernels
// tabulate them once per call; the CUDA kernels evaluate them per thread.
struct AvgPoolWindows {
  AvgPoolGeometry g;
  RELPROP_HD AxisWindow rows(const PlaneShape& s, int64_t oh) const {
    return avg_window(oh, s.in_h, g.kernel_h, g.stride_h, g.pad_h);
  }
  RELPROP_HD AxisWindow cols(const PlaneShape& s, int64_t ow) const {
    return avg_window(ow, s.in_w, g.kernel_w, g.stride_w, g.pad_w);
  }
  RELPROP_HD int64_t divisor(const AxisWindow& h, const AxisWindow& w) const {
    if (g.divisor_override > 0) return g.divisor_override;
    if (g.count_include_pad) return h.padded_size * w.padded_size;
    return (h.end - h.start) * (w.end - w.start);
  }
  RELPROP_HD void inverse_rows(const PlaneShape& s, int64_t ih, int64_t* first,
                               int64_t* last) const {
    avg_window_inverse(ih, s.out_h, g.kernel_h, g.stride_h, g.pad_h, first, last);
  }
  RELPROP_HD void inverse_cols(const PlaneShape& s, int64_t iw, int64_t* first,
                               int64_t* last) const {
    avg_window_inverse(iw, s.out_w, g.kernel_w, g.stride_w, g.pad_w, first, last);
  }
};

struct AdaptiveAvgPoolWindows {
  RELPROP_HD AxisWindow rows(const PlaneShape& s, int64_t oh) const {
    return adaptive_window(oh, s.in_h, s.out_h);
  }
  RELPROP_HD AxisWindow cols(const PlaneShape& s, int64_t ow) const {
    return adaptive_window(ow, s.in_w, s.out_w);
  }
  RELPROP_HD int64_t divisor(const AxisWindow& h, const AxisWindow& w) const {
    return (h.end - h.start) * (w.end - w.start);
  }
  RELPROP_HD void inverse_rows(const PlaneShape& s, int64_t ih, int64_t* first,
                               int64_t* last) const {
    adaptive_window_inverse(ih, s.in_h, s.out_h, first, last);
  }
  RELPROP_HD void inverse_cols(const PlaneShape& s, int64_t iw, int64_t* first,
                               int64_t* last) const {
    adaptive_window_inverse(iw, s.in_w, s.out_w, first, last);
  }
};

}  // namespace relprop
