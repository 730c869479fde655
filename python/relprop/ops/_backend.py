"""Which implementation of an op runs: the reference, the native path, or Triton.

``RELPROP_BACKEND=reference|native|triton`` forces one path (tests and benchmarks use it);
unset, the path measured fastest is taken: native on CPU (MKL-DNN products, the C++ division)
and on CUDA (cuDNN/cuBLAS products, the CUDA division).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

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


def layer_backend() -> str:
    """Backend for the linear and convolution relevance ops, on every device.

    ``RELPROP_BACKEND`` wins. Otherwise the native path, on CPU and on CUDA alike: there it is
    cuDNN/cuBLAS for the products, the fused CUDA division and the lean saved tensors. The fused
    Triton kernels stay available as ``RELPROP_BACKEND=triton``; on an H100 they lost to that
    composition at every whole-model setting measured and at all but a few layer shapes
    (``benchmarks/results/gpu_h100.md``), so nothing picks them by default.
    """
    return forced_backend() or "native"


# Types whose tensors a kernel can take as they are; a subclass (FakeTensor, FunctionalTensor)
# means something is tracing and needs the op itself.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    # A TorchDispatchMode (fake tensors, FLOP counters, make_fx) must see the op.
    return torch._C._len_torch_dispatch_stack() > 0


def call_op(op: Callable[..., Any], kernel: Callable[..., Any], *args: Any) -> Any:
    """``op(*args)``, or, in plain eager mode, its ``cpu``/``cuda`` kernel called directly.

    A ``torch.library`` custom op costs about 50 µs of host time per call before its kernel
    runs (schema checks, dispatch keys, the autograd wrapper): with three such calls per layer,
    ResNet50 spent ~10 ms of host time per analysis in the dispatcher, which on a GPU is time the
    device may wait. Where nothing needs the dispatcher — no torch.compile, no dispatch mode, plain
    tensors on a CPU or CUDA device, no autograd (the engine runs under ``no_grad``) — the
    registered kernel is called as a function; otherwise the op is.
    """
    if _tracing() or torch.is_grad_enabled():
        return op(*args)
    # The first argument (the layer input, the numerator) stands for the rest: an op's tensors
    # share one device, and a tracing subclass comes with a dispatch mode or torch.compile.
    first = args[0]
    if type(first) not in _PLAIN_TENSOR_TYPES or first.device.type not in ("cpu", "cuda"):
        return op(*args)
    if torch.autograd.profiler._is_profiler_enabled:
        # The dispatcher is what names a custom op in a profile; called as a function, the
        # kernel gets the op's name from a record of its own so profiles still show it.
        with torch.profiler.record_function(_op_name(op)):
            return kernel(*args)
    return kernel(*args)


def _op_name(op: Callable[..., Any]) -> str:
    return getattr(op, "_qualname", None) or getattr(op, "__name__", None) or repr(op)
