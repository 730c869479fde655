"""Relevance ops of dense layers: ``relprop::linear_forward`` and ``relprop::linear_relevance``.

The maths of every rule is in ``_layer_rules.py`` (docs/ops.md); this file supplies the dense
map ``x ↦ xWᵀ + b`` and registers the ops with ``torch.library``: the plain-PyTorch reference as
the default for any device, the fast composition on CPU, the fused Triton kernel on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from relprop.ops import _layer_rules as rules
from relprop.ops._backend import layer_backend


def _transpose(s: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    return s @ weight


def _flat_relevance(x: Tensor, weight: Tensor, relevance: Tensor, eps: float) -> Tensor:
    # Every output has the same denominator (the fan-in) and Wᵀs = Σ_j s_j for every input.
    dtype = rules.COMPUTE_DTYPES.get(relevance.dtype, relevance.dtype)
    fan_in = torch.full((), float(weight.shape[1]), dtype=dtype, device=relevance.device)
    share = rules.flat_share(relevance, -1, fan_in, eps)
    return share.expand(*relevance.shape[:-1], x.shape[-1]).contiguous()


def _output_shape(x_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(weight_shape) != 2 or not x_shape or x_shape[-1] != weight_shape[1]:
        raise ValueError(
            f"linear takes x (..., in) and weight (out, in); got {x_shape} and {weight_shape}"
        )
    return (*x_shape[:-1], weight_shape[0])


DENSE_MAP = rules.LinearMap(
    forward=F.linear,
    transpose=_transpose,
    flat_relevance=_flat_relevance,
    stacks_weights=True,
    output_shape=_output_shape,
)


def linear_forward_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, rule: str, params: Sequence[float]
) -> list[Tensor]:
    """Reference ``[z, *aux]`` of a dense layer under ``rule`` (docs/ops.md)."""
    return rules.forward_reference(DENSE_MAP, x, weight, bias, rule, params)


def linear_relevance_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    saved: Sequence[Tensor],
    relevance: Tensor,
    rule: str,
    params: Sequence[float],
    relevance_factor: Tensor | None = None,
    times_input: bool = True,
) -> Tensor:
    """Reference relevance of a dense layer's input under ``rule`` (docs/ops.md)."""
    return rules.relevance_reference(
        DENSE_MAP, x, weight, bias, saved, relevance, rule, params, relevance_factor, times_input
    )


def _triton_forward():
    from relprop._kernels.triton.linear import linear_forward as kernel

    return kernel


def _triton_relevance():
    from relprop._kernels.triton.linear import linear_relevance as kernel

    return kernel


@torch.library.custom_op(
    "relprop::linear_forward",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, str rule, float[] params) -> Tensor[]",
)
def linear_forward(x, weight, bias, rule, params):
    return linear_forward_reference(x, weight, bias, rule, params)


@torch.library.custom_op(
    "relprop::linear_relevance",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, Tensor[] saved, Tensor relevance, str rule, "
        "float[] params, Tensor? relevance_factor=None, bool times_input=True) -> Tensor"
    ),
)
def linear_relevance(
    x, weight, bias, saved, relevance, rule, params, relevance_factor=None, times_input=True
):
    return linear_relevance_reference(
        x, weight, bias, saved, relevance, rule, params, relevance_factor, times_input
    )


@linear_forward.register_kernel(("cpu", "cuda"))
def forward_kernel(x, weight, bias, rule, params):
    return rules.forward_by_backend(
        DENSE_MAP, _triton_forward, layer_backend(), x, weight, bias, rule, params
    )


@linear_relevance.register_kernel(("cpu", "cuda"))
def relevance_kernel(
    x, weight, bias, saved, relevance, rule, params, relevance_factor=None, times_input=True
):
    return rules.relevance_by_backend(
        DENSE_MAP, _triton_relevance, layer_backend(), x, weight, bias, saved, relevance, rule,
        params, relevance_factor, times_input,
    )  # fmt: skip


@linear_forward.register_fake
def _linear_forward_fake(x, weight, bias, rule, params):
    return rules.fake_forward(x.new_empty((*x.shape[:-1], weight.shape[0])), rule, params)


@linear_relevance.register_fake
def _linear_relevance_fake(
    x, weight, bias, saved, relevance, rule, params, relevance_factor=None, times_input=True
):
    return torch.empty_like(x)
