"""The sum of two tensors and the ReLU after it, in one pass: ``relprop::add_relu``.

A ResNet block ends in ``relu(a + b)``, the residual sum the plan fuses its ReLU into
(``graph/plan.py``). torch's ``add`` writes the sum and the ReLU reads and writes it again; this op
is one read of each operand and one write:

``relprop::add_relu(Tensor a, Tensor b) -> Tensor``
    for ``a`` and ``b`` of one shape, dtype and device, the contiguous ``relu(a + b)`` with
    ``relu(v) = 0`` where ``v < 0`` and ``v`` elsewhere (NaN and −0 kept, as torch's ReLU on the
    CPU keeps them). float16 and bfloat16 add in float32 and round once (the ReLU is exact after
    the rounding, so that is also torch's ``add`` then ``relu_``).

The reference is the ``default`` kernel (any device); the ``cpu`` kernel runs the OpenMP loop of
``csrc/cpu/add_relu.cpp`` (float32, float64; equal to the reference bitwise) and the ``cuda``
kernel ``kernels/cuda/add_relu.cu`` (also float16, bfloat16). Every element is computed on its
own, so results are deterministic. relprop calls it on CUDA only (on the CPU torch's add and
in-place ReLU are as fast). ``RELPROP_BACKEND`` acts as for ``relprop::stabilized_divide``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from relprop import _native
from relprop.ops._backend import call_op
from relprop.ops.elementwise import COMPUTE_DTYPES, check_elementwise_arguments, refuse_other_shapes

# ---------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any device, the truth the kernels are tested against.


def add_relu_reference(a: Tensor, b: Tensor) -> Tensor:
    """``relu(a + b)`` as a torch composition (see the module)."""
    compute = COMPUTE_DTYPES.get(a.dtype, a.dtype)
    v = a.to(compute) + b.to(compute)
    # A select, not clamp or relu: NaN and −0 stay as they are on every device.
    return torch.where(v < 0, v.new_zeros(()), v).to(a.dtype).contiguous()


def _add_relu_native(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)
    if out.numel() == 0:
        return out
    _native.launch(
        "add_relu", a, out.numel(), _native.pointer(a), _native.pointer(b), _native.pointer(out)
    )
    return out


# ---------------------------------------------------------------------------------------------
# torch.library op. The decorated function is the `default` kernel (any device); the `cpu` and
# `cuda` kernels take the native path when they can.


@torch.library.custom_op(
    "relprop::add_relu", mutates_args=(), schema="(Tensor a, Tensor b) -> Tensor"
)
def add_relu_op(a, b):
    refuse_other_shapes("relprop::add_relu", ("a", a), b=b)
    return add_relu_reference(a, b)


@add_relu_op.register_fake
def _(a, b):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


@add_relu_op.register_kernel(("cpu", "cuda"))
def add_relu_kernel(a, b):
    refuse_other_shapes("relprop::add_relu", ("a", a), b=b)
    if a.dtype != b.dtype or not _native.runs_native(a):
        return add_relu_reference(a, b)
    return _add_relu_native(a, b)


def add_relu_fast(a: Tensor, b: Tensor) -> Tensor:
    """:func:`add_relu` for the engine's own tensors (a residual block's two branches: shapes and
    dtypes fit by construction), without the wrapper's checks and, in eager mode, without the
    dispatcher (``ops._backend.call_op``)."""
    return call_op(add_relu_op, add_relu_kernel, a, b)


# ---------------------------------------------------------------------------------------------
# Public wrapper.


def add_relu(a: Tensor, b: Tensor) -> Tensor:
    """The sum of two tensors and a ReLU, in one pass.

    ``relu(a + b)``: the end of a residual block (He et al., "Deep Residual Learning for Image
    Recognition", CVPR 2016), ``relu(v) = 0`` where ``v < 0``, else ``v``.

    Parameters
    ----------
    a, b : Tensor
        One shape, dtype and device, floating point.

    Returns
    -------
    Tensor
        Contiguous, of ``a``'s shape and dtype.

    Raises
    ------
    ValueError
        The shapes, dtypes or devices differ, or the tensors are not floating point.
    """
    check_elementwise_arguments("add_relu", ("a", a), b=b)
    return add_relu_op(a, b)
