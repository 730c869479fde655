"""Fused LRP kernels for a linear layer ``z = x Wᵀ + b``.

``linear_forward`` computes z and the rule's modified pre-activations in one pass over x and W
(one accumulator each, modified weights formed in registers). ``linear_relevance`` computes
``s = R / stab(·)`` while loading the operand of the transposed GEMM ``s W`` and multiplies by
x (or x⁺/x⁻, or the zB bounds) before storing: one kernel, no intermediate in memory. The maths
is the op contract in ``docs/ops.md``; the rules follow Zennit 0.5 (Anders et al., 2021) and
Montavon et al., "Layer-Wise Relevance Propagation: An Overview" (2019).
"""

# No ``from __future__ import annotations`` here: Triton 3.0's interpreter recognises a
# ``tl.constexpr`` parameter only by its evaluated annotation, not by the string it would become.
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    FLAT,
    WSQUARE,
    RuleSpec,
    _denominator_accumulate,
    _forward_accumulate,
    _forward_epilogue,
    _load_ones,
    _relevance_accumulate,
    _relevance_epilogue,
    _relevance_scales,
    check_tensors,
    dot_precision,
    has_negative,
    is_interpreted,
    parse_rule,
    product_kind,
    reduction_chunk,
    relevance_streams,
    single_one,
)


@triton.jit
def _forward_operands(
    x_ptr, w_ptr, rows, mask_m, offs_o, mask_o, k0, IN,
    RULE: tl.constexpr, DENOMINATOR: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The x (BLOCK_M × BLOCK_K) and W (BLOCK_K × BLOCK_O) tiles of inputs ``k0 …``, and where
    x is real (in range)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < IN
    valid = mask_m[:, None] & mask_k[None, :]
    if DENOMINATOR and RULE == FLAT:
        w = _load_ones(w_ptr, mask_k[:, None] & mask_o[None, :])
    else:
        w = tl.load(
            w_ptr + offs_o[None, :] * IN + offs_k[:, None],
            mask=mask_k[:, None] & mask_o[None, :],
            other=0.0,
        )
    # With DENOMINATOR, x is a row of ones (the host's).
    x = tl.load(x_ptr + rows[:, None] * IN + offs_k[None, :], mask=valid, other=0.0)
    return x, w, valid


@triton.jit
def _forward_range_sum(
    acc0, acc1, acc2, k_begin, k_end,
    x_ptr, w_ptr, rows, mask_m, offs_o, mask_o, IN, p0, p1,
    RULE: tl.constexpr, DENOMINATOR: tl.constexpr, PRECISION: tl.constexpr,
    HALF: tl.constexpr, X_MIXED: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Add inputs ``k_begin … k_end`` to the accumulators (one running sum)."""
    for k0 in range(k_begin, k_end, BLOCK_K):
        x, w, valid = _forward_operands(
            x_ptr, w_ptr, rows, mask_m, offs_o, mask_o, k0, IN, RULE, DENOMINATOR, BLOCK_K
        )
        if DENOMINATOR:
            acc0 = _denominator_accumulate(acc0, x, w, RULE, PRECISION)
        else:
            acc0, acc1, acc2 = _forward_accumulate(
                acc0, acc1, acc2, x, w, valid, p0, p1, RULE, PRECISION, HALF, X_MIXED
            )
    return acc0, acc1, acc2


@triton.jit
def _linear_forward_kernel(
    x_ptr, w_ptr, b_ptr, out0_ptr, out1_ptr, out2_ptr,
    N, IN, OUT,
    p0, p1, use_bias,
    RULE: tl.constexpr, N_OUTPUTS: tl.constexpr, HAS_BIAS: tl.constexpr,
    DENOMINATOR: tl.constexpr, PRECISION: tl.constexpr, HALF: tl.constexpr,
    X_MIXED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M × BLOCK_O) tile of z and of the rule's modified pre-activations.

    With ``DENOMINATOR`` it computes instead, for an all-ones input row (the host's), the w²-rule's
    ``W²·1 + b²`` or the flat rule's ``1·1``.
    """
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_m = offs_m < N
    mask_o = offs_o < OUT
    rows = offs_m.to(tl.int64)
    acc0 = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    if CHUNK_K > 0:
        # Two-level sum (IEEE fp32), CHUNK_K inputs at a time: one running sum over all IN
        # terms rounds several times worse than cuBLAS (H100, VGG16's first dense layer, 25088
        # inputs: 6×); a fresh tl.dot added to the total would not do, Triton combines
        # dot(a, b, 0) + c into dot(a, b, c).
        for k_chunk in range(0, IN, CHUNK_K):
            part0, part1, part2 = _forward_range_sum(
                tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32),
                tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32),
                tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32),
                k_chunk, tl.minimum(k_chunk + CHUNK_K, IN),
                x_ptr, w_ptr, rows, mask_m, offs_o, mask_o, IN, p0, p1,
                RULE, DENOMINATOR, PRECISION, HALF, X_MIXED, BLOCK_K,
            )  # fmt: skip
            acc0 += part0
            acc1 += part1
            acc2 += part2
    else:
        acc0, acc1, acc2 = _forward_range_sum(
            acc0, acc1, acc2, 0, IN,
            x_ptr, w_ptr, rows, mask_m, offs_o, mask_o, IN, p0, p1,
            RULE, DENOMINATOR, PRECISION, HALF, X_MIXED, BLOCK_K,
        )  # fmt: skip
    acc0, acc1, acc2 = _forward_epilogue(
        acc0, acc1, acc2, b_ptr, offs_o, mask_o, p0, use_bias, RULE, HAS_BIAS, DENOMINATOR, HALF
    )
    offs_out = rows[:, None] * OUT + offs_o[None, :]
    mask_out = mask_m[:, None] & mask_o[None, :]
    tl.store(out0_ptr + offs_out, acc0.to(out0_ptr.dtype.element_ty), mask=mask_out)
    if N_OUTPUTS > 1:
        tl.store(out1_ptr + offs_out, acc1.to(out1_ptr.dtype.element_ty), mask=mask_out)
    if N_OUTPUTS > 2:
        tl.store(out2_ptr + offs_out, acc2.to(out2_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _relevance_operands(
    w_ptr, r_ptr, z_ptr, aux0_ptr, aux1_ptr, den_ptr, rows, mask_m, offs_k, mask_k, o0,
    IN, OUT, p0, p1, stabilizer,
    RULE: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    """The shares (BLOCK_M × BLOCK_O, divided on load) and the W tile (BLOCK_O × BLOCK_K) of
    outputs ``o0 …``."""
    offs_o = o0 + tl.arange(0, BLOCK_O)
    mask_o = offs_o < OUT
    s_up, s_down = _relevance_scales(
        r_ptr, z_ptr, aux0_ptr, aux1_ptr,
        rows[:, None] * OUT + offs_o[None, :], mask_m[:, None] & mask_o[None, :],
        den_ptr, offs_o[None, :], mask_o[None, :],
        p0, p1, stabilizer, RULE,
    )  # fmt: skip
    if RULE == FLAT:
        w = _load_ones(w_ptr, mask_o[:, None] & mask_k[None, :])
    else:
        w = tl.load(
            w_ptr + offs_o[:, None] * IN + offs_k[None, :],
            mask=mask_o[:, None] & mask_k[None, :],
            other=0.0,
        )
    return s_up, s_down, w


@triton.jit
def _relevance_range_sum(
    acc_a, acc_b, o_begin, o_end,
    w_ptr, r_ptr, z_ptr, aux0_ptr, aux1_ptr, den_ptr, rows, mask_m, offs_k, mask_k,
    IN, OUT, p0, p1, stabilizer,
    RULE: tl.constexpr, DOWN_STREAM: tl.constexpr, PRECISION: tl.constexpr,
    X_MIXED: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    """Add outputs ``o_begin … o_end`` to the accumulators (one running sum)."""
    for o0 in range(o_begin, o_end, BLOCK_O):
        s_up, s_down, w = _relevance_operands(
            w_ptr, r_ptr, z_ptr, aux0_ptr, aux1_ptr, den_ptr, rows, mask_m, offs_k, mask_k, o0,
            IN, OUT, p0, p1, stabilizer, RULE, BLOCK_O,
        )  # fmt: skip
        acc_a, acc_b = _relevance_accumulate(
            acc_a, acc_b, s_up, s_down, w, p0, RULE, DOWN_STREAM, PRECISION, X_MIXED
        )
    return acc_a, acc_b


@triton.jit
def _linear_relevance_kernel(
    x_ptr, w_ptr, r_ptr, z_ptr, aux0_ptr, aux1_ptr, den_ptr, out_ptr,
    N, IN, OUT,
    p0, p1, stabilizer,
    RULE: tl.constexpr, DOWN_STREAM: tl.constexpr, PRECISION: tl.constexpr,
    X_MIXED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, CHUNK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M × BLOCK_K) tile of the input relevance: a GEMM over the outputs of
    ``s = R / stab(·)`` (divided on load) with the rule's weights, times the input tile."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < N
    mask_k = offs_k < IN
    rows = offs_m.to(tl.int64)
    acc_a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if CHUNK_K > 0:
        # Two-level sum, as in the forward kernel (IEEE fp32).
        for o_chunk in range(0, OUT, CHUNK_K):
            part_a, part_b = _relevance_range_sum(
                tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32),
                tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32),
                o_chunk, tl.minimum(o_chunk + CHUNK_K, OUT),
                w_ptr, r_ptr, z_ptr, aux0_ptr, aux1_ptr, den_ptr, rows, mask_m, offs_k, mask_k,
                IN, OUT, p0, p1, stabilizer, RULE, DOWN_STREAM, PRECISION, X_MIXED, BLOCK_O,
            )  # fmt: skip
            acc_a += part_a
            acc_b += part_b
    else:
        acc_a, acc_b = _relevance_range_sum(
            acc_a, acc_b, 0, OUT,
            w_ptr, r_ptr, z_ptr, aux0_ptr, aux1_ptr, den_ptr, rows, mask_m, offs_k, mask_k,
            IN, OUT, p0, p1, stabilizer, RULE, DOWN_STREAM, PRECISION, X_MIXED, BLOCK_O,
        )  # fmt: skip
    # x is loaded only now, and its offsets formed only now: held across the reduction they
    # cost registers that the accumulators need (ptxas spilled; benchmarks/triton_resources.py).
    mask_x = mask_m[:, None] & mask_k[None, :]
    offs_x = rows[:, None] * IN + offs_k[None, :]
    x = tl.load(x_ptr + offs_x, mask=mask_x, other=0.0)
    relevance = _relevance_epilogue(x, acc_a, acc_b, p0, p1, RULE)
    tl.store(out_ptr + offs_x, relevance.to(out_ptr.dtype.element_ty), mask=mask_x)


def _precision(x: torch.Tensor) -> str:
    # The same fp32 precision as torch's own linear (cuBLAS) under the user's settings.
    return dot_precision(x, torch.backends.cuda.matmul.allow_tf32)


# Tiles by how the products run (``product_kind``) and what the rule accumulates, as
# (BLOCK_M, BLOCK_O, BLOCK_K, num_warps, num_stages) for the forward (by number of outputs) and
# (BLOCK_M, BLOCK_K, BLOCK_O, num_warps, num_stages) for the relevance (by ``relevance_streams``).
# Each is the largest tile that ptxas compiled for sm_90 without spilling registers, with every
# x⁻ product in and, at the swept shape, 15 registers of headroom below the 255 a thread may have
# (for other Triton versions). ``benchmarks/triton_resources.py`` reads that off the compiled
# kernels for every VGG16/ResNet50 layer and rule, and the test suite checks its quick set.
# The IEEE fp32 relevance tiles and the three-output forward tile are narrower than TF32's: the
# two-level sums' partials (``reduction_chunk``) made ptxas spill 8-48 bytes at the wider ones.
# Fixed per rule, dtype and channel count, so results never depend on timing.
_FORWARD_TILES = {
    ("half", 1): (128, 128, 32, 8, 3),
    ("half", 2): (128, 64, 32, 8, 3),
    ("half", 3): (128, 64, 32, 8, 3),
    ("tf32", 1): (128, 128, 16, 8, 3),
    ("tf32", 2): (128, 64, 32, 8, 3),
    ("tf32", 3): (128, 64, 32, 8, 3),
    ("ieee", 1): (128, 128, 16, 8, 3),
    ("ieee", 2): (64, 64, 16, 8, 3),
    ("ieee", 3): (32, 32, 16, 8, 3),
}
_RELEVANCE_TILES = {
    ("half", "one"): (64, 128, 32, 8, 3),
    ("half", "two"): (64, 128, 32, 8, 3),
    ("half", "down"): (128, 64, 32, 8, 3),
    ("tf32", "one"): (64, 128, 32, 8, 3),
    ("tf32", "two"): (64, 128, 32, 8, 3),
    ("tf32", "down"): (128, 64, 16, 8, 3),
    ("ieee", "one"): (32, 128, 32, 8, 3),
    ("ieee", "two"): (32, 128, 32, 8, 3),
    ("ieee", "down"): (32, 128, 16, 8, 2),
}
# Under the interpreter (CPU): tiny tiles, so that the tests' small shapes cross tile edges.
_INTERPRETED_TILE = (16, 16, 16, 1, 1)


def _forward_blocks(x: torch.Tensor, n_outputs: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_O, BLOCK_K, num_warps, num_stages) of the forward kernel."""
    if is_interpreted(x.device):
        return _INTERPRETED_TILE
    return _FORWARD_TILES[product_kind(x.dtype, _precision(x)), n_outputs]


def _relevance_blocks(x: torch.Tensor, spec: RuleSpec, rule: str) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_O, num_warps, num_stages) of the relevance kernel."""
    if is_interpreted(x.device):
        return _INTERPRETED_TILE
    return _RELEVANCE_TILES[product_kind(x.dtype, _precision(x)), relevance_streams(spec, rule)]


def _launch_forward(x2d, weight, bias, spec, n_outputs, denominator):
    n_rows, n_in = x2d.shape
    n_out = weight.shape[0]
    outputs = [x2d.new_empty((n_rows, n_out)) for _ in range(n_outputs)]
    # The denominators (one row, once per call) take the 3-accumulator tile: the w² rule's
    # squared weights in registers spilled at the 1-accumulator tile in IEEE fp32.
    block_m, block_o, block_k, num_warps, num_stages = _forward_blocks(
        x2d, 3 if denominator else n_outputs
    )
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_out, block_o))
    padded = outputs + [outputs[0]] * (3 - n_outputs)
    if denominator:  # an input row of ones, and for the flat rule all-ones weights
        x2d = torch.ones_like(x2d)
        if spec.code == FLAT.value:
            weight = single_one(weight)
    _linear_forward_kernel[grid](
        x2d, weight, bias if bias is not None else weight, *padded,
        n_rows, n_in, n_out,
        spec.p0, spec.p1, spec.use_bias,
        RULE=spec.code, N_OUTPUTS=n_outputs, HAS_BIAS=bias is not None,
        DENOMINATOR=denominator, PRECISION=_precision(x2d), HALF=x2d.dtype != torch.float32,
        X_MIXED=not denominator and has_negative(x2d),
        BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_K=block_k,
        CHUNK_K=reduction_chunk(
            x2d, _precision(x2d), block_k, is_interpreted(x2d.device), denominator
        ),
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return outputs


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Refuse what the kernels would read out of bounds."""
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear takes x (..., in) and weight (out, in); got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rule: str,
    params: list[float],
) -> list[torch.Tensor]:
    """Forward of a linear layer that also returns what ``rule`` needs for the relevance.

    Parameters
    ----------
    x : torch.Tensor
        Input, ``(N, in)`` (leading dimensions beyond one are flattened and restored).
    weight : torch.Tensor
        ``(out, in)``.
    bias : torch.Tensor or None
        ``(out,)``.
    rule : str
        One of ``epsilon``, ``wsquare``, ``flat``, ``zplus``, ``alphabeta``, ``gamma``, ``zbox``.
    params : list of float
        The rule's numbers in the order of ``docs/ops.md``.

    Returns
    -------
    list of torch.Tensor
        ``[z, *aux]``: ``z = x Wᵀ + b`` then ``zp`` (zplus), ``zp, zn`` (alphabeta),
        ``zpos, zneg`` (gamma) or ``zb`` (zbox), each shaped like z.
    """
    check_tensors(x, weight, bias)
    _check_shapes(x, weight, bias)
    spec = parse_rule(rule, params)
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    bias = None if bias is None else bias.contiguous()  # read at unit stride
    outputs = _launch_forward(
        x2d, weight.contiguous(), bias, spec, 1 + spec.n_aux, denominator=False
    )
    return [out.reshape(*x.shape[:-1], weight.shape[0]) for out in outputs]


def linear_relevance(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    saved: list[torch.Tensor],
    relevance: torch.Tensor,
    rule: str,
    params: list[float],
) -> torch.Tensor:
    """Relevance of a linear layer's input, in one fused kernel.

    Parameters
    ----------
    x, weight, bias, rule, params
        As given to :func:`linear_forward`.
    saved : list of torch.Tensor
        What :func:`linear_forward` returned for the same inputs.
    relevance : torch.Tensor
        Relevance of the layer's output, shaped like z.

    Returns
    -------
    torch.Tensor
        Relevance of the input, shaped like x: e.g. ``x ⊙ Wᵀ(R / stab(z, ε))`` for ``epsilon``;
        the other rules as tabulated in ``docs/ops.md``.
    """
    check_tensors(x, weight, bias, relevance, *saved)
    _check_shapes(x, weight, bias)
    spec = parse_rule(rule, params)
    if len(saved) != 1 + spec.n_aux:
        raise ValueError(f"rule {rule!r} expects {1 + spec.n_aux} saved tensors, got {len(saved)}")
    z_shape = (*x.shape[:-1], weight.shape[0])
    for name, t in [("relevance", relevance), *((f"saved[{i}]", t) for i, t in enumerate(saved))]:
        if tuple(t.shape) != z_shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; the output's is {z_shape}")
    n_in = x.shape[-1]
    x2d = x.reshape(-1, n_in).contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()  # read at unit stride
    n_rows, n_out = x2d.shape[0], weight.shape[0]
    flat_saved = [t.reshape(n_rows, n_out).contiguous() for t in saved]
    flat_saved += [flat_saved[0]] * (3 - len(flat_saved))
    if spec.code in (WSQUARE.value, FLAT.value):
        # Input-independent: computed once per call for one row of ones, broadcast.
        ones_row = x2d[:1]
        (denominator,) = _launch_forward(ones_row, weight, bias, spec, 1, denominator=True)
    else:
        denominator = flat_saved[0]
    out = torch.empty_like(x2d)
    block_m, block_k, block_o, num_warps, num_stages = _relevance_blocks(x2d, spec, rule)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_in, block_k))
    _linear_relevance_kernel[grid](
        x2d, single_one(weight) if spec.code == FLAT.value else weight, relevance.reshape(n_rows, n_out).contiguous(), *flat_saved, denominator, out,
        n_rows, n_in, n_out,
        spec.p0, spec.p1, spec.stabilizer,
        RULE=spec.code, DOWN_STREAM=spec.beta_nonzero or rule == "gamma", X_MIXED=has_negative(x),
        PRECISION=_precision(x2d),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_O=block_o,
        CHUNK_K=reduction_chunk(
            x2d, _precision(x2d), block_o, is_interpreted(x2d.device)
        ),
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out.reshape(x.shape)
