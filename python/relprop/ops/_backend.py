"""Which implementation of an op runs: the reference, the native path, or Triton.

``RELPROP_BACKEND=reference|native|triton`` forces one path (tests and benchmarks use it);
unset, the path measured fastest is taken: native on CPU (MKL-DNN products, the C++ division)
and on CUDA (cuDNN/cuBLAS products, the CUDA division).
"""

from __future__ import annotations

import os

BACKENDS = ("reference", "native", "triton")


def forced_backend() -> str | None:
    """The backend named by ``RELPROP_BACKEND``, or None when unset."""
    value = os.environ.get("RELPROP_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"RELPROP_BACKEND={value!r} is not one of {', '.join(BACKENDS)}; unset it to let "
            "relprop choose"
        )
    return value


def layer_backend() -> str:
    """Backend for the linear and convolution relevance ops, on every device.

    ``RELPROP_BACKEND`` wins. Otherwise the native path, on CPU and on CUDA alike: there it is
    cuDNN/cuBLAS for the products, the fused CUDA division and the lean saved tensors. The fused
    Triton kernels stay available as ``RELPROP_BACKEND=triton``; on an H100 they lost to that
    composition at every whole-model setting measured and at all but a few layer shapes
    (``benchmarks/results/gpu_h100.md``), so nothing picks them by default.
    """
    return forced_backend() or "native"
