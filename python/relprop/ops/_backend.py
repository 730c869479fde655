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


def layer_backend(device: torch.device) -> str:
    """Backend for the linear and convolution relevance ops on ``device``."""
    forced = forced_backend()
    if forced is not None:
        return forced
    if device.type == "cuda" and triton_available():
        return "triton"
    return "native"
