"""The α-β rule's two shares in one pass: ``relprop::alpha_beta_shares``.

The α-β rule (Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by
Layer-Wise Relevance Propagation", PLoS ONE 2015) redistributes the relevance ``R`` of a layer's
output to its input ``x ≥ 0`` as ``x · (α·W⁺ᵀ(R / stab(z⁺)) − β·W⁻ᵀ(R / stab(z⁻)))`` with
``z⁺ = W⁺x + b⁺`` and ``z⁻ = W⁻x + b⁻ = z − z⁺``. As a torch composition that is a subtraction,
two divisions, two transposed products and their sum: six passes over output-sized tensors and
one over an input-sized one. This op writes both shares side by side in one pass,

``relprop::alpha_beta_shares(Tensor relevance, Tensor z, Tensor zp, float epsilon, float alpha,
float beta, Tensor? factor=None) -> Tensor``
    for ``relevance`` of shape ``(N, C, *rest)`` the ``(N, 2C, *rest)`` tensor whose channels
    ``[:C]`` are ``α·R / stab(zp, ε)`` and ``[C:]`` are ``−β·R / stab(z − zp, ε)``, each exactly
    0 where its stabilised denominator is 0, ``R = relevance · factor`` (``factor`` formed in the
    same pass, as in ``relprop::stabilized_divide``),

so that one transposed product with the weights ``[W⁺; W⁻]`` stacked along the output channels
gives the bracket above: the sum of the two products happens inside the product's reduction.
``stab(d, e) = d + e·(sign(d) + [d = 0])`` as in :mod:`relprop.ops.elementwise`; ``z − zp`` is
not rounded to the dtype before its division, and float16 / bfloat16 are computed in float32
and rounded once.

The reference is the ``default`` kernel (any device); the ``cpu`` kernel runs the OpenMP loop of
``csrc/cpu/alpha_beta_shares.cpp`` (float32, float64; equal to the reference bitwise) and the
``cuda`` kernel ``kernels/cuda/alpha_beta_shares.cu`` (also float16, bfloat16). Both compute each
element on its own, so results are deterministic. ``RELPROP_BACKEND`` acts as for
``relprop::stabilized_divide``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from relprop import _native
from relprop.ops.elementwise import stabilized_divide_reference

# float16 and bfloat16 are computed in float32, as the CUDA kernel does.
_COMPUTE_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _stacked_shape(relevance: Tensor) -> tuple[int, ...]:
    return (relevance.shape[0], 2 * relevance.shape[1], *relevance.shape[2:])


# ---------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any device, the truth the kernels are tested against.


def alpha_beta_shares_reference(
    relevance: Tensor,
    z: Tensor,
    zp: Tensor,
    epsilon: float,
    alpha: float,
    beta: float,
    factor: Tensor | None = None,
) -> Tensor:
    """``[α·R / stab(zp, ε), −β·R / stab(z − zp, ε)]`` along dim 1 as a torch composition (see
    the module)."""
    compute = _COMPUTE_DTYPES.get(relevance.dtype, relevance.dtype)
    r = relevance.to(compute)
    if factor is not None:
        r = r * factor.to(compute)
    zp_c = zp.to(compute)
    positive = stabilized_divide_reference(r, zp_c, epsilon, alpha)
    negative = stabilized_divide_reference(r, z.to(compute) - zp_c, epsilon, -beta)
    return torch.cat([positive, negative], dim=1).to(relevance.dtype)


# ---------------------------------------------------------------------------------------------
# Native path (relprop._C): the CPU twin and the CUDA kernel, chosen by _native.runs_native.


def _alpha_beta_shares_native(
    relevance: Tensor,
    z: Tensor,
    zp: Tensor,
    epsilon: float,
    alpha: float,
    beta: float,
    factor: Tensor | None,
) -> Tensor:
    relevance, z, zp = relevance.contiguous(), z.contiguous(), zp.contiguous()
    if factor is not None:
        factor = factor.contiguous()
    out = relevance.new_empty(_stacked_shape(relevance))
    if out.numel() == 0:
        return out
    samples = relevance.shape[0]
    args = {
        "samples": samples,
        "inner": relevance.numel() // samples,
        "relevance": _native.pointer(relevance),
        # Address 0: no factor, the relevance is taken as it is.
        "factor": 0 if factor is None else _native.pointer(factor),
        "z": _native.pointer(z),
        "zp": _native.pointer(zp),
        "epsilon": float(epsilon),
        "alpha": float(alpha),
        "beta": float(beta),
        "out": _native.pointer(out),
    }
    module = _native.native()
    if relevance.device.type == "cuda":
        module.alpha_beta_shares_cuda(
            dtype=_native.dtype_code(relevance, _native.CUDA_DTYPES),
            **_native.cuda_launch_args(relevance),
            **args,
        )
    else:
        module.alpha_beta_shares_cpu(
            dtype=_native.dtype_code(relevance, _native.CPU_DTYPES), **args
        )
    return out


# ---------------------------------------------------------------------------------------------
# torch.library op. The decorated function is the `default` kernel (any device); the `cpu` and
# `cuda` kernels take the native path when they can.


@torch.library.custom_op(
    "relprop::alpha_beta_shares",
    mutates_args=(),
    schema=(
        "(Tensor relevance, Tensor z, Tensor zp, float epsilon, float alpha, float beta, "
        "Tensor? factor=None) -> Tensor"
    ),
)
def alpha_beta_shares_op(relevance, z, zp, epsilon, alpha, beta, factor=None):
    return alpha_beta_shares_reference(relevance, z, zp, epsilon, alpha, beta, factor)


@alpha_beta_shares_op.register_fake
def _(relevance, z, zp, epsilon, alpha, beta, factor=None):
    return relevance.new_empty(_stacked_shape(relevance))


@alpha_beta_shares_op.register_kernel(("cpu", "cuda"))
def alpha_beta_shares_kernel(relevance, z, zp, epsilon, alpha, beta, factor=None):
    same_dtype = all(t is None or t.dtype == relevance.dtype for t in (z, zp, factor))
    if not same_dtype or not _native.runs_native(relevance):
        return alpha_beta_shares_reference(relevance, z, zp, epsilon, alpha, beta, factor)
    return _alpha_beta_shares_native(relevance, z, zp, epsilon, alpha, beta, factor)


# ---------------------------------------------------------------------------------------------
# Public wrapper.


def alpha_beta_shares(
    relevance: Tensor,
    z: Tensor,
    zp: Tensor,
    epsilon: float,
    alpha: float,
    beta: float,
    factor: Tensor | None = None,
) -> Tensor:
    """Both shares of the α-β rule, side by side along dim 1, in one pass.

    ``out[:, :C] = α·R / stab(zp, ε)`` and ``out[:, C:] = −β·R / stab(z − zp, ε)`` with
    ``R = relevance · factor`` and ``stab(d, e) = d + e·(sign(d) + [d = 0])``; each share is
    exactly 0 where its stabilised denominator is 0. For input ``x ≥ 0``, ``z − zp`` is the
    negative part ``W⁻x + b⁻`` of the pre-activation, and the transposed product of ``out`` with
    ``[W⁺; W⁻]`` (stacked along the output channels) is ``α·W⁺ᵀ(R/z⁺) − β·W⁻ᵀ(R/z⁻)``: the α-β
    rule of Bach et al. (PLoS ONE 2015) before its product with ``x``.

    Parameters
    ----------
    relevance : Tensor
        ``R`` of the layer's output, shape ``(N, C, *rest)``, floating point.
    z : Tensor
        The layer's pre-activation ``Wx + b``; shape, dtype and device of ``relevance``.
    zp : Tensor
        Its positive part ``W⁺x + b⁺`` (or ``W⁺x`` for the rule without bias, then with ``z``
        also without bias); shape, dtype and device of ``relevance``.
    epsilon : float
        Stabiliser ``ε`` of both divisions; 0 gives the unstabilised divisions with 0 for zero
        denominators.
    alpha, beta : float
        The rule's weights of the positive and the negative share (``α − β = 1`` conserves
        relevance).
    factor : Tensor or None, optional
        Multiplies ``relevance`` inside the same pass (same shape, dtype and device).

    Returns
    -------
    Tensor
        Contiguous, shape ``(N, 2C, *rest)``, dtype of ``relevance``.

    Raises
    ------
    ValueError
        ``relevance`` has fewer than two dimensions, or the tensors' shapes, dtypes or devices
        differ.
    """
    if relevance.dim() < 2:
        raise ValueError(
            f"alpha_beta_shares: relevance needs a batch and a channel dimension, got shape "
            f"{tuple(relevance.shape)}"
        )
    tensors = {"z": z, "zp": zp}
    if factor is not None:
        tensors["factor"] = factor
    for name, tensor in tensors.items():
        if tensor.shape != relevance.shape:
            raise ValueError(
                f"alpha_beta_shares: {name} has shape {tuple(tensor.shape)}, relevance "
                f"{tuple(relevance.shape)}"
            )
        if tensor.dtype != relevance.dtype or tensor.device != relevance.device:
            raise ValueError(
                f"alpha_beta_shares: {name} is {tensor.dtype} on {tensor.device}, relevance "
                f"{relevance.dtype} on {relevance.device}"
            )
    if not relevance.is_floating_point():
        raise ValueError(
            f"alpha_beta_shares: expected floating-point tensors, got {relevance.dtype}"
        )
    return alpha_beta_shares_op(relevance, z, zp, float(epsilon), float(alpha), float(beta), factor)
