"""Relevance ops of 2-D convolutions: ``relprop::conv2d_forward`` and ``relprop::conv2d_relevance``.

The maths of every rule is in ``_layer_rules.py`` (docs/ops.md); this file supplies the
convolution map and its transpose (the gradient of the convolution with respect to its input)
and registers the ops with ``torch.library``: the plain-PyTorch reference as the default for any
device, the fast composition on CPU (oneDNN convolutions, several weight sets per call), the
fused Triton implicit-GEMM kernel on CUDA. 1-D convolutions run as 2-D ones of height 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from relprop.ops import _layer_rules as rules
from relprop.ops._backend import layer_backend

Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]


def _conv_input_grad(x_shape, weight, s, stride, padding, dilation, groups, x=None) -> Tensor:
    # The layer input itself, where it is at hand and contiguous, tells convolution_backward the
    # shape for free; some of its paths (thnn's, taken for 1×1 kernels on one thread) make the
    # input contiguous and would otherwise materialise the zero-stride carrier.
    like_input = x if x is not None and x.is_contiguous() else _shape_carrier(x_shape, s)
    return torch.ops.aten.convolution_backward(
        s,
        like_input,
        weight,
        None,
        stride,
        padding,
        dilation,
        False,
        [0, 0],
        groups,
        [True, False, False],
    )[0]


def _shape_carrier(x_shape, s: Tensor) -> Tensor:
    # convolution_backward only reads the input's shape when no weight gradient is asked for:
    # an expanded zero-stride scalar carries it without allocating an input-sized buffer.
    return s.new_zeros(()).expand(x_shape)


def conv2d_output_shape(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[int, ...]:
    """``(N, O, OH, OW)`` of a 2-D convolution of ``x`` by ``weight``; ``ValueError`` naming the
    mismatch where they do not fit (ranks, channels and groups, a kernel larger than the padded
    input). Shapes only: the references, the map's shape check and the Triton kernels share it."""
    x_shape, weight_shape = tuple(x_shape), tuple(weight_shape)
    if len(x_shape) != 4 or len(weight_shape) != 4:
        raise ValueError(
            f"conv2d takes x (N, C, H, W) and weight (O, C/groups, kh, kw); got {x_shape} and "
            f"{weight_shape}"
        )
    if groups < 1 or x_shape[1] != weight_shape[1] * groups or weight_shape[0] % groups:
        raise ValueError(
            f"channels do not match groups={groups}: x {x_shape}, weight {weight_shape}"
        )
    size = tuple(
        (x_shape[2 + i] + 2 * padding[i] - dilation[i] * (weight_shape[2 + i] - 1) - 1) // stride[i]
        + 1
        for i in range(2)
    )
    if min(size) < 1:
        raise ValueError(
            f"the kernel {weight_shape[2:]} (dilation {list(dilation)}) does not fit the padded "
            f"input {x_shape[2:]} (padding {list(padding)})"
        )
    return (x_shape[0], weight_shape[0], *size)


@lru_cache(maxsize=256)
def conv_map(stride, padding, dilation, groups: int) -> rules.LinearMap:
    """The convolution with this geometry as a :class:`~relprop.ops._layer_rules.LinearMap`."""

    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    def transpose(s: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        return _conv_input_grad(x.shape, weight, s, stride, padding, dilation, groups, x)

    def flat_relevance(x: Tensor, weight: Tensor, relevance: Tensor, eps: float) -> Tensor:
        # All-ones weights: every output channel of a group has the same denominator (the
        # receptive field's size inside the image), and Wᵀs needs s summed over each group's
        # output channels only: the group's relevance summed, then divided once.
        n, c, h, w = x.shape
        out_channels, in_per_group, kh, kw = weight.shape
        # Counted in float32 at least: a 16-bit count is inexact above 256 terms.
        count_dtype = rules.COMPUTE_DTYPES.get(x.dtype, x.dtype)
        count = F.conv2d(
            x.new_ones((1, in_per_group, h, w), dtype=count_dtype),
            x.new_ones((1, in_per_group, kh, kw), dtype=count_dtype),
            None,
            stride,
            padding,
            dilation,
        )
        grouped = relevance.reshape(n, groups, out_channels // groups, *relevance.shape[2:])
        share = rules.flat_share(grouped, 2, count.unsqueeze(1), eps).squeeze(2)
        spread = _conv_input_grad(
            (n, groups, h, w),
            x.new_ones((groups, 1, kh, kw)),
            share,
            stride,
            padding,
            dilation,
            groups,
        )
        return (
            spread.unsqueeze(2)
            .expand(n, groups, c // groups, h, w)
            .reshape(n, c, h, w)
            .contiguous()
        )

    def output_shape(x_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        return conv2d_output_shape(x_shape, weight_shape, stride, padding, dilation, groups)

    return rules.LinearMap(
        forward,
        transpose,
        flat_relevance,
        stacks_weights=groups == 1,
        output_shape=output_shape,
        bias_after_product=True,
    )


def geometry_map(stride, padding, dilation, groups) -> rules.LinearMap:
    """:func:`conv_map` for a geometry given as any int sequences (an op's arguments, a plan's
    lists)."""
    return conv_map(tuple(stride), tuple(padding), tuple(dilation), int(groups))


def conv2d_forward_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
    rule: str,
    params: Sequence[float],
) -> list[Tensor]:
    """Reference ``[z, *aux]`` of a convolution under ``rule`` (docs/ops.md)."""
    lin = geometry_map(stride, padding, dilation, groups)
    return rules.forward_reference(lin, x, weight, bias, rule, params)


def conv2d_relevance_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    saved: Sequence[Tensor],
    relevance: Tensor,
    stride,
    padding,
    dilation,
    groups: int,
    rule: str,
    params: Sequence[float],
    relevance_factor: Tensor | None = None,
    times_input: bool = True,
) -> Tensor:
    """Reference relevance of a convolution's input under ``rule`` (docs/ops.md)."""
    lin = geometry_map(stride, padding, dilation, groups)
    return rules.relevance_reference(
        lin, x, weight, bias, saved, relevance, rule, params, relevance_factor, times_input
    )


def _triton_kernels():
    from relprop._kernels.triton import conv as kernel

    return kernel


@torch.library.custom_op(
    "relprop::conv2d_forward",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups, str rule, float[] params) -> Tensor[]"
    ),
)
def conv2d_forward(x, weight, bias, stride, padding, dilation, groups, rule, params):
    return conv2d_forward_reference(
        x, weight, bias, stride, padding, dilation, groups, rule, params
    )


@torch.library.custom_op(
    "relprop::conv2d_relevance",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, Tensor[] saved, Tensor relevance, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, str rule, float[] params, "
        "Tensor? relevance_factor=None, bool times_input=True) -> Tensor"
    ),
)
def conv2d_relevance(
    x, weight, bias, saved, relevance, stride, padding, dilation, groups, rule, params,
    relevance_factor=None, times_input=True,
):  # fmt: skip
    return conv2d_relevance_reference(
        x, weight, bias, saved, relevance, stride, padding, dilation, groups, rule, params,
        relevance_factor, times_input,
    )  # fmt: skip


@conv2d_forward.register_kernel(("cpu", "cuda"))
def forward_kernel(x, weight, bias, stride, padding, dilation, groups, rule, params):
    def triton_forward():
        geometry = (list(stride), list(padding), list(dilation), groups)
        launch = _triton_kernels().conv2d_forward
        return lambda x, w, b, rule, params: launch(x, w, b, *geometry, rule, params)

    return rules.forward_by_backend(
        geometry_map(stride, padding, dilation, groups),
        triton_forward,
        layer_backend(),
        x,
        weight,
        bias,
        rule,
        params,
    )


@conv2d_relevance.register_kernel(("cpu", "cuda"))
def relevance_kernel(
    x, weight, bias, saved, relevance, stride, padding, dilation, groups, rule, params,
    relevance_factor=None, times_input=True,
):  # fmt: skip
    def triton_relevance():
        geometry = (list(stride), list(padding), list(dilation), groups)
        launch = _triton_kernels().conv2d_relevance
        return lambda x, w, b, saved, r, rule, params: launch(
            x, w, b, saved, r, *geometry, rule, params
        )

    return rules.relevance_by_backend(
        geometry_map(stride, padding, dilation, groups),
        triton_relevance,
        layer_backend(),
        x,
        weight,
        bias,
        saved,
        relevance,
        rule,
        params,
        relevance_factor,
        times_input,
    )


@conv2d_forward.register_fake
def _conv2d_forward_fake(x, weight, bias, stride, padding, dilation, groups, rule, params):
    size = [
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i]
        + 1
        for i in range(2)
    ]
    z = x.new_empty((x.shape[0], weight.shape[0], *size))
    return rules.fake_forward(z, rule, params)


@conv2d_relevance.register_fake
def _conv2d_relevance_fake(
    x, weight, bias, saved, relevance, stride, padding, dilation, groups, rule, params,
    relevance_factor=None, times_input=True,
):  # fmt: skip
    return torch.empty_like(x)
