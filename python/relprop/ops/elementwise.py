"""Fused element-wise ops of the relevance rules: the stabilised division in one pass.

Every LRP rule divides the relevance of a layer's output by a stabilised pre-activation,
``s = R / stab(z, ε)`` with ``stab(d, e) = d + e·(sign(d) + [d = 0])`` (zero counts as positive,
as in Zennit; Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by
Layer-Wise Relevance Propagation", PLoS ONE 2015). The γ rule (Montavon et al., "Layer-Wise
Relevance Propagation: An Overview", 2019) and α-β add a sign mask and a factor:
``[z > 0]·R / stab(z⁺, ε)``, ``[z < 0]·R / stab(z⁻, ε)``, ``α·R / stab(z_p, ε)``,
``−β·R / stab(z_n, ε)``. As a torch composition that is three to six passes over activations
that are often tens of megabytes; here it is one:

``relprop::stabilized_divide(Tensor numerator, Tensor denominator, float epsilon, float scale,
Tensor? sign_reference, int sign, Tensor? factor=None, Tensor? denominator_bias=None,
Tensor? numerator_addend=None) -> Tensor``
    ``scale · numerator / stab(denominator, ε)``, exactly 0 where ``stab(denominator, ε) = 0``
    (for ε = 0: where the denominator is 0) and, when ``sign_reference`` is given, exactly 0
    wherever ``sign · sign_reference > 0`` fails (``sign`` is +1 or −1). With ``factor`` the
    numerator is ``numerator · factor``, formed inside the same pass: a relevance that arrives as
    ``c · x`` (the input relevance of the layer above, before its product with that layer's
    input) is divided without being formed first. That product is exactly +0 where the factor
    is 0, whatever the numerator: ``x = 0`` gives no relevance even where ``c`` overflowed
    float16 (see below). With ``denominator_bias`` (shape ``(C,)`` for a denominator
    ``(N, C, *rest)``) the denominator is ``denominator + bias[c]``, added in the compute dtype
    inside the same pass: a layer's bias, which torch adds to a convolution's output in a pass
    of its own (on CUDA, after cuDNN's product). With ``numerator_addend`` the numerator is
    ``numerator + addend`` (same shape), added in the compute dtype before the factor's product:
    a relevance ``(c₁ + c₂) · x`` that reached ``x`` along two paths (a residual block's input)
    is divided without its coefficients being summed in a pass of their own.

``-0.0`` is a zero like ``+0.0`` and is stabilised to ``+ε`` (``copysign(ε, d)`` would give
``−ε``). float16 and bfloat16 are computed in float32 and rounded once; a float16 result beyond
float16's range saturates at ±65504 instead of becoming ±inf. A share that large comes from a
denominator near zero, e.g. α-β's ``z⁻`` of a unit whose every negative weight meets a zero
input: in float32 the transposed product multiplies it by those zeros and gets 0, but an
infinite share gives ``inf · 0 = NaN`` for every input of the unit.

The reference is the ``default`` kernel (any device); the ``cpu`` kernel runs the OpenMP loop of
``csrc/cpu/elementwise.cpp`` (float32, float64) and the ``cuda`` kernel
``kernels/cuda/elementwise.cu`` (also float16, bfloat16). Both compute each element on its own, so
results are deterministic, and on the CPU they equal the reference bitwise.

``RELPROP_BACKEND=reference`` runs the reference everywhere; ``native`` runs ``relprop._C`` and
raises if it cannot; unset or ``triton`` (there is no Triton kernel), ``relprop._C`` runs where it
loaded and the reference runs elsewhere, after one warning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from relprop import _native

# float16 and bfloat16 are computed in float32, as the CUDA kernel does.
COMPUTE_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
FLOAT16_MAX = torch.finfo(torch.float16).max


def product_with_factor(coefficient: Tensor, factor: Tensor) -> Tensor:
    """``coefficient · factor``, exactly +0 where the factor is 0: a relevance ``x · c`` is 0
    where ``x`` is, also where ``c`` overflowed float16 (``inf · 0`` would be NaN; see the
    module)."""
    return torch.where(factor == 0, coefficient.new_zeros(()), coefficient * factor)


def to_share_dtype(share: Tensor, dtype: torch.dtype) -> Tensor:
    """``share`` (computed in float32 or float64) rounded to ``dtype``; for float16 saturated at
    ±65504 first, as the kernels store it (see the module: an infinite share makes NaN)."""
    if dtype == torch.float16:
        share = share.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    return share.to(dtype)


def check_elementwise_arguments(
    op: str, first: tuple[str, Tensor], **others: Tensor | None
) -> None:
    """Raise ``ValueError`` naming ``op`` unless every given tensor of ``others`` has the shape,
    dtype and device of ``first`` (a ``(name, tensor)`` pair) and they are floating point."""
    first_name, anchor = first
    for name, tensor in others.items():
        if tensor is None:
            continue
        if tensor.shape != anchor.shape:
            raise ValueError(
                f"{op}: {name} has shape {tuple(tensor.shape)}, {first_name} {tuple(anchor.shape)}"
            )
        if tensor.dtype != anchor.dtype or tensor.device != anchor.device:
            raise ValueError(
                f"{op}: {name} is {tensor.dtype} on {tensor.device}, {first_name} "
                f"{anchor.dtype} on {anchor.device}"
            )
    if not anchor.is_floating_point():
        raise ValueError(f"{op}: expected floating-point tensors, got {anchor.dtype}")


def channel_view(bias: Tensor, like: Tensor) -> Tensor:
    """``bias`` of shape ``(C,)`` viewed to broadcast along dim 1 of ``like`` ``(N, C, *rest)``."""
    return bias.view((1, -1) + (1,) * (like.dim() - 2))


def check_channel_bias(op: str, name: str, bias: Tensor | None, like: Tensor) -> None:
    """Raise ``ValueError`` naming ``op`` unless ``bias`` (if given) is a ``(C,)`` tensor of
    ``like``'s dtype and device, ``like`` of shape ``(N, C, *rest)``."""
    if bias is None:
        return
    if like.dim() < 2 or bias.shape != (like.shape[1],):
        raise ValueError(
            f"{op}: {name} has shape {tuple(bias.shape)}; it needs one value per channel (dim 1) "
            f"of a tensor of shape {tuple(like.shape)}"
        )
    if bias.dtype != like.dtype or bias.device != like.device:
        raise ValueError(
            f"{op}: {name} is {bias.dtype} on {bias.device}, the operands {like.dtype} on "
            f"{like.device}"
        )


def _check_sign(sign_reference: Tensor | None, sign: int) -> None:
    if sign_reference is not None and sign not in (1, -1):
        raise ValueError(f"stabilized_divide: sign must be +1 or -1 with a reference, got {sign}")


def refuse_other_shapes(op: str, first: tuple[str, Tensor], **others: Tensor | None) -> None:
    """Raise (as :func:`check_elementwise_arguments`) unless every operand has the shape of
    ``first``. An op takes operands of one shape: the reference would broadcast a mismatch and the
    native kernels read every operand at the first one's size (past the end of a smaller one). A
    comparison of shapes per operand, cheap enough for every call of the engine."""
    shape = first[1].shape
    if any(t is not None and t.shape != shape for t in others.values()):
        check_elementwise_arguments(op, first, **others)


# ---------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any device, the truth the kernels are tested against.


def stabilized_divide_reference(
    numerator: Tensor,
    denominator: Tensor,
    epsilon: float,
    scale: float = 1.0,
    sign_reference: Tensor | None = None,
    sign: int = 1,
    factor: Tensor | None = None,
    denominator_bias: Tensor | None = None,
    numerator_addend: Tensor | None = None,
) -> Tensor:
    """``scale · ((numerator + addend) · factor) / stab(denominator + bias, ε)`` as a torch
    composition (see the module)."""
    _check_sign(sign_reference, sign)
    compute = COMPUTE_DTYPES.get(numerator.dtype, numerator.dtype)
    n, d = numerator.to(compute), denominator.to(compute)
    if numerator_addend is not None:
        n = n + numerator_addend.to(compute)
    if denominator_bias is not None:
        d = d + channel_view(denominator_bias.to(compute), d)
    if factor is not None:
        n = product_with_factor(n, factor.to(compute))
    # d < 0 is false for -0.0, so negative zero gets +ε like +0.0.
    shift = torch.where(d < 0, d.new_tensor(-epsilon), d.new_tensor(epsilon))
    stabilized = d + shift
    keep = stabilized != 0
    if sign_reference is not None:
        keep &= sign_reference > 0 if sign > 0 else sign_reference < 0
    out = torch.where(keep, scale * n / stabilized, n.new_zeros(()))
    return to_share_dtype(out, numerator.dtype).contiguous()


# ---------------------------------------------------------------------------------------------
# Native path (relprop._C): the CPU twins and the CUDA kernels, chosen by _native.runs_native.


def _stabilized_divide_native(
    numerator: Tensor,
    denominator: Tensor,
    epsilon: float,
    scale: float,
    sign_reference: Tensor | None,
    sign: int,
    factor: Tensor | None = None,
    denominator_bias: Tensor | None = None,
    numerator_addend: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    numerator = numerator.contiguous()
    denominator = denominator.contiguous()
    if numerator_addend is not None:
        numerator_addend = numerator_addend.contiguous()
    if denominator_bias is not None:
        # Held here: the kernel reads it by address after this function's last use of it.
        denominator_bias = denominator_bias.contiguous()
    if sign_reference is not None:
        sign_reference = sign_reference.contiguous()
    if factor is not None:
        factor = factor.contiguous()
    out = torch.empty_like(numerator) if out is None else out
    if out.numel() == 0:
        return out
    bias_address, channels, inner = _bias_args(denominator_bias, numerator)
    _native.launch(
        "stabilized_divide",
        numerator,
        out.numel(),
        _native.pointer(numerator),
        # Address 0: nothing is added to the numerator.
        0 if numerator_addend is None else _native.pointer(numerator_addend),
        # Address 0: no factor, the numerator is taken as it is.
        0 if factor is None else _native.pointer(factor),
        _native.pointer(denominator),
        bias_address,
        channels,
        inner,
        float(epsilon),
        float(scale),
        # Address 0 with sign 0: the kernels never read the reference then.
        0 if sign_reference is None else _native.pointer(sign_reference),
        0 if sign_reference is None else int(sign),
        _native.pointer(out),
    )
    return out


def _bias_args(bias: Tensor | None, like: Tensor) -> tuple[int, int, int]:
    """The native kernels' ``denominator_bias``, ``channels`` and ``inner`` (address 0: none) for
    a contiguous ``bias``."""
    if bias is None:
        return 0, 1, 1
    rows = like.shape[0] * like.shape[1]
    return _native.pointer(bias), like.shape[1], like.numel() // rows


# ---------------------------------------------------------------------------------------------
# torch.library op. The decorated function is the `default` kernel (any device); the `cpu` and
# `cuda` kernels take the native path when they can.


@torch.library.custom_op(
    "relprop::stabilized_divide",
    mutates_args=(),
    schema=(
        "(Tensor numerator, Tensor denominator, float epsilon, float scale, "
        "Tensor? sign_reference, int sign, Tensor? factor=None, "
        "Tensor? denominator_bias=None, Tensor? numerator_addend=None) -> Tensor"
    ),
)
def stabilized_divide_op(
    numerator, denominator, epsilon, scale, sign_reference, sign, factor=None,
    denominator_bias=None, numerator_addend=None,
):  # fmt: skip
    args = (numerator, denominator, epsilon, scale, sign_reference, sign, factor,
            denominator_bias, numerator_addend)  # fmt: skip
    _refuse_other_operands(*args)
    return stabilized_divide_reference(*args)


@stabilized_divide_op.register_fake
def _(numerator, denominator, epsilon, scale, sign_reference, sign, factor=None,
      denominator_bias=None, numerator_addend=None):  # fmt: skip
    return torch.empty_like(numerator, memory_format=torch.contiguous_format)


@stabilized_divide_op.register_kernel(("cpu", "cuda"))
def stabilized_divide_kernel(
    numerator, denominator, epsilon, scale, sign_reference, sign, factor=None,
    denominator_bias=None, numerator_addend=None,
):  # fmt: skip
    _check_sign(sign_reference, sign)
    args = (numerator, denominator, epsilon, scale, sign_reference, sign, factor,
            denominator_bias, numerator_addend)  # fmt: skip
    _refuse_other_operands(*args)
    same_dtype = all(
        t is None or t.dtype == numerator.dtype
        for t in (denominator, sign_reference, factor, denominator_bias, numerator_addend)
    )
    if not same_dtype or not _native.runs_native(numerator):
        return stabilized_divide_reference(*args)
    return _stabilized_divide_native(*args)


def stabilized_divide_into(
    out: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    epsilon: float,
    scale: float = 1.0,
    sign_reference: Tensor | None = None,
    sign: int = 1,
    factor: Tensor | None = None,
    denominator_bias: Tensor | None = None,
) -> Tensor | None:
    """The native kernel writing into ``out`` (``numerator`` itself may be it: every element is
    read before it is written, by the same thread), or None where the native kernel would not run
    (the caller then takes the op, which allocates). For the engine's own tensors in eager mode
    (``ops._backend.calls_kernels_directly``): a relevance coefficient that nothing reads after
    its division donates its memory to the division's result (``_layer_rules.divide_fast``)."""
    operands = (numerator, denominator, sign_reference, factor)
    if not (
        out.is_contiguous()
        and all(t is None or (t.dtype == out.dtype and t.shape == out.shape) for t in operands)
        and (denominator_bias is None or denominator_bias.dtype == out.dtype)
        and _native.runs_native(numerator)
    ):
        return None
    return _stabilized_divide_native(
        numerator,
        denominator,
        epsilon,
        scale,
        sign_reference,
        sign,
        factor,
        denominator_bias,
        out=out,
    )


def _refuse_other_operands(
    numerator, denominator, epsilon, scale, sign_reference, sign, factor, denominator_bias,
    numerator_addend,
):  # fmt: skip
    refuse_other_shapes(
        "relprop::stabilized_divide", ("numerator", numerator), denominator=denominator,
        sign_reference=sign_reference, factor=factor, numerator_addend=numerator_addend,
    )  # fmt: skip
    if denominator_bias is not None and (
        numerator.dim() < 2 or denominator_bias.shape != (numerator.shape[1],)
    ):
        check_channel_bias(
            "relprop::stabilized_divide", "denominator_bias", denominator_bias, numerator
        )


# ---------------------------------------------------------------------------------------------
# Public wrapper: what the engine calls.


def stabilized_divide(
    numerator: Tensor,
    denominator: Tensor,
    epsilon: float,
    scale: float = 1.0,
    sign_reference: Tensor | None = None,
    sign: int = 1,
    factor: Tensor | None = None,
    denominator_bias: Tensor | None = None,
    numerator_addend: Tensor | None = None,
) -> Tensor:
    """Stabilised, optionally sign-masked and scaled division in one pass.

    ``out = scale · numerator / stab(denominator, ε)`` with
    ``stab(d, e) = d + e·(sign(d) + [d = 0])`` (zero, ``-0.0`` included, counts as positive;
    Zennit's stabiliser), and ``out = 0`` exactly where ``stab(denominator, ε) = 0``, which for
    ε ≥ 0 happens only with ε = 0 and a zero denominator. With ``sign_reference``, ``out = 0``
    exactly wherever ``sign · sign_reference > 0`` fails: the γ rule's ``[z > 0]·R / stab(z⁺, ε)``
    is ``stabilized_divide(R, zpos, ε, sign_reference=z, sign=1)``, α-β's ``−β·R / stab(z_n, ε)``
    is ``stabilized_divide(R, zn, ε, scale=-beta)``.

    Parameters
    ----------
    numerator : Tensor
        ``R``, floating point.
    denominator : Tensor
        ``z``, same shape, dtype and device as ``numerator``.
    epsilon : float
        ``ε``; 0 gives the unstabilised division with 0 for zero denominators.
    scale : float, optional
        Factor applied to the numerator before the division (α, −β).
    sign_reference : Tensor or None, optional
        Tensor whose sign selects the entries that survive (same shape, dtype and device).
    sign : int, optional
        +1 keeps entries where ``sign_reference > 0``, −1 where ``sign_reference < 0``; ignored
        without a reference.
    factor : Tensor or None, optional
        Multiplies the numerator inside the same pass (same shape, dtype and device):
        ``scale · (numerator · factor) / stab(denominator, ε)``.
    denominator_bias : Tensor or None, optional
        Shape ``(C,)`` for operands ``(N, C, *rest)``, their dtype and device: added to the
        denominator along dim 1 inside the same pass (in the compute dtype, before the
        stabiliser), ``stab(denominator + bias, ε)``.
    numerator_addend : Tensor or None, optional
        Added to the numerator inside the same pass (same shape, dtype and device; in the
        compute dtype, before the factor's product): ``scale · ((numerator + addend) · factor)
        / stab(...)``.

    Returns
    -------
    Tensor
        Contiguous, shaped like ``numerator``, of its dtype. float16 and bfloat16 are computed in
        float32 and rounded once.

    Raises
    ------
    ValueError
        Shapes, dtypes or devices differ, ``denominator_bias`` has not one value per channel, or
        ``sign`` is not ±1 with a reference.
    """
    check_elementwise_arguments(
        "stabilized_divide",
        ("numerator", numerator),
        denominator=denominator,
        sign_reference=sign_reference,
        factor=factor,
        numerator_addend=numerator_addend,
    )
    check_channel_bias("stabilized_divide", "denominator_bias", denominator_bias, numerator)
    _check_sign(sign_reference, sign)
    return stabilized_divide_op(
        numerator, denominator, float(epsilon), float(scale), sign_reference, int(sign), factor,
        denominator_bias, numerator_addend,
    )  # fmt: skip
