"""Fused LRP kernels for a 2-D convolution (NCHW, zero padding, stride, dilation, groups).

``conv2d_forward`` is an implicit GEMM (rows: output pixels, columns: output channels of one
group, reduction: kernel taps × input channels, gathered from x on the fly; no im2col buffer)
that computes z and the rule's modified pre-activations in one pass with one accumulator each.

``conv2d_relevance`` is the implicit GEMM of the transposed convolution (the gradient of the
convolution with respect to its input): rows are input pixels, columns input channels, and the
reduction runs over the kernel taps and output channels that reach a pixel, loading
``s = R / stab(·)`` as the operand and multiplying by x (or x⁺/x⁻, or the zB bounds) at the end.
For stride > 1 the input pixels are split by their phase ``(ih mod sh, iw mod sw)``: within one
phase the taps that reach a pixel are the same for every pixel, so no masked-out work is done
for the taps that skip it. The maths is ``docs/ops.md``; rules after Zennit 0.5 and Montavon et
al., "Layer-Wise Relevance Propagation: An Overview" (2019).
"""

# No ``from __future__ import annotations`` here: Triton 3.0's interpreter recognises a
# ``tl.constexpr`` parameter only by its evaluated annotation, not by the string it would become.
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ._common import (
    FLAT,
    OLD_TRITON,
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
    target_arch,
)


@triton.jit
def _forward_operands(
    x_ptr, w_ptr, x_pixel, inside, w_filter, mask_o, c0, kh, kw,
    C_GROUP, H, W, KH, KW,
    RULE: tl.constexpr, DENOMINATOR: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The x (BLOCK_M × BLOCK_K) and W (BLOCK_K × BLOCK_O) tiles of tap (kh, kw), channels
    ``c0 …``, and where x is real (not padding, in range)."""
    offs_c = c0 + tl.arange(0, BLOCK_K)
    mask_c = offs_c < C_GROUP
    valid = inside[:, None] & mask_c[None, :]
    if DENOMINATOR and RULE == FLAT:
        w = _load_ones(w_ptr, mask_c[:, None] & mask_o[None, :])
    else:
        w = tl.load(
            w_ptr + w_filter[None, :] + offs_c[:, None] * (KH * KW) + (kh * KW + kw),
            mask=mask_c[:, None] & mask_o[None, :],
            other=0.0,
        )
    # With DENOMINATOR, x is an image of ones (the host's): zero where padded.
    x = tl.load(x_ptr + x_pixel[:, None] + offs_c[None, :] * (H * W), mask=valid, other=0.0)
    return x, w, valid


@triton.jit
def _forward_tap_sum(
    acc0, acc1, acc2, c_begin, c_end,
    x_ptr, w_ptr, x_pixel, inside, w_filter, mask_o, kh, kw, p0, p1,
    C_GROUP, H, W, KH, KW,
    RULE: tl.constexpr, DENOMINATOR: tl.constexpr, PRECISION: tl.constexpr,
    HALF: tl.constexpr, X_MIXED: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Add channels ``c_begin … c_end`` of tap (kh, kw) to the accumulators (one running sum)."""
    for c0 in range(c_begin, c_end, BLOCK_K):
        x, w, valid = _forward_operands(
            x_ptr, w_ptr, x_pixel, inside, w_filter, mask_o, c0, kh, kw,
            C_GROUP, H, W, KH, KW, RULE, DENOMINATOR, BLOCK_K,
        )  # fmt: skip
        if DENOMINATOR:
            acc0 = _denominator_accumulate(acc0, x, w, RULE, PRECISION)
        else:
            acc0, acc1, acc2 = _forward_accumulate(
                acc0, acc1, acc2, x, w, valid, p0, p1, RULE, PRECISION, HALF, X_MIXED
            )
    return acc0, acc1, acc2


@triton.jit
def _conv2d_forward_kernel(
    x_ptr, w_ptr, b_ptr, out0_ptr, out1_ptr, out2_ptr,
    N, C, H, W, O, OH, OW, C_GROUP, O_GROUP, KH, KW,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    p0, p1, use_bias,
    RULE: tl.constexpr, N_OUTPUTS: tl.constexpr, HAS_BIAS: tl.constexpr,
    DENOMINATOR: tl.constexpr, PRECISION: tl.constexpr, HALF: tl.constexpr,
    X_MIXED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M output pixels × BLOCK_O output channels) tile of z and the rule's
    modified pre-activations for group ``program_id(2)``.

    ``CHUNK_K > 0`` (IEEE fp32, never with ``DENOMINATOR``) sums in two levels, ``CHUNK_K``
    channels at a time.

    With ``DENOMINATOR`` it computes instead, for an all-ones image (zero-padded; the host's), the
    w²-rule's ``W²·1 + b²`` or the flat rule's ``1·1``.
    """
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    group = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N * OH * OW
    n = offs_m // (OH * OW)
    pixel = offs_m % (OH * OW)
    oh = pixel // OW
    ow = pixel % OW
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < O_GROUP
    channels_out = group * O_GROUP + offs_o
    x_image = n.to(tl.int64) * C * H * W + group * C_GROUP * H * W
    w_filter = channels_out * (C_GROUP * KH * KW)
    acc0 = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for kh in range(KH):
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        for kw in range(KW):
            iw = ow * STRIDE_W - PAD_W + kw * DIL_W
            inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_pixel = x_image + ih * W + iw
            if CHUNK_K > 0:
                # Two-level sum (IEEE fp32): each CHUNK_K channels of a tap into fresh partial
                # sums, then into the totals. One running sum over all C·KH·KW terms rounds
                # several times worse than cuDNN's fp32 convolutions (H100, VGG16's 3×3 layers
                # at 28² and 14²: 5-8×); a fresh tl.dot added to the total would not do,
                # Triton combines dot(a, b, 0) + c into dot(a, b, c).
                for c_chunk in range(0, C_GROUP, CHUNK_K):
                    part0, part1, part2 = _forward_tap_sum(
                        tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32),
                        tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32),
                        tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32),
                        c_chunk, tl.minimum(c_chunk + CHUNK_K, C_GROUP),
                        x_ptr, w_ptr, x_pixel, inside, w_filter, mask_o, kh, kw, p0, p1,
                        C_GROUP, H, W, KH, KW,
                        RULE, DENOMINATOR, PRECISION, HALF, X_MIXED, BLOCK_K,
                    )  # fmt: skip
                    acc0 += part0
                    acc1 += part1
                    acc2 += part2
            else:
                acc0, acc1, acc2 = _forward_tap_sum(
                    acc0, acc1, acc2, 0, C_GROUP,
                    x_ptr, w_ptr, x_pixel, inside, w_filter, mask_o, kh, kw, p0, p1,
                    C_GROUP, H, W, KH, KW,
                    RULE, DENOMINATOR, PRECISION, HALF, X_MIXED, BLOCK_K,
                )  # fmt: skip
    acc0, acc1, acc2 = _forward_epilogue(
        acc0,
        acc1,
        acc2,
        b_ptr,
        channels_out,
        mask_o,
        p0,
        use_bias,
        RULE,
        HAS_BIAS,
        DENOMINATOR,
        HALF,
    )
    offs_out = (n.to(tl.int64) * O * OH * OW + pixel)[:, None] + channels_out[None, :] * (OH * OW)
    mask_out = mask_m[:, None] & mask_o[None, :]
    tl.store(out0_ptr + offs_out, acc0.to(out0_ptr.dtype.element_ty), mask=mask_out)
    if N_OUTPUTS > 1:
        tl.store(out1_ptr + offs_out, acc1.to(out1_ptr.dtype.element_ty), mask=mask_out)
    if N_OUTPUTS > 2:
        tl.store(out2_ptr + offs_out, acc2.to(out2_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _relevance_operands(
    w_ptr, r_ptr, z_ptr, aux0_ptr, aux1_ptr, den_ptr, r_image, out_pixel, reached, offs_c,
    mask_c, o0, group, kh, kw,
    O_GROUP, C_GROUP, OH, OW, KH, KW, p0, p1, stabilizer,
    RULE: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    """The shares (BLOCK_M × BLOCK_O, divided on load) and the W tile (BLOCK_O × BLOCK_C) of
    tap (kh, kw), output channels ``o0 …``."""
    offs_o = o0 + tl.arange(0, BLOCK_O)
    mask_o = offs_o < O_GROUP
    channels_out = group * O_GROUP + offs_o
    mask_r = reached[:, None] & mask_o[None, :]
    s_up, s_down = _relevance_scales(
        r_ptr, z_ptr, aux0_ptr, aux1_ptr,
        (r_image + out_pixel)[:, None] + channels_out[None, :] * (OH * OW),
        mask_r,
        den_ptr, out_pixel[:, None] + channels_out[None, :] * (OH * OW), mask_r,
        p0, p1, stabilizer, RULE,
    )  # fmt: skip
    if RULE == FLAT:
        w = _load_ones(w_ptr, mask_o[:, None] & mask_c[None, :])
    else:
        w = tl.load(
            w_ptr
            + channels_out[:, None] * (C_GROUP * KH * KW)
            + offs_c[None, :] * (KH * KW)
            + (kh * KW + kw),
            mask=mask_o[:, None] & mask_c[None, :],
            other=0.0,
        )
    return s_up, s_down, w


@triton.jit
def _relevance_tap_sum(
    acc_a, acc_b, o_begin, o_end,
    w_ptr, r_ptr, z_ptr, aux0_ptr, aux1_ptr, den_ptr, r_image, out_pixel, reached, offs_c,
    mask_c, group, kh, kw,
    O_GROUP, C_GROUP, OH, OW, KH, KW, p0, p1, stabilizer,
    RULE: tl.constexpr, DOWN_STREAM: tl.constexpr, PRECISION: tl.constexpr,
    X_MIXED: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    """Add output channels ``o_begin … o_end`` of tap (kh, kw) to the accumulators (one
    running sum)."""
    for o0 in range(o_begin, o_end, BLOCK_O):
        s_up, s_down, w = _relevance_operands(
            w_ptr, r_ptr, z_ptr, aux0_ptr, aux1_ptr, den_ptr, r_image,
            out_pixel, reached, offs_c, mask_c, o0, group, kh, kw,
            O_GROUP, C_GROUP, OH, OW, KH, KW, p0, p1, stabilizer,
            RULE, BLOCK_O,
        )  # fmt: skip
        acc_a, acc_b = _relevance_accumulate(
            acc_a, acc_b, s_up, s_down, w, p0, RULE, DOWN_STREAM, PRECISION, X_MIXED
        )
    return acc_a, acc_b


@triton.jit
def _conv2d_relevance_kernel(
    x_ptr, w_ptr, r_ptr, z_ptr, aux0_ptr, aux1_ptr, den_ptr, out_ptr,
    N, C, H, W, O, OH, OW, C_GROUP, O_GROUP, KH, KW,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    p0, p1, stabilizer,
    RULE: tl.constexpr, DOWN_STREAM: tl.constexpr, PRECISION: tl.constexpr,
    X_MIXED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, CHUNK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M input pixels of one stride phase × BLOCK_C input channels) tile of the
    input relevance; ``program_id(2)`` enumerates (group, phase)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    group = tl.program_id(2) // (STRIDE_H * STRIDE_W)
    phase = tl.program_id(2) % (STRIDE_H * STRIDE_W)
    phase_h = phase // STRIDE_W
    phase_w = phase % STRIDE_W
    # Input rows/columns of this phase: phase_h, phase_h + sh, ... (none when phase_h >= H).
    rows_h = tl.maximum((H - phase_h + STRIDE_H - 1) // STRIDE_H, 0)
    rows_w = tl.maximum((W - phase_w + STRIDE_W - 1) // STRIDE_W, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N * rows_h * rows_w
    plane = tl.maximum(rows_h * rows_w, 1)
    n = offs_m // plane
    ih = phase_h + STRIDE_H * ((offs_m % plane) // tl.maximum(rows_w, 1))
    iw = phase_w + STRIDE_W * ((offs_m % plane) % tl.maximum(rows_w, 1))
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C_GROUP
    channels_in = group * C_GROUP + offs_c
    r_image = n.to(tl.int64) * O * OH * OW
    acc_a = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kh in range(KH):
        shifted_h = ih + PAD_H - kh * DIL_H
        for kw in range(KW):
            shifted_w = iw + PAD_W - kw * DIL_W
            # Tap (kh, kw) reaches this phase's pixels only if the shifts are multiples of the
            # stride; the same for every pixel of the phase.
            tap_hits = ((phase_h + PAD_H - kh * DIL_H) % STRIDE_H == 0) & (
                (phase_w + PAD_W - kw * DIL_W) % STRIDE_W == 0
            )
            if tap_hits:
                oh = shifted_h // STRIDE_H
                ow = shifted_w // STRIDE_W
                reached = mask_m & (shifted_h >= 0) & (oh < OH) & (shifted_w >= 0) & (ow < OW)
                out_pixel = oh * OW + ow
                if CHUNK_K > 0:
                    # Two-level sum, as in the forward kernel (IEEE fp32).
                    for o_chunk in range(0, O_GROUP, CHUNK_K):
                        part_a, part_b = _relevance_tap_sum(
                            tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32),
                            tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32),
                            o_chunk, tl.minimum(o_chunk + CHUNK_K, O_GROUP),
                            w_ptr, r_ptr, z_ptr, aux0_ptr, aux1_ptr, den_ptr, r_image,
                            out_pixel, reached, offs_c, mask_c, group, kh, kw,
                            O_GROUP, C_GROUP, OH, OW, KH, KW, p0, p1, stabilizer,
                            RULE, DOWN_STREAM, PRECISION, X_MIXED, BLOCK_O,
                        )  # fmt: skip
                        acc_a += part_a
                        acc_b += part_b
                else:
                    acc_a, acc_b = _relevance_tap_sum(
                        acc_a, acc_b, 0, O_GROUP,
                        w_ptr, r_ptr, z_ptr, aux0_ptr, aux1_ptr, den_ptr, r_image,
                        out_pixel, reached, offs_c, mask_c, group, kh, kw,
                        O_GROUP, C_GROUP, OH, OW, KH, KW, p0, p1, stabilizer,
                        RULE, DOWN_STREAM, PRECISION, X_MIXED, BLOCK_O,
                    )  # fmt: skip
    # x is loaded only now, and its offsets formed only now: held across the reduction they
    # cost registers that the accumulators need (ptxas spilled; benchmarks/triton_resources.py).
    offs_x = (n.to(tl.int64) * C * H * W + ih * W + iw)[:, None] + channels_in[None, :] * (H * W)
    mask_x = mask_m[:, None] & mask_c[None, :]
    x = tl.load(x_ptr + offs_x, mask=mask_x, other=0.0)
    relevance = _relevance_epilogue(x, acc_a, acc_b, p0, p1, RULE)
    tl.store(out_ptr + offs_x, relevance.to(out_ptr.dtype.element_ty), mask=mask_x)


def _pair(value: Union[int, tuple[int, ...], list[int]]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _precision(x: torch.Tensor) -> str:
    # The same fp32 precision as torch's own convolution (cuDNN) under the user's settings.
    return dot_precision(x, torch.backends.cudnn.allow_tf32)


# Tiles by how the products run (``product_kind``) and what the rule accumulates, as
# (BLOCK_M, BLOCK_O, BLOCK_K, num_warps, num_stages) for the forward (by number of outputs) and
# (BLOCK_M, BLOCK_C, BLOCK_O, num_warps, num_stages) for the relevance (by ``relevance_streams``).
# Each is the largest tile that ptxas compiled for sm_90 without spilling registers, with every
# x⁻ product in and, at the swept shape, 15 registers of headroom below the 255 a thread may have
# (for other Triton versions). ``benchmarks/triton_resources.py`` reads that off the compiled
# kernels for every VGG16/ResNet50 layer and rule, and the test suite checks its quick set.
# With torch's default flags (TF32 convolutions) no variant spills (Triton 3.6 and 3.8); with
# TF32 off, 14-18 of the 153 IEEE-fp32 variants keep a spill of 8-64 bytes a thread, mostly
# where ptxas held them to 128 registers (docs/ops.md; 16 with Triton 3.8 since the two-level
# sums, against 14 before). The implicit GEMM's index arithmetic costs registers that a dense
# layer's does not, hence smaller tiles than ``linear.py``'s.
# Fixed per rule, dtype and channel count, so results never depend on timing.
_FORWARD_TILES = {
    ("half", 1): (64, 128, 32, 8, 3),
    ("half", 2): (64, 128, 16, 8, 3),
    ("half", 3): (64, 64, 32, 8, 3),
    ("tf32", 1): (64, 128, 16, 8, 3),
    ("tf32", 2): (64, 64, 16, 8, 3),
    ("tf32", 3): (64, 64, 16, 8, 2),
    ("ieee", 1): (64, 128, 16, 8, 3),
    ("ieee", 2): (32, 64, 16, 8, 3),
    ("ieee", 3): (32, 64, 16, 8, 3),
}
_RELEVANCE_TILES = {
    ("half", "one"): (64, 128, 16, 8, 3),
    ("half", "two"): (64, 64, 32, 8, 3),
    ("half", "down"): (64, 64, 16, 8, 3),
    ("tf32", "one"): (64, 128, 16, 8, 2),
    ("tf32", "two"): (64, 64, 16, 8, 3),
    ("tf32", "down"): (64, 64, 16, 8, 2),
    ("ieee", "one"): (64, 128, 16, 8, 3),
    ("ieee", "two"): (64, 64, 16, 8, 3),
    ("ieee", "down"): (64, 64, 16, 8, 3),
}
# Under the interpreter (CPU): small tiles, so that the tests' small shapes cross tile edges.
_INTERPRETED_TILE = (64, 16, 16, 1, 1)


def _narrow(tile: int, channels: int) -> int:
    """A channel tile no wider than the layer (few channels per group: no mostly-masked tile)."""
    return min(tile, max(16, triton.next_power_of_2(channels)))


def _four_warps(block_n: int, num_warps: int) -> tuple[int, int]:
    """``(block_n, num_warps)``, or 4 warps on a half-wide tile where the compiler needs them.

    Triton 3.0 and 3.1 abort compiling several of these kernels for sm_90 with 8 warps (an
    assertion in Allocation.cpp: "mma -> mma layout conversion is only supported on Ampere"; the
    α-β/γ relevance, the zB forward, the forward on a mixed-sign input). With 4 warps they
    compile; halving the tile's width keeps each thread's accumulators as they were. Checked by
    ``benchmarks/triton_resources.py`` with each Triton release, ``docs/ops.md``.
    """
    if num_warps == 8 and OLD_TRITON and target_arch() >= 90:
        return max(16, block_n // 2), 4
    return block_n, num_warps


def _forward_blocks(x: torch.Tensor, n_outputs: int, o_group: int, c_group: int):
    """(BLOCK_M, BLOCK_O, BLOCK_K, num_warps, num_stages) of the forward kernel."""
    if is_interpreted(x.device):
        return _INTERPRETED_TILE
    block_m, block_o, block_k, num_warps, num_stages = _FORWARD_TILES[
        product_kind(x.dtype, _precision(x)), n_outputs
    ]
    block_o, num_warps = _four_warps(_narrow(block_o, o_group), num_warps)
    return block_m, block_o, _narrow(block_k, c_group), num_warps, num_stages


def _relevance_blocks(x: torch.Tensor, spec: RuleSpec, rule: str, o_group: int, c_group: int):
    """(BLOCK_M, BLOCK_C, BLOCK_O, num_warps, num_stages) of the relevance kernel."""
    if is_interpreted(x.device):
        return _INTERPRETED_TILE
    block_m, block_c, block_o, num_warps, num_stages = _RELEVANCE_TILES[
        product_kind(x.dtype, _precision(x)), relevance_streams(spec, rule)
    ]
    block_c, num_warps = _four_warps(_narrow(block_c, c_group), num_warps)
    return block_m, block_c, _narrow(block_o, o_group), num_warps, num_stages


def _launch_forward(x, weight, bias, geometry, spec, n_outputs, denominator):
    stride, padding, dilation, groups = geometry
    n, c, h, w = x.shape
    o, c_group, kh, kw = weight.shape
    oh = _output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _output_size(w, kw, stride[1], padding[1], dilation[1])
    o_group = o // groups
    outputs = [x.new_empty((n, o, oh, ow)) for _ in range(n_outputs)]
    # The denominators (one image, once per call) take the 3-accumulator tile: the w² rule's
    # squared weights in registers spilled at the 1-accumulator tile in IEEE fp32.
    block_m, block_o, block_k, num_warps, num_stages = _forward_blocks(
        x, 3 if denominator else n_outputs, o_group, c_group
    )
    grid = (triton.cdiv(n * oh * ow, block_m), triton.cdiv(o_group, block_o), groups)
    padded = outputs + [outputs[0]] * (3 - n_outputs)
    if denominator:  # an input image of ones, and for the flat rule all-ones weights
        x = torch.ones_like(x)
        if spec.code == FLAT.value:
            weight = single_one(weight)
    _conv2d_forward_kernel[grid](
        x, weight, bias if bias is not None else weight, *padded,
        n, c, h, w, o, oh, ow, c_group, o_group, kh, kw,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        spec.p0, spec.p1, spec.use_bias,
        RULE=spec.code, N_OUTPUTS=n_outputs, HAS_BIAS=bias is not None,
        DENOMINATOR=denominator, PRECISION=_precision(x), HALF=x.dtype != torch.float32,
        X_MIXED=not denominator and has_negative(x),
        BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_K=block_k,
        CHUNK_K=reduction_chunk(
            x, _precision(x), block_k, is_interpreted(x.device), denominator
        ),
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return outputs


def _check_geometry(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> tuple[int, int]:
    """Refuse what the kernels would read out of bounds; return the output's (OH, OW)."""
    from relprop.ops.conv import conv2d_output_shape

    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"conv2d needs stride ≥ 1, dilation ≥ 1 and padding ≥ 0; got stride {stride}, "
            f"dilation {dilation}, padding {padding}"
        )
    shape = conv2d_output_shape(x.shape, weight.shape, stride, padding, dilation, groups)
    return shape[2], shape[3]


def conv2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    rule: str,
    params: list[float],
) -> list[torch.Tensor]:
    """Forward of a 2-D convolution that also returns what ``rule`` needs for the relevance.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C, H, W)``.
    weight : torch.Tensor
        ``(O, C/groups, kh, kw)``.
    bias : torch.Tensor or None
        ``(O,)``.
    stride, padding, dilation : list of int
        ``[h, w]`` (an int means both); padding is zero padding.
    groups : int
        Number of channel groups.
    rule : str
        One of ``epsilon``, ``wsquare``, ``flat``, ``zplus``, ``alphabeta``, ``gamma``, ``zbox``.
    params : list of float
        The rule's numbers in the order of ``docs/ops.md``.

    Returns
    -------
    list of torch.Tensor
        ``[z, *aux]``: ``z = conv(x, W) + b`` then ``zp`` (zplus), ``zp, zn`` (alphabeta),
        ``zpos, zneg`` (gamma) or ``zb`` (zbox), each shaped like z.
    """
    check_tensors(x, weight, bias)
    geometry = (_pair(stride), _pair(padding), _pair(dilation), groups)
    _check_geometry(x, weight, bias, *geometry)
    spec = parse_rule(rule, params)
    bias = None if bias is None else bias.contiguous()  # read at unit stride
    return _launch_forward(
        x.contiguous(), weight.contiguous(), bias, geometry, spec, 1 + spec.n_aux, False
    )


def conv2d_relevance(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    saved: list[torch.Tensor],
    relevance: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    rule: str,
    params: list[float],
) -> torch.Tensor:
    """Relevance of a 2-D convolution's input, in one fused kernel.

    Parameters
    ----------
    x, weight, bias, stride, padding, dilation, groups, rule, params
        As given to :func:`conv2d_forward`.
    saved : list of torch.Tensor
        What :func:`conv2d_forward` returned for the same inputs.
    relevance : torch.Tensor
        Relevance of the layer's output, shaped like z.

    Returns
    -------
    torch.Tensor
        Relevance of the input, shaped like x: e.g. ``x ⊙ Wᵀ(R / stab(z, ε))`` with ``Wᵀ`` the
        transposed convolution for ``epsilon``; the other rules as tabulated in ``docs/ops.md``.
    """
    check_tensors(x, weight, bias, relevance, *saved)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    out_size = _check_geometry(x, weight, bias, stride, padding, dilation, groups)
    spec = parse_rule(rule, params)
    if len(saved) != 1 + spec.n_aux:
        raise ValueError(f"rule {rule!r} expects {1 + spec.n_aux} saved tensors, got {len(saved)}")
    z_shape = (x.shape[0], weight.shape[0], *out_size)
    for name, t in [("relevance", relevance), *((f"saved[{i}]", t) for i, t in enumerate(saved))]:
        if tuple(t.shape) != z_shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; the output's is {z_shape}")
    x = x.contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()  # read at unit stride
    n, c, h, w = x.shape
    o, c_group, kh, kw = weight.shape
    oh, ow = relevance.shape[2], relevance.shape[3]
    o_group = o // groups
    saved = [t.contiguous() for t in saved]
    saved += [saved[0]] * (3 - len(saved))
    if spec.code in (WSQUARE.value, FLAT.value):
        # Input-independent: computed once per call for one image of ones, broadcast.
        geometry = (stride, padding, dilation, groups)
        (denominator,) = _launch_forward(x[:1], weight, bias, geometry, spec, 1, True)
    else:
        denominator = saved[0]
    out = torch.empty_like(x)
    block_m, block_c, block_o, num_warps, num_stages = _relevance_blocks(
        x, spec, rule, o_group, c_group
    )
    phase_rows = n * triton.cdiv(h, stride[0]) * triton.cdiv(w, stride[1])
    grid = (
        triton.cdiv(phase_rows, block_m),
        triton.cdiv(c_group, block_c),
        groups * stride[0] * stride[1],
    )
    interpreted = is_interpreted(x.device)
    # One running sum on a first layer's few input channels (a narrow, mostly masked tile): the
    # partial sums made ptxas spill up to 72 bytes there, and its sums over each tap are short.
    narrow = block_c < 32 and not interpreted
    chunk = 0 if narrow else reduction_chunk(x, _precision(x), block_o, interpreted)
    _conv2d_relevance_kernel[grid](
        x, single_one(weight) if spec.code == FLAT.value else weight, relevance.contiguous(), *saved, denominator, out,
        n, c, h, w, o, oh, ow, c_group, o_group, kh, kw,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        spec.p0, spec.p1, spec.stabilizer,
        RULE=spec.code, DOWN_STREAM=spec.beta_nonzero or rule == "gamma", X_MIXED=has_negative(x),
        PRECISION=_precision(x),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_O=block_o,
        CHUNK_K=chunk, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
