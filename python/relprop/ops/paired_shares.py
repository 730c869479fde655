"""Two shares of a relevance in one pass: ``relprop::paired_shares``.

Two rules split each output's relevance into two shares over two modified pre-activations.
The α-β rule (Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by
Layer-Wise Relevance Propagation", PLoS ONE 2015) gives an input ``x ≥ 0``
``x · (α·W⁺ᵀ(R / stab(z⁺)) − β·W⁻ᵀ(R / stab(z⁻)))`` with ``z⁺ = W⁺x + b⁺`` and
``z⁻ = z − z⁺``; the γ rule (Montavon et al., "Layer-Wise Relevance Propagation: An Overview",
2019) gives ``x · ((W + γW⁺)ᵀ([z > 0]·R / stab(z_pos)) + (W + γW⁻)ᵀ([z < 0]·R / stab(z_neg)))``
with ``z_pos = (W + γW⁺)x + b + γb⁺`` and ``z_neg = (2 + γ)z − z_pos``. As a torch composition
each is the second denominator, two divisions, two transposed products and their sum. This op
writes both shares side by side in one pass,

``relprop::paired_shares(Tensor relevance, Tensor z, Tensor zp, float epsilon, float scale,
float second_scale, float z_weight, bool sign_masks, Tensor? factor=None,
Tensor? zp_bias=None) -> Tensor``
    for ``relevance`` of shape ``(N, C, *rest)`` the ``(N, 2C, *rest)`` tensor whose channels
    ``[:C]`` are ``scale·R / stab(zp, ε)`` and ``[C:]`` are
    ``second_scale·R / stab(z_weight·z − zp, ε)``, each exactly 0 where its stabilised
    denominator is 0 and, with ``sign_masks``, where ``z > 0`` (first) or ``z < 0`` (second)
    fails; ``R = relevance · factor`` (``factor`` formed in the same pass, as in
    ``relprop::stabilized_divide``, and +0 where the factor is 0); with ``zp_bias`` (shape
    ``(C,)``) ``zp`` is ``zp + zp_bias[c]`` wherever it is read, added in the compute dtype (the
    layer's modified bias, which torch adds to a convolution's output in a pass of its own).
    α-β is ``(α, −β, 1, False)``, γ ``(1, 1, 2 + γ, True)``,

so that one transposed product with the two weight sets stacked along the output channels
(``[W⁺; W⁻]``, ``[W + γW⁺; W + γW⁻]``) gives the bracket above: the sum of the two products
happens inside the product's reduction. ``stab(d, e) = d + e·(sign(d) + [d = 0])`` as in
:mod:`relprop.ops.elementwise`. float16 / bfloat16 are computed in float32: the product
``z_weight·z`` is rounded to the compute dtype before ``zp`` is subtracted, the difference is not
rounded to the storage dtype before its division, and each share is rounded once (float16
saturated at ±65504, as in ``relprop::stabilized_divide``).

The reference is the ``default`` kernel (any device); the ``cpu`` kernel runs the OpenMP loop of
``csrc/cpu/paired_shares.cpp`` (float32, float64; equal to the reference bitwise) and the
``cuda`` kernel ``kernels/cuda/paired_shares.cu`` (also float16, bfloat16). Both compute each
element on its own, so results are deterministic. ``RELPROP_BACKEND`` acts as for
``relprop::stabilized_divide``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from relprop import _native
from relprop.ops.elementwise import (
    COMPUTE_DTYPES,
    channel_view,
    check_channel_bias,
    check_elementwise_arguments,
    product_with_factor,
    refuse_other_shapes,
    stabilized_divide_reference,
    to_share_dtype,
)


def _stacked_shape(relevance: Tensor) -> tuple[int, ...]:
    return (relevance.shape[0], 2 * relevance.shape[1], *relevance.shape[2:])


# ---------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any device, the truth the kernels are tested against.


def paired_shares_reference(
    relevance: Tensor,
    z: Tensor,
    zp: Tensor,
    epsilon: float,
    scale: float,
    second_scale: float,
    z_weight: float,
    sign_masks: bool,
    factor: Tensor | None = None,
    zp_bias: Tensor | None = None,
) -> Tensor:
    """``[scale·R / stab(zp, ε), second_scale·R / stab(z_weight·z − zp, ε)]`` along dim 1 (sign
    masked by ``z``; ``zp`` plus its bias) as a torch composition (see the module)."""
    compute = COMPUTE_DTYPES.get(relevance.dtype, relevance.dtype)
    r = relevance.to(compute)
    if factor is not None:
        r = product_with_factor(r, factor.to(compute))
    z_c, zp_c = z.to(compute), zp.to(compute)
    if zp_bias is not None:
        zp_c = zp_c + channel_view(zp_bias.to(compute), zp_c)
    reference = z_c if sign_masks else None
    first = stabilized_divide_reference(r, zp_c, epsilon, scale, reference, 1)
    second_denominator = z_c * z_weight - zp_c
    second = stabilized_divide_reference(
        r, second_denominator, epsilon, second_scale, reference, -1
    )
    return to_share_dtype(torch.cat([first, second], dim=1), relevance.dtype)


# ---------------------------------------------------------------------------------------------
# Native path (relprop._C): the CPU twin and the CUDA kernel, chosen by _native.runs_native.


def _paired_shares_native(
    relevance: Tensor,
    z: Tensor,
    zp: Tensor,
    epsilon: float,
    scale: float,
    second_scale: float,
    z_weight: float,
    sign_masks: bool,
    factor: Tensor | None,
    zp_bias: Tensor | None = None,
) -> Tensor:
    relevance, z, zp = relevance.contiguous(), z.contiguous(), zp.contiguous()
    if factor is not None:
        factor = factor.contiguous()
    if zp_bias is not None:
        zp_bias = zp_bias.contiguous()  # held: the kernel reads it by address
    out = relevance.new_empty(_stacked_shape(relevance))
    if out.numel() == 0:
        return out
    samples = relevance.shape[0]
    _native.launch(
        "paired_shares",
        relevance,
        samples,
        relevance.numel() // samples,  # inner
        _native.pointer(relevance),
        # Address 0: no factor, the relevance is taken as it is.
        0 if factor is None else _native.pointer(factor),
        _native.pointer(z),
        _native.pointer(zp),
        # Address 0: zp is taken as it is.
        0 if zp_bias is None else _native.pointer(zp_bias),
        relevance.shape[1],  # channels
        float(epsilon),
        float(scale),
        float(second_scale),
        float(z_weight),
        bool(sign_masks),
        _native.pointer(out),
    )
    return out


# ---------------------------------------------------------------------------------------------
# torch.library op. The decorated function is the `default` kernel (any device); the `cpu` and
# `cuda` kernels take the native path when they can.


@torch.library.custom_op(
    "relprop::paired_shares",
    mutates_args=(),
    schema=(
        "(Tensor relevance, Tensor z, Tensor zp, float epsilon, float scale, float second_scale, "
        "float z_weight, bool sign_masks, Tensor? factor=None, Tensor? zp_bias=None) -> Tensor"
    ),
)
def paired_shares_op(
    relevance, z, zp, epsilon, scale, second_scale, z_weight, sign_masks, factor=None,
    zp_bias=None,
):  # fmt: skip
    _refuse_other_operands(relevance, z, zp, factor, zp_bias)
    return paired_shares_reference(
        relevance, z, zp, epsilon, scale, second_scale, z_weight, sign_masks, factor, zp_bias
    )


@paired_shares_op.register_fake
def _(relevance, z, zp, epsilon, scale, second_scale, z_weight, sign_masks, factor=None,
      zp_bias=None):  # fmt: skip
    return relevance.new_empty(_stacked_shape(relevance))


@paired_shares_op.register_kernel(("cpu", "cuda"))
def paired_shares_kernel(
    relevance, z, zp, epsilon, scale, second_scale, z_weight, sign_masks, factor=None,
    zp_bias=None,
):  # fmt: skip
    _refuse_other_operands(relevance, z, zp, factor, zp_bias)
    args = (relevance, z, zp, epsilon, scale, second_scale, z_weight, sign_masks, factor, zp_bias)
    same_dtype = all(t is None or t.dtype == relevance.dtype for t in (z, zp, factor, zp_bias))
    if not same_dtype or not _native.runs_native(relevance):
        return paired_shares_reference(*args)
    return _paired_shares_native(*args)


def _refuse_other_operands(relevance, z, zp, factor, zp_bias):
    refuse_other_shapes(
        "relprop::paired_shares", ("relevance", relevance), z=z, zp=zp, factor=factor
    )
    if zp_bias is not None and (relevance.dim() < 2 or zp_bias.shape != (relevance.shape[1],)):
        check_channel_bias("relprop::paired_shares", "zp_bias", zp_bias, relevance)


# ---------------------------------------------------------------------------------------------
# Public wrapper.


def paired_shares(
    relevance: Tensor,
    z: Tensor,
    zp: Tensor,
    epsilon: float,
    scale: float,
    second_scale: float,
    z_weight: float = 1.0,
    sign_masks: bool = False,
    factor: Tensor | None = None,
    zp_bias: Tensor | None = None,
) -> Tensor:
    """Two shares of a relevance, side by side along dim 1, in one pass.

    ``out[:, :C] = scale·R / stab(zp, ε)`` and ``out[:, C:] = second_scale·R / stab(z_weight·z −
    zp, ε)`` with ``R = relevance · factor`` and ``stab(d, e) = d + e·(sign(d) + [d = 0])``; each
    share is exactly 0 where its stabilised denominator is 0 and, with ``sign_masks``, where
    ``z > 0`` (first share) or ``z < 0`` (second share) fails.

    For input ``x ≥ 0`` these are the shares of two rules, whose transposed product with two
    weight sets stacked along the outputs is the rule's input relevance before its product with
    ``x``:

    - α-β (Bach et al., PLoS ONE 2015): ``paired_shares(R, z, z⁺, ε, α, −β)`` with
      ``z⁺ = W⁺x + b⁺``, since ``z − z⁺ = W⁻x + b⁻``; weights ``[W⁺; W⁻]``.
    - γ (Montavon et al., 2019): ``paired_shares(R, z, z_pos, ε, 1, 1, 2 + γ, True)`` with
      ``z_pos = (W + γW⁺)x + b + γb⁺``, since ``(2 + γ)z − z_pos = (W + γW⁻)x + b + γb⁻``;
      weights ``[W + γW⁺; W + γW⁻]``.

    Parameters
    ----------
    relevance : Tensor
        ``R`` of the layer's output, shape ``(N, C, *rest)``, floating point.
    z : Tensor
        The layer's pre-activation ``Wx + b``; shape, dtype and device of ``relevance``.
    zp : Tensor
        The first share's denominator (``z⁺``, ``z_pos``); shape, dtype and device of
        ``relevance``.
    epsilon : float
        Stabiliser ``ε`` of both divisions; 0 gives the unstabilised divisions with 0 for zero
        denominators.
    scale, second_scale : float
        Factors of the two shares (``α`` and ``−β``; 1 and 1 for γ).
    z_weight : float, optional
        The second denominator is ``z_weight·z − zp`` (1 for α-β, ``2 + γ`` for γ).
    sign_masks : bool, optional
        Keep the first share only where ``z > 0`` and the second only where ``z < 0`` (γ).
    factor : Tensor or None, optional
        Multiplies ``relevance`` inside the same pass (same shape, dtype and device).
    zp_bias : Tensor or None, optional
        Shape ``(C,)``, dtype and device of ``relevance``: added to ``zp`` along dim 1 inside the
        same pass (in the compute dtype), wherever ``zp`` is read.

    Returns
    -------
    Tensor
        Contiguous, shape ``(N, 2C, *rest)``, dtype of ``relevance``.

    Raises
    ------
    ValueError
        ``relevance`` has fewer than two dimensions, the tensors' shapes, dtypes or devices
        differ, or ``zp_bias`` has not one value per channel.
    """
    if relevance.dim() < 2:
        raise ValueError(
            f"paired_shares: relevance needs a batch and a channel dimension, got shape "
            f"{tuple(relevance.shape)}"
        )
    check_elementwise_arguments(
        "paired_shares", ("relevance", relevance), z=z, zp=zp, factor=factor
    )
    check_channel_bias("paired_shares", "zp_bias", zp_bias, relevance)
    return paired_shares_op(
        relevance, z, zp, float(epsilon), float(scale), float(second_scale), float(z_weight),
        bool(sign_masks), factor, zp_bias,
    )  # fmt: skip
