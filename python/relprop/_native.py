"""Loader of the compiled module ``relprop._C`` and the tensor-to-pointer helpers it needs.

``relprop._C`` is optional at import time: when it is missing (a source checkout without a build,
a failed compile) every op runs its plain-PyTorch reference and this module warns once. The test
suite refuses that silent fallback unless ``RELPROP_ALLOW_NO_NATIVE=1`` is set, so a broken build
cannot hide behind it.
"""

from __future__ import annotations

import os
import warnings
from contextvars import ContextVar, Token
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

try:
    from relprop import _C as _module
except ImportError as error:  # the reference path takes over; see native_error()
    _module: ModuleType | None = None
    _error: str | None = f"{type(error).__name__}: {error}"
else:
    _error = None

_warned = False

# dtype codes of relprop._C (csrc/include/relprop/pool.h)
DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
}
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def native_available() -> bool:
    """True when the compiled module ``relprop._C`` was imported."""
    return _module is not None


def native_error() -> str | None:
    """Why ``relprop._C`` failed to import, or None when it loaded."""
    return _error


def cuda_compiled() -> bool:
    """True when ``relprop._C`` holds the CUDA kernels (nvcc was found at build time)."""
    return _module is not None and bool(_module.cuda_compiled())


def cpu_isa() -> str | None:
    """The instruction set the CPU twins' element-wise loops run with (``'avx2'`` where the
    machine has it, else ``'baseline'``), or None without ``relprop._C``. Both give bitwise the
    same results; csrc/include/relprop/cpu_isa.h says why there are two."""
    return None if _module is None else str(_module.cpu_isa())


def native() -> ModuleType:
    """The compiled module; raises RuntimeError naming the import failure when it is missing."""
    if _module is None:
        raise RuntimeError(
            f"relprop._C is not available ({_error}); rebuild with `pip install -e .` or set "
            "RELPROP_BACKEND=reference"
        )
    return _module


def warn_fallback(reason: str) -> None:
    """Warn once per process that an op runs its reference instead of the native kernel."""
    global _warned
    if _warned or os.environ.get("RELPROP_ALLOW_NO_NATIVE") == "1":
        return
    _warned = True
    warnings.warn(
        f"relprop: {reason}; falling back to the plain-PyTorch reference implementations "
        "(set RELPROP_ALLOW_NO_NATIVE=1 to silence this)",
        RuntimeWarning,
        stacklevel=3,
    )


if _module is None:
    warn_fallback(f"the compiled module relprop._C did not load ({_error})")


class Planes(NamedTuple):
    """``(N, C, H, W, OH, OW)``: the plane geometry the native pooling kernels take."""

    batch: int
    channels: int
    in_h: int
    in_w: int
    out_h: int
    out_w: int


def dtype_code(tensor: Tensor, allowed: tuple[torch.dtype, ...]) -> int:
    """The native dtype code of ``tensor``; TypeError when the kernel does not take its dtype."""
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(
            f"the native kernel takes {names} on {tensor.device.type}, got {tensor.dtype}"
        )
    return DTYPE_CODES[tensor.dtype]


def pointer(tensor: Tensor) -> int:
    """Address of the tensor's first element, as an int for ``relprop._C``."""
    return tensor.data_ptr()


def strides4(tensor: Tensor) -> tuple[int, int, int, int]:
    """Element strides of a 4-D (N, C, H, W) tensor; other layouts must be viewed first."""
    if tensor.dim() != 4:
        raise ValueError(f"expected a 4-D (N, C, H, W) tensor, got shape {tuple(tensor.shape)}")
    stride = tensor.stride()
    return (stride[0], stride[1], stride[2], stride[3])


def on_cuda(tensor: Tensor) -> bool:
    """Whether the native kernel for ``tensor`` is the CUDA entry point (else the CPU twin).

    The ops ask this rather than ``tensor.device`` themselves, so that the test suite can run the
    CUDA kernels' sources on the CPU (tests/cuda_emulation) through the ops' own CUDA branch.
    (``is_cuda``, not ``device.type``: the latter makes a ``torch.device`` per call, 1 µs, and
    this is asked several times per layer step.)
    """
    return tensor.is_cuda


def cuda_launch_args(tensor: Tensor) -> dict[str, int]:
    """``stream`` and ``device`` arguments of a CUDA entry point for work on ``tensor``.

    Inside a pass (:func:`pass_launch_args`) those of the pass's input: every tensor of a pass is
    on its device and its work on the stream current as it began (torch's current-stream query
    makes a ``Stream`` object, a few microseconds per launch otherwise).
    """
    known = _launch_args_of_pass.get()
    if known is not None:
        return known
    if not cuda_compiled():
        raise RuntimeError(
            "relprop._C was built without CUDA kernels (nvcc was not found at build time); "
            "rebuild with nvcc on PATH or set RELPROP_BACKEND=reference"
        )
    device = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return {"stream": torch.cuda.current_stream(device).cuda_stream, "device": device}


_launch_args_of_pass: ContextVar[dict[str, int] | None] = ContextVar(
    "relprop_launch_args_of_pass", default=None
)


def pass_launch_args(x: Tensor) -> Token | None:
    """Fix :func:`cuda_launch_args` for a pass over ``x`` (a CUDA tensor, with the CUDA kernels
    built); the token resets it, None where nothing was fixed."""
    if not (x.is_cuda and cuda_compiled()):
        return None
    return _launch_args_of_pass.set(cuda_launch_args(x))


def end_pass_launch_args(token: Token | None) -> None:
    """Undo :func:`pass_launch_args`."""
    if token is not None:
        _launch_args_of_pass.reset(token)


def launch(entry: str, tensor: Tensor, *args: object) -> None:
    """Call ``relprop._C``'s ``<entry>_cuda`` or ``<entry>_cpu`` (:func:`on_cuda`) with the dtype
    code of ``tensor`` (the op's first operand), ``args`` and, on CUDA, the launch arguments.

    ``args`` are positional, in the order of the entry point's parameters after ``dtype``
    (``csrc/bindings.cpp``): pybind11 matches keyword arguments by name at 0.2 µs each,
    3 of the 5 µs a 14-argument call took, and the engine launches several per layer step.
    """
    module = native()
    if on_cuda(tensor):
        launch_args = cuda_launch_args(tensor)
        getattr(module, f"{entry}_cuda")(
            dtype_code(tensor, CUDA_DTYPES), *args, launch_args["stream"], launch_args["device"]
        )
    else:
        getattr(module, f"{entry}_cpu")(dtype_code(tensor, CPU_DTYPES), *args)


def runs_native(tensor: Tensor) -> bool:
    """Whether ``tensor``'s op runs the native kernel; warns once when it should but cannot."""
    backend = _forced_backend()
    if backend == "reference":
        return False
    cuda = on_cuda(tensor)
    if tensor.dtype not in (CUDA_DTYPES if cuda else CPU_DTYPES):
        return False
    if backend == "native":
        native()  # raises with the import error: a forced path must not degrade
        if cuda:
            cuda_launch_args(tensor)
        return True
    if not native_available():
        warn_fallback(f"relprop._C did not load ({native_error()})")
        return False
    if cuda and not cuda_compiled():
        warn_fallback("relprop._C was built without its CUDA kernels")
        return False
    return True


def _forced_backend() -> str | None:
    # relprop.ops imports this module: the function is looked up once, at the first call, and
    # kept (an import statement in runs_native cost a microsecond per op call).
    global _forced_backend
    from relprop.ops._backend import forced_backend

    _forced_backend = forced_backend
    return forced_backend()
