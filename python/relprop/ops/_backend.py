"""Which implementation of an op runs: the reference, the native CPU path, or Triton.

``RELPROP_BACKEND=reference|native|triton`` forces one path (tests and benchmarks use it);
unset, the fastest path available for the tensor's device is taken.
"""

from __future__ import annotations

import os

import torch

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


def triton_available() -> bool:
    """True when Triton imports and can run here (a CUDA device, or the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# Input channels per group up to which the fused Triton kernels beat cuDNN's composition on
# 16-bit data (measured on an H100, benchmarks/results/gpu.md): a first layer's 3 channels fill
# a tensor-core tile poorly in cuDNN's implicit GEMM too, and the fused kernel saves the passes
# over the large first-layer activations. Wider layers go to cuDNN, which wins there by 2-7x.
TRITON_MAX_CHANNELS_PER_GROUP = 4


def layer_backend(
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_per_group: int | None = None,
) -> str:
    """Backend for the linear and convolution relevance ops.

    ``RELPROP_BACKEND`` wins. On CPU it is the native path. On CUDA it is the native path too
    (cuDNN/cuBLAS for the products, the fused CUDA division, the lean saved tensors) except
    where the fused Triton kernels measured faster: 16-bit inputs with at most
    ``TRITON_MAX_CHANNELS_PER_GROUP`` input channels per group (a network's first layer).

    Parameters
    ----------
    device : torch.device
        Where the layer's tensors live.
    dtype : torch.dtype, optional
        Their dtype; unknown means not 16-bit.
    channels_per_group : int, optional
        Input features (linear) or input channels per group (convolution); unknown means many.
    """
    forced = forced_backend()
    if forced is not None:
        return forced
    if (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and channels_per_group is not None
        and channels_per_group <= TRITON_MAX_CHANNELS_PER_GROUP
        and triton_available()
    ):
        return "triton"
    return "native"
