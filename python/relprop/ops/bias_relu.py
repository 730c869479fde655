"""A layer's bias and the ReLU after it, in place, in one pass: ``relprop::bias_relu_``.

A convolution whose ReLU the plan fuses into it (``graph/plan.py``) keeps only ``relu(z)``. On
CUDA, torch adds the bias in a pass of its own after cuDNN's product (a read and a write of the
whole output) and the ReLU is a second such pass; this op is both in one:

``relprop::bias_relu_(Tensor(a!) z, Tensor bias) -> ()``
    for a contiguous ``z`` of shape ``(N, C, *rest)`` and ``bias`` of shape ``(C,)``, sets
    ``z = relu(z + bias[c])`` with ``relu(v) = 0`` where ``v < 0`` and ``v`` elsewhere (NaN and
    −0 kept, as torch's ReLU on the CPU keeps them). float16 and bfloat16 add in float32 and
    round once (the ReLU is exact after the rounding, so that is also torch's ``add_`` then
    ``relu_``).

The reference is the ``default`` kernel (any device); the ``cpu`` kernel runs the OpenMP loop of
``csrc/cpu/bias_relu.cpp`` (float32, float64; equal to the reference bitwise: one rounded sum and
a select) and the ``cuda`` kernel ``kernels/cuda/bias_relu.cu`` (also float16, bfloat16). Every
element is computed on its own, so results are deterministic. relprop calls it on CUDA only: on
the CPU oneDNN adds the bias inside the convolution, which leaves the ReLU one pass already.
``RELPROP_BACKEND`` acts as for ``relprop::stabilized_divide``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from relprop import _native
from relprop.ops._backend import call_op
from relprop.ops.elementwise import COMPUTE_DTYPES, check_channel_bias

# ---------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any device, the truth the kernels are tested against.


def bias_relu_reference(z: Tensor, bias: Tensor) -> None:
    """``z = relu(z + bias)`` along dim 1, in place, as a torch composition (see the module)."""
    compute = COMPUTE_DTYPES.get(z.dtype, z.dtype)
    shape = (1, -1) + (1,) * (z.dim() - 2)
    v = z.to(compute) + bias.to(compute).view(shape)
    # A select, not clamp or relu: NaN and −0 stay as they are on every device.
    z.copy_(torch.where(v < 0, v.new_zeros(()), v))


def _bias_relu_native(z: Tensor, bias: Tensor) -> None:
    bias = bias.contiguous()
    samples, channels = z.shape[0], z.shape[1]
    rows = samples * channels
    if rows == 0 or z.numel() == 0:
        return
    inner = z.numel() // rows
    _native.launch("bias_relu", z, rows, channels, inner, _native.pointer(z), _native.pointer(bias))


def _refuse(z: Tensor, bias: Tensor) -> None:
    """Raise ``ValueError`` naming the mismatch unless ``bias`` fits ``z``'s channels and both
    are floating point of one dtype and device, ``z`` contiguous (the kernels write it in place
    as one buffer)."""
    if z.dim() < 2:
        raise ValueError(
            f"bias_relu_: z needs a batch and a channel dimension, got shape {tuple(z.shape)}"
        )
    check_channel_bias("bias_relu_", "bias", bias, z)
    if not z.is_floating_point():
        raise ValueError(f"bias_relu_: expected floating-point tensors, got {z.dtype}")
    if not z.is_contiguous():
        raise ValueError(
            "bias_relu_: z must be contiguous (it is written in place); pass z.contiguous()"
        )


# ---------------------------------------------------------------------------------------------
# torch.library op. The decorated function is the `default` kernel (any device); the `cpu` and
# `cuda` kernels take the native path when they can.


@torch.library.custom_op(
    "relprop::bias_relu_", mutates_args=("z",), schema="(Tensor(a!) z, Tensor bias) -> ()"
)
def bias_relu_op(z, bias):
    _refuse(z, bias)
    bias_relu_reference(z, bias)


@bias_relu_op.register_fake
def _(z, bias):
    return None


@bias_relu_op.register_kernel(("cpu", "cuda"))
def bias_relu_kernel(z, bias):
    _refuse(z, bias)
    if not _native.runs_native(z):
        return bias_relu_reference(z, bias)
    return _bias_relu_native(z, bias)


def bias_relu_fast(z: Tensor, bias: Tensor) -> Tensor:
    """:func:`bias_relu_` for the engine's own tensors (a convolution's output and its folded
    bias: shapes and dtypes fit by construction): the kernel is called without the wrapper's
    checks and, in eager mode, without the dispatcher (``ops._backend.call_op``). Returns ``z``."""
    call_op(bias_relu_op, bias_relu_kernel, z, bias)
    return z


# ---------------------------------------------------------------------------------------------
# Public wrapper.


def bias_relu_(z: Tensor, bias: Tensor) -> Tensor:
    """Add a per-channel bias and apply a ReLU, in place, in one pass.

    ``z[n, c, ...] = relu(z[n, c, ...] + bias[c])``: a layer's output before its bias, made the
    output of the ReLU after it (the ReLU of Nair & Hinton, "Rectified Linear Units Improve
    Restricted Boltzmann Machines", ICML 2010; ``relu(v) = 0`` where ``v < 0``, else ``v``).

    Parameters
    ----------
    z : Tensor
        Contiguous, shape ``(N, C, *rest)``, floating point; overwritten.
    bias : Tensor
        Shape ``(C,)``, dtype and device of ``z``.

    Returns
    -------
    Tensor
        ``z`` itself.

    Raises
    ------
    ValueError
        ``z`` has fewer than two dimensions or is not contiguous, or ``bias`` does not fit its
        channels, dtype or device.
    """
    # The op refuses what does not fit, naming it (as a call of torch.ops.relprop.bias_relu_ does).
    bias_relu_op(z, bias)
    return z
