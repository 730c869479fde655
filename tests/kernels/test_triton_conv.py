"""The fused Triton conv2d kernels against a float64 re-implementation of docs/ops.md.

The reference uses ``torch.nn.functional.conv2d`` for every product and
``torch.nn.grad.conv2d_input`` for every transposed product. Criterion (flash-attention's): the
kernel's largest error against float64 arithmetic on the same inputs (rounded to the kernel's
dtype) is at most twice that of the same formula computed by plain torch in that dtype, plus a
few ulps of the scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.kernels._common import (
    CAN_RUN,
    DEVICE,
    FULL_PARAMS,
    RULE_IDS,
    RULES,
    assert_flash_close,
    needs_triton,
    rule_reference,
)
from torch.nn.grad import conv2d_input

if CAN_RUN:
    from relprop._kernels.triton import conv

# (kernel size, stride, padding, dilation, groups) on a 2×5×7×9 input (odd on purpose; 6 channels
# when grouped) with 6 outputs. The first two run every rule × bias × input sign; the others,
# which only change index arithmetic, every rule on mixed-sign inputs with bias.
FULL_GEOMETRIES = {"k3s2p1d2g1": (3, 2, 1, 2, 1), "k3s2p1d2g2": (3, 2, 1, 2, 2)}
MORE_GEOMETRIES = {
    "k3s1p1d1g1": (3, 1, 1, 1, 1),
    "k1s2p0d1g2": (1, 2, 0, 1, 2),
    "k2x3mixed": ((2, 3), (2, 3), (0, 2), (3, 1), 1),
}


def reference(x, w, b, relevance, geometry, rule, params):
    """docs/ops.md with torch's convolution and its input gradient: (saved, input relevance)."""
    stride, padding, dilation, groups = geometry

    def product(inp, weight, bias=None):
        return F.conv2d(inp, weight, bias, stride, padding, dilation, groups)

    def transposed(weight, s):
        return conv2d_input(x.shape, weight, s, stride, padding, dilation, groups)

    return rule_reference(x, w, b, relevance, rule, params, product, transposed)


def _pair(value):
    return (value, value) if isinstance(value, int) else value


def make_case(x_shape, n_out, geometry, nonneg, with_bias, seed):
    """Inputs in float64: x (mixed or non-negative), W, b and a relevance R.

    For non-negative inputs R is zero where z < 0, as after a ReLU; for mixed inputs it is
    random everywhere, so γ's z < 0 stream is exercised too.
    """
    kernel, stride, padding, dilation, groups = geometry
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=gen, dtype=torch.float64)
    if nonneg:
        x = x.clamp(min=0)
    fan_in = x_shape[1] // groups * _pair(kernel)[0] * _pair(kernel)[1]
    w_shape = (n_out, x_shape[1] // groups, *_pair(kernel))
    w = torch.randn(*w_shape, generator=gen, dtype=torch.float64) / fan_in**0.5
    b = torch.randn(n_out, generator=gen, dtype=torch.float64) if with_bias else None
    z = F.conv2d(x, w, b, stride, padding, dilation, groups)
    relevance = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    if nonneg:
        relevance = relevance * (z > 0)
    tensors = [None if t is None else t.to(DEVICE) for t in (x, w, b, relevance)]
    return tensors, (_pair(stride), _pair(padding), _pair(dilation), groups)


def _as(tensors, dtype):
    return [None if t is None else t.to(dtype) for t in tensors]


def run_kernels(tensors, geometry, rule, params):
    x, w, b, relevance = tensors
    saved = conv.conv2d_forward(x, w, b, *geometry, rule, params)
    return saved, conv.conv2d_relevance(x, w, b, saved, relevance, *geometry, rule, params)


def check_against_reference(tensors, geometry, rule, params, dtype=torch.float32, ulps=4.0):
    # The truth is float64 arithmetic on the inputs as the kernel receives them (rounded to
    # dtype), as in flash-attention's tests (see test_triton_linear.check_against_reference).
    truth_inputs = _as(_as(tensors, dtype), torch.float64)
    saved_truth, r_truth = reference(*truth_inputs, geometry, rule, params)
    saved_low, r_low = reference(*_as(tensors, dtype), geometry, rule, params)
    saved, r_kernel = run_kernels(_as(tensors, dtype), geometry, rule, params)
    assert len(saved) == len(saved_truth)
    for name, kernel, low, truth in zip(["z", "aux0", "aux1"], saved, saved_low, saved_truth):
        assert kernel.dtype == dtype and kernel.shape == truth.shape, name
        assert_flash_close(kernel, low, truth, ulps)
    assert r_kernel.dtype == dtype and r_kernel.shape == tensors[0].shape
    assert_flash_close(r_kernel, r_low, r_truth, ulps)


def _check_geometry(geometry, nonneg, with_bias, rule, params):
    channels = 5 if geometry[4] == 1 else 6
    tensors, geometry = make_case((2, channels, 7, 9), 6, geometry, nonneg, with_bias, seed=1)
    check_against_reference(tensors, geometry, rule, params)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize(("rule", "params"), RULES, ids=RULE_IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("nonneg", [False, True], ids=["mixed", "nonneg"])
@pytest.mark.parametrize("geometry", FULL_GEOMETRIES.values(), ids=FULL_GEOMETRIES.keys())
def test_matches_float64_reference(geometry, nonneg, with_bias, rule, params):
    _check_geometry(geometry, nonneg, with_bias, rule, params)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize(("rule", "params"), RULES, ids=RULE_IDS)
@pytest.mark.parametrize("geometry", MORE_GEOMETRIES.values(), ids=MORE_GEOMETRIES.keys())
def test_more_geometries_match_float64_reference(geometry, rule, params):
    _check_geometry(geometry, False, True, rule, params)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("rule", ["epsilon", "gamma", "alphabeta"])
def test_several_tiles_per_dimension(rule):
    """More pixels, channels and outputs than one 16-wide tile, so every loop runs repeatedly."""
    params = FULL_PARAMS[rule]
    tensors, geometry = make_case((8, 34, 5, 6), 34, (2, 2, 1, 1, 2), False, True, seed=2)
    check_against_reference(tensors, geometry, rule, params)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("rule", ["gamma", "alphabeta", "zbox"])
def test_two_runs_are_bitwise_equal(rule):
    params = FULL_PARAMS[rule]
    tensors, geometry = make_case((2, 5, 7, 9), 6, (3, 2, 1, 2, 1), False, True, seed=3)
    tensors = _as(tensors, torch.float32)
    first, second = (run_kernels(tensors, geometry, rule, params) for _ in range(2))
    for a, b in zip([*first[0], first[1]], [*second[0], second[1]]):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.interpret
def test_lrp0_gives_zero_not_nan_where_nothing_arrives():
    """ε = 0 (LRP-0) and an all-zero sample: z = 0 and R = 0 there, so 0/stab(0, 0)."""
    tensors, geometry = make_case((2, 5, 7, 9), 6, (3, 1, 1, 1, 1), True, False, seed=13)
    tensors[0][1] = 0.0
    _, r_kernel = run_kernels(_as(tensors, torch.float32), geometry, "epsilon", [0.0])
    assert torch.isfinite(r_kernel).all()
    assert torch.equal(r_kernel[1], torch.zeros_like(r_kernel[1]))
    # Sample 0: LRP-0 divides by z itself, so wherever z is near 0 the error of any fp32
    # evaluation is scaled by 1/z and which of two lands nearer float64 is chance (a compiled
    # kernel and cuDNN sum in different orders). The bound is therefore wider than elsewhere.
    check_against_reference(tensors, geometry, "epsilon", [0.0], ulps=64.0)


@needs_triton
@pytest.mark.interpret
def test_rejects_mismatched_groups():
    x = torch.zeros(1, 5, 4, 4, device=DEVICE)
    w = torch.zeros(6, 5, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="groups=2"):
        conv.conv2d_forward(x, w, None, [1, 1], [0, 0], [1, 1], 2, "epsilon", [0.1])


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("rule", ["zplus", "alphabeta", "gamma"])
@pytest.mark.parametrize("nonneg", [False, True], ids=["mixed", "nonneg"])
def test_float16_matches_float64_reference(nonneg, rule):
    """16-bit inputs take their own forward for α-β (z⁻ = z − z⁺ from fp32 accumulators)."""
    params = FULL_PARAMS[rule]
    tensors, geometry = make_case((2, 5, 7, 9), 6, (3, 2, 1, 1, 1), nonneg, True, seed=8)
    check_against_reference(tensors, geometry, rule, params, dtype=torch.float16, ulps=2.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("rule", "params"), RULES, ids=RULE_IDS)
@pytest.mark.parametrize("nonneg", [False, True], ids=["mixed", "nonneg"])
def test_half_precision_on_gpu(nonneg, rule, params, dtype):
    tensors, geometry = make_case((4, 64, 29, 31), 96, (3, 2, 1, 1, 1), nonneg, True, seed=5)
    check_against_reference(tensors, geometry, rule, params, dtype=dtype, ulps=2.0)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("rule", ["epsilon", "alphabeta", "zbox"])
def test_strided_and_expanded_biases(rule):
    """As for the linear kernels: a bias that is a strided view or an expanded scalar gives what
    its contiguous copy gives (checked against float64 elsewhere)."""
    tensors, geometry = make_case((2, 5, 7, 9), 6, FULL_GEOMETRIES["k3s2p1d2g1"], False, True, 7)
    x, w, b, relevance = _as(tensors, torch.float32)
    params = FULL_PARAMS[rule]
    for strided in (torch.stack([b, b + 1], dim=1)[:, 0], b[:1].expand(6)):
        assert not strided.is_contiguous()
        saved, r_in = run_kernels([x, w, strided, relevance], geometry, rule, params)
        saved_copy, r_copy = run_kernels([x, w, strided.contiguous(), relevance], geometry, rule,
                                         params)  # fmt: skip
        assert all(torch.equal(a, c) for a, c in zip(saved, saved_copy))
        assert torch.equal(r_in, r_copy)


@needs_triton
@pytest.mark.interpret
def test_refuses_shapes_it_would_read_out_of_bounds():
    tensors, geometry = make_case((2, 5, 7, 9), 6, FULL_GEOMETRIES["k3s2p1d2g1"], False, True, 8)
    x, w, b, relevance = _as(tensors, torch.float32)
    stride, _, dilation, groups = geometry
    with pytest.raises(ValueError, match="bias"):
        conv.conv2d_forward(x, w, b[:3], *geometry, "epsilon", [0.1])
    with pytest.raises(ValueError, match="padding"):
        conv.conv2d_forward(x, w, b, stride, [-1, 0], dilation, groups, "epsilon", [0.1])
    saved = conv.conv2d_forward(x, w, b, *geometry, "epsilon", [0.1])
    for wrong in (relevance[..., :-1], relevance[:1]):
        with pytest.raises(ValueError, match="relevance"):
            conv.conv2d_relevance(x, w, b, saved, wrong, *geometry, "epsilon", [0.1])


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("rule", ["alphabeta", "zbox", "gamma"])
def test_the_op_completes_lean_saved_for_the_kernel(monkeypatch, rule):
    """docs/ops.md: the relevance op takes ``saved`` as ``[]`` or ``[z]`` too (one more product
    instead of the memory); on the Triton backend the missing entries are recomputed for the
    kernel, which reads every one."""
    from relprop.ops import conv as conv_ops

    monkeypatch.setenv("RELPROP_BACKEND", "triton")
    tensors, geometry = make_case((2, 5, 7, 9), 6, FULL_GEOMETRIES["k3s2p1d2g1"], True, True, 9)
    x, w, b, relevance = _as(tensors, torch.float32)
    params = FULL_PARAMS[rule]
    saved = conv_ops.conv2d_forward(x, w, b, *geometry, rule, params)
    full = conv_ops.conv2d_relevance(x, w, b, saved, relevance, *geometry, rule, params)
    for lean in (saved[:1], []):
        got = conv_ops.conv2d_relevance(x, w, b, lean, relevance, *geometry, rule, params)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6 * full.abs().max().item())
