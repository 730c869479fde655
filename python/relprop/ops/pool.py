"""Relevance of pooling layers: winner-takes-all for max pools, the z-rule for average pools.

Four ``torch.library`` ops (docs/ops.md), each with a plain-PyTorch reference that is the
``default`` for any device, a native CPU kernel (``csrc/cpu/pool.cpp``) and a CUDA kernel
(``kernels/cuda/pool.cu``) reached through ``relprop._C``:

``relprop::max_pool_relevance(Tensor relevance, Tensor indices, SymInt[] input_size, int[]? offset_bounds=None) -> Tensor``
    ``R_in[n, c, i] = Σ_{o : idx[n, c, o] = i} R[n, c, o]``: all relevance of a window goes to
    the position the forward picked (Montavon et al., "Layer-Wise Relevance Propagation: An
    Overview", 2019). Takes the indices of ``max_pool{1,2}d`` and ``adaptive_max_pool{1,2}d``.
    ``offset_bounds`` (:func:`max_pool_offset_bounds`, from a regular pool's window) spares the
    CUDA kernel the pass that measures where the winners can be; the other paths ignore it.
``relprop::max_pool_divided_relevance(Tensor relevance, Tensor indices, Tensor denominator, float epsilon, Tensor? factor=None, Tensor? sign_reference=None, Tensor? denominator_bias=None, int[]? offset_bounds=None, Tensor? numerator_addend=None, SymInt[]? input_size=None) -> Tensor``
    The same winner-takes-all of shares ``(R[o] + a[o])·f[o] / stab(d[idx[o]] + b, ε)`` (or
    ``d[o]``): the division of the layer under the pool, at the pool's winners, and the spread in
    one pass (:func:`max_pool_divided_relevance`).
``relprop::avg_pool2d_relevance`` and ``relprop::adaptive_avg_pool2d_relevance``
    ``R_in = x · Pᵀ(R / stab(P x, e))`` with ``P`` the pooling and
    ``stab(d, e) = d + e·(sign(d) + [d = 0])``: the z-rule of Bach et al., "On Pixel-Wise
    Explanations for Non-Linear Classifier Decisions by Layer-Wise Relevance Propagation",
    PLoS ONE 2015 (Zennit's ``Norm``).

The engine calls the public wrappers :func:`max_pool_relevance`, :func:`avg_pool_relevance` and
:func:`adaptive_avg_pool_relevance`, which also take 1-D pools (as height-1 images). The native
kernels sum in a fixed order, so repeated runs give bitwise-equal relevance.

``RELPROP_BACKEND=reference`` runs the references everywhere; ``native`` runs ``relprop._C`` and
raises if it cannot; unset or ``triton`` (pooling has no Triton kernel), ``relprop._C`` runs where
it loaded and the references run elsewhere, after one warning.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from relprop import _native
from relprop.ops._backend import call_op
from relprop.ops._layer_rules import divide, times_factor
from relprop.ops.elementwise import stabilized_divide_reference

IntOrPair = Union[int, Sequence[int]]


def _pair(value: IntOrPair) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    values = [int(v) for v in value]
    if len(values) == 1:
        return values * 2
    if len(values) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {value!r}")
    return values


# ---------------------------------------------------------------------------------------------
# References: plain PyTorch, any device, the truth the kernels are tested against.


def max_pool_relevance_reference(
    relevance: Tensor, indices: Tensor, input_size: Sequence[int]
) -> Tensor:
    """Winner-takes-all relevance, ``(N, C, *input_size)``, by a scatter-add onto the indices."""
    # scatter_add_ takes an index smaller than its source; the fast paths refuse that too.
    if relevance.shape != indices.shape or relevance.dim() != 2 + len(input_size):
        raise ValueError(
            f"max_pool_relevance: relevance {tuple(relevance.shape)} and indices "
            f"{tuple(indices.shape)} must both be (N, C, *out), out with as many dimensions as "
            f"the input size {tuple(input_size)}"
        )
    batch, channels = relevance.shape[:2]
    plane = 1
    for size in input_size:
        plane *= size
    out = relevance.new_zeros((batch, channels, plane))
    out.scatter_add_(
        2, indices.reshape(batch, channels, -1), relevance.reshape(batch, channels, -1)
    )
    return out.reshape(batch, channels, *input_size)


def max_pool_divided_relevance_reference(
    relevance: Tensor,
    indices: Tensor,
    denominator: Tensor,
    epsilon: float,
    factor: Tensor | None = None,
    sign_reference: Tensor | None = None,
    denominator_bias: Tensor | None = None,
    numerator_addend: Tensor | None = None,
    input_size: Sequence[int] | None = None,
) -> Tensor:
    """The division at the winners, then the spread, as torch steps: the denominator read at the
    winners (unless ``input_size`` says it is the pool's output's), ``stabilized_divide``'s
    reference at the pool's output size, and :func:`max_pool_relevance_reference`."""
    if input_size is None:
        at_winners, input_size = gather_winners(denominator, indices), denominator.shape[2:]
    else:
        at_winners = denominator
    shares = stabilized_divide_reference(
        relevance, at_winners, epsilon, 1.0, sign_reference, 1, factor, denominator_bias,
        numerator_addend,
    )  # fmt: skip
    return max_pool_relevance_reference(shares, indices, input_size)


def avg_pool2d_relevance_reference(
    x: Tensor,
    relevance: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
    stabilizer: float,
) -> Tensor:
    """z-rule relevance of ``avg_pool2d``: ``x · Pᵀ(R / stab(P x, e))``."""
    z = F.avg_pool2d(
        x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )
    _check_relevance_shape(relevance, z.shape, "avg_pool2d_relevance")
    share = divide(relevance, z, stabilizer)
    spread = torch.ops.aten.avg_pool2d_backward(
        share, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )
    return times_factor(spread, x)


def adaptive_avg_pool2d_relevance_reference(
    x: Tensor, relevance: Tensor, output_size: Sequence[int], stabilizer: float
) -> Tensor:
    """z-rule relevance of ``adaptive_avg_pool2d``: ``x · Pᵀ(R / stab(P x, e))``."""
    z = F.adaptive_avg_pool2d(x, output_size)
    _check_relevance_shape(relevance, z.shape, "adaptive_avg_pool2d_relevance")
    share = divide(relevance, z, stabilizer)
    return times_factor(torch.ops.aten._adaptive_avg_pool2d_backward(share, x), x)


# ---------------------------------------------------------------------------------------------
# Native path (relprop._C): the CPU twins and the CUDA kernels, chosen by _native.runs_native.


def _as_planes(t: Tensor) -> Tensor:
    """A 4-D (N, C, H, W) view; 1-D pools arrive as (N, C, L) and become height-1 images."""
    return t.unsqueeze(2) if t.dim() == 3 else t


def _planes(x4: Tensor, r4: Tensor) -> _native.Planes:
    return _native.Planes(*x4.shape, *r4.shape[2:])


@functools.lru_cache(maxsize=256)
def _side_offset_bounds(
    in_size: int, out_size: int, kernel: int, stride: int, padding: int, dilation: int
) -> tuple[int, int]:
    """The range of ``w − ⌊o·in/out⌋`` over every output ``o`` and every position ``w`` its window
    can pick along one side: ``w`` in ``[o·s − p, o·s − p + (k − 1)·d]``, clipped to the input (a
    max pool never picks padding)."""
    low, high = None, None
    for o in range(out_size):
        nominal = (o * in_size) // out_size
        first = max(o * stride - padding, 0)
        last = min(o * stride - padding + (kernel - 1) * dilation, in_size - 1)
        low = first - nominal if low is None else min(low, first - nominal)
        high = last - nominal if high is None else max(high, last - nominal)
    return (0, 0) if low is None else (low, high)


def max_pool_offset_bounds(
    input_size: Sequence[int],
    output_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> list[int]:
    """``[row_min, row_max, col_min, col_max]``: where a regular max pool's winners can lie,
    as offsets from their outputs' nominal positions ``⌊o·in/out⌋`` (the CUDA gather's
    coordinates). Every winner lies in its window, so these contain the offsets the kernel would
    otherwise measure (wider costs scans, never results). 1-D pools are height-1 images."""
    geometry = [input_size, output_size, kernel_size, stride, padding, dilation]
    sides = [
        _side_offset_bounds(*(int(values[i]) for values in geometry))
        for i in range(len(input_size))
    ]
    rows, cols = ((0, 0), sides[0]) if len(sides) == 1 else sides
    return [*rows, *cols]


def _max_pool_gather(
    name: str,
    relevance: Tensor,
    indices: Tensor,
    input_size: Sequence[int],
    offset_bounds: Sequence[int] | None,
    **operands,
) -> Tensor:
    """Run ``relprop._C``'s ``{name}_cpu`` or ``{name}_cuda`` (a max pool's winner-takes-all,
    its relevance contiguous) with ``operands`` besides relevance, indices and the output; the
    output ``(N, C, *input_size)``."""
    r4 = _as_planes(relevance)
    i4 = _as_planes(indices.to(torch.int64))
    in_h, in_w = (1, *input_size) if len(input_size) == 1 else input_size
    out = torch.empty(
        (r4.shape[0], r4.shape[1], in_h, in_w), dtype=relevance.dtype, device=relevance.device
    )
    args = {
        "shape": _planes(out, r4),
        "relevance": _native.pointer(r4),
        "relevance_strides": _native.strides4(r4),
        "indices": _native.pointer(i4),
        "indices_strides": _native.strides4(i4),
        "out": _native.pointer(out),
        **operands,
    }
    module = _native.native()
    if _native.on_cuda(relevance):
        # Four int32: the range of the winners' offsets from their windows (see pool.cu),
        # measured on the device where the pool's geometry did not give it.
        workspace = (
            torch.empty(4, dtype=torch.int32, device=relevance.device)
            if not offset_bounds
            else None
        )
        getattr(module, f"{name}_cuda")(
            dtype=_native.dtype_code(relevance, _native.CUDA_DTYPES),
            workspace=0 if workspace is None else _native.pointer(workspace),
            offset_bounds=[int(b) for b in offset_bounds or ()],
            **_native.cuda_launch_args(relevance),
            **args,
        )
    else:
        getattr(module, f"{name}_cpu")(
            dtype=_native.dtype_code(relevance, _native.CPU_DTYPES), **args
        )
    return out.view(relevance.shape[0], relevance.shape[1], *input_size)


def _max_pool_native(
    relevance: Tensor,
    indices: Tensor,
    input_size: Sequence[int],
    offset_bounds: Sequence[int] | None = None,
) -> Tensor:
    return _max_pool_gather("max_pool_relevance", relevance, indices, input_size, offset_bounds)


def _max_pool_divided_native(
    relevance: Tensor,
    indices: Tensor,
    denominator: Tensor,
    epsilon: float,
    factor: Tensor | None,
    sign_reference: Tensor | None,
    denominator_bias: Tensor | None,
    offset_bounds: Sequence[int] | None,
    numerator_addend: Tensor | None,
    input_size: Sequence[int] | None,
) -> Tensor:
    # The pool-size operands share the relevance's strides: all contiguous (copies, where they
    # were not, held here until the kernel has run).
    denominator = denominator.contiguous()
    addend, factor, sign_reference, denominator_bias = (
        None if t is None else t.contiguous()
        for t in (numerator_addend, factor, sign_reference, denominator_bias)
    )

    def optional(t: Tensor | None) -> int:
        return 0 if t is None else _native.pointer(t)

    return _max_pool_gather(
        "max_pool_divided_relevance", relevance.contiguous(), indices,
        denominator.shape[2:] if input_size is None else list(input_size), offset_bounds,
        addend=optional(addend), factor=optional(factor),
        sign_reference=optional(sign_reference), denominator=_native.pointer(denominator),
        denominator_bias=optional(denominator_bias), denominator_at_outputs=input_size is not None,
        epsilon=float(epsilon),
    )  # fmt: skip


def _avg_native(x: Tensor, relevance: Tensor, stabilizer: float, cpu_entry, cuda_entry, **geometry):
    x4, r4 = _as_planes(x), _as_planes(relevance)
    out = torch.empty(x4.shape, dtype=x.dtype, device=x.device)
    args = dict(
        shape=_planes(x4, r4),
        x=_native.pointer(x4),
        x_strides=_native.strides4(x4),
        relevance=_native.pointer(r4),
        relevance_strides=_native.strides4(r4),
        stabilizer=float(stabilizer),
        out=_native.pointer(out),
        **geometry,
    )
    if _native.on_cuda(x):
        # One share R / stab(z) / divisor per output, in the kernels' accumulation type.
        share_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        workspace = torch.empty(r4.numel(), dtype=share_dtype, device=x.device)
        cuda_entry(
            dtype=_native.dtype_code(x, _native.CUDA_DTYPES),
            workspace=_native.pointer(workspace),
            **_native.cuda_launch_args(x),
            **args,
        )
    else:
        cpu_entry(dtype=_native.dtype_code(x, _native.CPU_DTYPES), **args)
    return out.view(x.shape)


# ---------------------------------------------------------------------------------------------
# torch.library ops. The decorated function is the `default` kernel (any device); the `cpu` and
# `cuda` kernels take the native path when they can.


@torch.library.custom_op(
    "relprop::max_pool_relevance",
    mutates_args=(),
    schema=(
        "(Tensor relevance, Tensor indices, SymInt[] input_size, int[]? offset_bounds=None) "
        "-> Tensor"
    ),
)
def max_pool_relevance_op(relevance, indices, input_size, offset_bounds=None):
    return max_pool_relevance_reference(relevance, indices, input_size)


@max_pool_relevance_op.register_fake
def _(relevance, indices, input_size, offset_bounds=None):
    return relevance.new_empty((relevance.shape[0], relevance.shape[1], *input_size))


@max_pool_relevance_op.register_kernel(("cpu", "cuda"))
def max_pool_relevance_kernel(relevance, indices, input_size, offset_bounds=None):
    if not _native.runs_native(relevance) or len(input_size) not in (1, 2):
        return max_pool_relevance_reference(relevance, indices, input_size)
    return _max_pool_native(relevance, indices, input_size, offset_bounds)


@torch.library.custom_op(
    "relprop::max_pool_divided_relevance",
    mutates_args=(),
    schema=(
        "(Tensor relevance, Tensor indices, Tensor denominator, float epsilon, "
        "Tensor? factor=None, Tensor? sign_reference=None, Tensor? denominator_bias=None, "
        "int[]? offset_bounds=None, Tensor? numerator_addend=None, SymInt[]? input_size=None) "
        "-> Tensor"
    ),
)
def max_pool_divided_relevance_op(
    relevance, indices, denominator, epsilon, factor=None, sign_reference=None,
    denominator_bias=None, offset_bounds=None, numerator_addend=None, input_size=None,
):  # fmt: skip
    return max_pool_divided_relevance_reference(
        relevance, indices, denominator, epsilon, factor, sign_reference, denominator_bias,
        numerator_addend, input_size,
    )  # fmt: skip


@max_pool_divided_relevance_op.register_fake
def _(relevance, indices, denominator, epsilon, factor=None, sign_reference=None,
      denominator_bias=None, offset_bounds=None, numerator_addend=None,
      input_size=None):  # fmt: skip
    size = denominator.shape[2:] if input_size is None else input_size
    return relevance.new_empty((relevance.shape[0], relevance.shape[1], *size))


@max_pool_divided_relevance_op.register_kernel(("cpu", "cuda"))
def max_pool_divided_relevance_kernel(
    relevance, indices, denominator, epsilon, factor=None, sign_reference=None,
    denominator_bias=None, offset_bounds=None, numerator_addend=None, input_size=None,
):  # fmt: skip
    if not _native.runs_native(relevance) or relevance.dim() not in (3, 4):
        return max_pool_divided_relevance_reference(
            relevance, indices, denominator, epsilon, factor, sign_reference, denominator_bias,
            numerator_addend, input_size,
        )  # fmt: skip
    return _max_pool_divided_native(
        relevance, indices, denominator, epsilon, factor, sign_reference, denominator_bias,
        offset_bounds, numerator_addend, input_size,
    )  # fmt: skip


@torch.library.custom_op(
    "relprop::avg_pool2d_relevance",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor relevance, int[2] kernel_size, int[2] stride, int[2] padding, "
        "bool ceil_mode, bool count_include_pad, int? divisor_override, float stabilizer) -> Tensor"
    ),
)
def avg_pool2d_relevance_op(
    x, relevance, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
    stabilizer,
):  # fmt: skip
    return avg_pool2d_relevance_reference(
        x, relevance, kernel_size, stride, padding, ceil_mode, count_include_pad,
        divisor_override, stabilizer,
    )  # fmt: skip


@avg_pool2d_relevance_op.register_fake
def _(x, relevance, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
      stabilizer):  # fmt: skip
    return torch.empty_like(x)


@avg_pool2d_relevance_op.register_kernel(("cpu", "cuda"))
def avg_pool2d_relevance_kernel(x, relevance, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
      stabilizer):  # fmt: skip
    if not _native.runs_native(x) or relevance.dtype != x.dtype:
        return avg_pool2d_relevance_reference(
            x, relevance, kernel_size, stride, padding, ceil_mode, count_include_pad,
            divisor_override, stabilizer,
        )  # fmt: skip
    module = _native.native()
    # ceil_mode only decides the output size, which the kernels read off the relevance.
    return _avg_native(
        x,
        relevance,
        stabilizer,
        module.avg_pool2d_relevance_cpu,
        getattr(module, "avg_pool2d_relevance_cuda", None),
        kernel_size=tuple(kernel_size),
        stride=tuple(stride),
        padding=tuple(padding),
        count_include_pad=bool(count_include_pad),
        divisor_override=int(divisor_override or 0),
    )


@torch.library.custom_op(
    "relprop::adaptive_avg_pool2d_relevance",
    mutates_args=(),
    schema="(Tensor x, Tensor relevance, int[2] output_size, float stabilizer) -> Tensor",
)
def adaptive_avg_pool2d_relevance_op(x, relevance, output_size, stabilizer):
    return adaptive_avg_pool2d_relevance_reference(x, relevance, output_size, stabilizer)


@adaptive_avg_pool2d_relevance_op.register_fake
def _(x, relevance, output_size, stabilizer):
    return torch.empty_like(x)


@adaptive_avg_pool2d_relevance_op.register_kernel(("cpu", "cuda"))
def adaptive_avg_pool2d_relevance_kernel(x, relevance, output_size, stabilizer):
    if not _native.runs_native(x) or relevance.dtype != x.dtype:
        return adaptive_avg_pool2d_relevance_reference(x, relevance, output_size, stabilizer)
    module = _native.native()
    return _avg_native(
        x,
        relevance,
        stabilizer,
        module.adaptive_avg_pool2d_relevance_cpu,
        getattr(module, "adaptive_avg_pool2d_relevance_cuda", None),
    )


# ---------------------------------------------------------------------------------------------
# Public wrappers: what the engine calls.


def _pool_output_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    # The output length of torch's pooling (dilation 1), ceil_mode's last-window rule included.
    numerator = size + 2 * pad - kernel + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _check_relevance_shape(relevance: Tensor, expected: Sequence[int], op: str) -> None:
    if tuple(relevance.shape) != tuple(expected):
        raise ValueError(
            f"{op}: relevance has shape {tuple(relevance.shape)}, but the pooling produces "
            f"{tuple(expected)}"
        )


def max_pool_relevance(
    relevance: Tensor,
    indices: Tensor,
    input_shape: Sequence[int],
    window: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """Winner-takes-all relevance of a max pool's input.

    Parameters
    ----------
    relevance : Tensor
        ``(N, C, *out)``, the relevance of the pool's output (1-D or 2-D).
    indices : Tensor
        The forward's indices, same shape: ``max_pool{1,2}d(..., return_indices=True)`` or
        ``adaptive_max_pool{1,2}d(..., return_indices=True)`` (flat positions in each plane).
    input_shape : sequence of int
        ``(N, C, *in)``, the shape of the pool's input.
    window : (kernel_size, stride, padding, dilation), optional
        A regular pool's window, one entry per pooled side: where the winners can lie follows
        from it (:func:`max_pool_offset_bounds`), which spares the CUDA kernel a pass over the
        indices. Not for adaptive pools. Indices the window does not account for lose relevance
        on CUDA.

    Returns
    -------
    Tensor
        ``R_in`` of shape ``input_shape``: ``R_in[n, c, i] = Σ_{o : idx[n, c, o] = i} R[n, c, o]``.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if relevance.dim() not in (3, 4) or len(input_shape) != relevance.dim():
        raise ValueError(
            f"max_pool_relevance: expected (N, C, L) or (N, C, H, W) relevance matching the input "
            f"rank, got relevance {tuple(relevance.shape)} for input {input_shape}"
        )
    if indices.shape != relevance.shape:
        raise ValueError(
            f"max_pool_relevance: indices {tuple(indices.shape)} and relevance "
            f"{tuple(relevance.shape)} differ in shape"
        )
    bounds = None
    if window is not None:
        bounds = max_pool_offset_bounds(input_shape[2:], relevance.shape[2:], *window)
    return call_op(
        max_pool_relevance_op,
        max_pool_relevance_kernel,
        relevance,
        indices,
        list(input_shape[2:]),
        bounds,
    )


def gather_winners(values: Tensor, indices: Tensor) -> Tensor:
    """``values`` at a max pool's winners: ``out[n, c, o] = values[n, c, idx[n, c, o]]``, the
    transpose of :func:`max_pool_relevance`'s spread (for non-overlapping windows, its inverse
    at the winners).

    Parameters
    ----------
    values : Tensor
        ``(N, C, *in)``, shaped as the pool's input.
    indices : Tensor
        The forward's indices, ``(N, C, *out)`` (flat positions in each plane).

    Returns
    -------
    Tensor
        ``(N, C, *out)``, ``values``' dtype.
    """
    if values.dim() != indices.dim() or values.shape[:2] != indices.shape[:2]:
        raise ValueError(
            f"gather_winners: values {tuple(values.shape)} and indices {tuple(indices.shape)} "
            f"are not of one pool's input and output"
        )
    planes = values.reshape(*values.shape[:2], -1)
    return planes.gather(2, indices.reshape(*indices.shape[:2], -1)).view(indices.shape)


def max_pool_divided_relevance(
    relevance: Tensor,
    indices: Tensor,
    denominator: Tensor,
    epsilon: float,
    factor: Tensor | None = None,
    sign_reference: Tensor | None = None,
    denominator_bias: Tensor | None = None,
    window: Sequence[Sequence[int]] | None = None,
    numerator_addend: Tensor | None = None,
    input_size: Sequence[int] | None = None,
) -> Tensor:
    """Winner-takes-all of shares: the division a layer under a max pool makes, at the pool's
    winners, and the spread, in one pass.

    ``R_in[n, c, i] = Σ_{o : idx[n, c, o] = i} keep · ((R[o] + a[o]) · f[o]) / stab(D + b[c], ε)``
    with ``D = d[n, c, i]`` (``d[n, c, o]`` where ``input_size`` is given),
    ``stab(d, ε) = d + ε·(sign(d) + [d = 0])``, ``keep = stab ≠ 0 ∧ ref[o] > 0`` (the
    reference where given), ``(R + a) · f = 0`` where ``f = 0``: ``relprop::stabilized_divide``
    at the pool's output size with the denominator read at the winners (:func:`gather_winners`),
    followed by :func:`max_pool_relevance`. The layer under the pool divides by a product it
    makes (z⁺: ``W⁺x``, γ: ``(W + γW⁺)x``) that is zero-relevance everywhere but at the
    winners (``graph.layers.Unspread``), or — an ε layer — by its output, which at a winner is
    the pool's output (``graph.layers.Shares``; Montavon et al., "Layer-Wise Relevance
    Propagation: An Overview", 2019, for the rules). Two or three passes — the gather, the
    division, the spread — and their intermediates become one: the kernel runs one thread per
    input, reads its denominator and gathers the shares of the windows it won.

    Parameters
    ----------
    relevance, factor, sign_reference, numerator_addend : Tensor
        ``(N, C, *out)``: the relevance of the pool's output; its factor (the relevance is
        ``(R + a) · f``, unformed), the sign test's reference and a second coefficient reaching
        the same output (``a``), or None.
    indices : Tensor
        The forward's indices, ``(N, C, *out)``.
    denominator : Tensor
        ``(N, C, *in)``, the pool's input size: the layer's pre-activation that divides; with
        ``input_size``, ``(N, C, *out)``: the denominator at each output.
    epsilon : float
        The stabiliser.
    denominator_bias : Tensor, optional
        ``(C,)``, added to the denominator (a bias the product did not add).
    window : (kernel_size, stride, padding, dilation), optional
        A regular pool's window (:func:`max_pool_relevance`).
    input_size : sequence of int, optional
        The pool's input size where ``denominator`` has the output's.

    Returns
    -------
    Tensor
        The shares at the pool's input size (zero but at the winners).
    """
    if indices.shape != relevance.shape or relevance.dim() not in (3, 4):
        raise ValueError(
            f"max_pool_divided_relevance: relevance {tuple(relevance.shape)} and indices "
            f"{tuple(indices.shape)} must both be (N, C, L) or (N, C, H, W)"
        )
    if input_size is not None:
        input_size = [int(v) for v in input_size]
        if denominator.shape != relevance.shape or len(input_size) != relevance.dim() - 2:
            raise ValueError(
                f"max_pool_divided_relevance: with input_size {tuple(input_size)} the "
                f"denominator {tuple(denominator.shape)} is the one at each output: relevance's "
                f"shape {tuple(relevance.shape)}"
            )
    elif denominator.dim() != relevance.dim() or denominator.shape[:2] != relevance.shape[:2]:
        raise ValueError(
            f"max_pool_divided_relevance: denominator {tuple(denominator.shape)} is not of the "
            f"pool's input for relevance {tuple(relevance.shape)}"
        )
    for name, t in (
        ("factor", factor), ("sign_reference", sign_reference),
        ("numerator_addend", numerator_addend),
    ):  # fmt: skip
        if t is not None and t.shape != relevance.shape:
            raise ValueError(
                f"max_pool_divided_relevance: {name} {tuple(t.shape)} differs from relevance "
                f"{tuple(relevance.shape)}"
            )
    if denominator_bias is not None and denominator_bias.shape != (relevance.shape[1],):
        raise ValueError(
            f"max_pool_divided_relevance: denominator_bias {tuple(denominator_bias.shape)} is "
            f"not one value per channel ({relevance.shape[1]})"
        )
    bounds = None
    if window is not None:
        size = denominator.shape[2:] if input_size is None else input_size
        bounds = max_pool_offset_bounds(size, relevance.shape[2:], *window)
    return call_op(
        max_pool_divided_relevance_op, max_pool_divided_relevance_kernel,
        relevance, indices, denominator, float(epsilon), factor, sign_reference,
        denominator_bias, bounds, numerator_addend, input_size,
    )  # fmt: skip


def avg_pool_relevance(
    x: Tensor,
    relevance: Tensor,
    kernel_size: IntOrPair,
    stride: IntOrPair | None = None,
    padding: IntOrPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    stabilizer: float = 1e-6,
) -> Tensor:
    """z-rule relevance of an ``avg_pool1d`` / ``avg_pool2d`` input.

    ``R_in = x · Pᵀ(R / stab(P x, e))``, ``P`` the pooling with these arguments (those of
    ``torch.nn.functional.avg_pool{1,2}d``; ``stride=None`` means ``kernel_size``) and
    ``e = stabilizer``. ``x`` is ``(N, C, L)`` or ``(N, C, H, W)``, ``relevance`` the pool's output
    shape. Returns a tensor shaped like ``x``.
    """
    one_d = x.dim() == 3
    if x.dim() not in (3, 4):
        raise ValueError(f"avg_pool_relevance: expected a 3-D or 4-D input, got {tuple(x.shape)}")
    kernel = _pair(kernel_size)
    strides = (
        kernel if stride is None or (not isinstance(stride, int) and not stride) else _pair(stride)
    )
    pads = _pair(padding)
    if one_d:
        kernel, strides, pads = [1, kernel[-1]], [1, strides[-1]], [0, pads[-1]]
        x, relevance = x.unsqueeze(2), relevance.unsqueeze(2)
    expected = (
        *x.shape[:2],
        *(
            _pool_output_size(x.shape[2 + d], kernel[d], strides[d], pads[d], ceil_mode)
            for d in range(2)
        ),
    )
    _check_relevance_shape(relevance, expected, "avg_pool_relevance")
    out = call_op(
        avg_pool2d_relevance_op, avg_pool2d_relevance_kernel,
        x, relevance, kernel, strides, pads, bool(ceil_mode), bool(count_include_pad),
        divisor_override, float(stabilizer),
    )  # fmt: skip
    return out.squeeze(2) if one_d else out


def adaptive_avg_pool_relevance(
    x: Tensor,
    relevance: Tensor,
    output_size: int | Sequence[int | None] | None,
    stabilizer: float = 1e-6,
) -> Tensor:
    """z-rule relevance of an ``adaptive_avg_pool1d`` / ``adaptive_avg_pool2d`` input.

    ``R_in = x · Pᵀ(R / stab(P x, e))``, ``P`` the adaptive average pooling to ``output_size``
    (``None`` entries keep the input size, as in torch). ``x`` is ``(N, C, L)`` or
    ``(N, C, H, W)``. Returns a tensor shaped like ``x``.
    """
    one_d = x.dim() == 3
    if x.dim() not in (3, 4):
        raise ValueError(
            f"adaptive_avg_pool_relevance: expected a 3-D or 4-D input, got {tuple(x.shape)}"
        )
    spatial = x.shape[2:]
    if output_size is None or isinstance(output_size, int):
        sizes = [output_size] * len(spatial)
    else:
        sizes = list(output_size)
        if len(sizes) == 1 and len(spatial) == 2:
            sizes = sizes * 2
    resolved = [int(s if s is not None else full) for s, full in zip(sizes, spatial)]
    if one_d:
        resolved = [1, resolved[0]]
        x, relevance = x.unsqueeze(2), relevance.unsqueeze(2)
    _check_relevance_shape(relevance, (*x.shape[:2], *resolved), "adaptive_avg_pool_relevance")
    out = call_op(
        adaptive_avg_pool2d_relevance_op, adaptive_avg_pool2d_relevance_kernel,
        x, relevance, resolved, float(stabilizer),
    )  # fmt: skip
    return out.squeeze(2) if one_d else out
