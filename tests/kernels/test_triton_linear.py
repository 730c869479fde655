"""The fused Triton linear kernels against a float64 re-implementation of docs/ops.md.

Criterion (flash-attention's): the kernel's largest error against float64 arithmetic on the same
inputs (rounded to the kernel's dtype) is at most twice that of the same formula computed by
plain torch in that dtype, plus a few ulps of the scale.
"""

from __future__ import annotations

import pytest
import torch
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

if CAN_RUN:
    from relprop._kernels.triton import linear


def _product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` written as an explicit sum over the inputs, independent of any GEMM."""
    z = (x[..., None, :] * w).sum(-1)
    return z if b is None else z + b


def _transposed(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``Wᵀs`` per sample, as an explicit sum over the outputs."""
    return (s[..., :, None] * w).sum(-2)


def reference(x, w, b, relevance, rule, params):
    """docs/ops.md with explicit sums for the products: returns (saved, input relevance)."""
    return rule_reference(x, w, b, relevance, rule, params, _product, _transposed)


def make_case(batch_shape, n_in, n_out, nonneg, with_bias, rule, seed, dtype=torch.float32):
    """Inputs in float64: x (mixed or non-negative), W, b and a relevance R.

    For non-negative inputs R is zero where z < 0, as after a ReLU; for mixed inputs it is
    random everywhere, so γ's z < 0 stream is exercised too.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch_shape, n_in, generator=gen, dtype=torch.float64)
    if nonneg:
        x = x.clamp(min=0)
    w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) / n_in**0.5
    b = torch.randn(n_out, generator=gen, dtype=torch.float64) if with_bias else None
    relevance = torch.randn(*batch_shape, n_out, generator=gen, dtype=torch.float64)
    if nonneg:
        relevance = relevance * (_product(x, w, b) > 0)
    return [None if t is None else t.to(DEVICE) for t in (x, w, b, relevance)]


def _as(tensors, dtype):
    return [None if t is None else t.to(dtype) for t in tensors]


def check_against_reference(case, rule, params, dtype=torch.float32, ulps=4.0):
    x = case[0]
    # The truth is float64 arithmetic on the inputs as the kernel receives them (rounded to
    # dtype), as in flash-attention's tests: the criterion compares the kernel's arithmetic with
    # torch's, not the rounding of the inputs, which ill-conditioned entries (z near 0)
    # amplify alike for both and which neither can undo.
    saved_truth, r_truth = reference(*_as(_as(case, dtype), torch.float64), rule, params)
    saved_low, r_low = reference(*_as(case, dtype), rule, params)
    xk, wk, bk, rk = _as(case, dtype)
    saved = linear.linear_forward(xk, wk, bk, rule, params)
    r_kernel = linear.linear_relevance(xk, wk, bk, saved, rk, rule, params)
    assert len(saved) == len(saved_truth)
    for name, kernel, low, truth in zip(["z", "aux0", "aux1"], saved, saved_low, saved_truth):
        assert kernel.dtype == dtype and kernel.shape == truth.shape, name
        assert_flash_close(kernel, low, truth, ulps)
    assert r_kernel.dtype == dtype and r_kernel.shape == x.shape
    assert_flash_close(r_kernel, r_low, r_truth, ulps)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize(("rule", "params"), RULES, ids=RULE_IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("nonneg", [False, True], ids=["mixed", "nonneg"])
@pytest.mark.parametrize(
    ("batch_shape", "n_in", "n_out"), [((3,), 5, 7), ((17,), 33, 19), ((2, 3), 5, 7)]
)
def test_matches_float64_reference(batch_shape, n_in, n_out, nonneg, with_bias, rule, params):
    case = make_case(batch_shape, n_in, n_out, nonneg, with_bias, rule, seed=n_in + 7 * n_out)
    check_against_reference(case, rule, params)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("rule", ["gamma", "alphabeta", "epsilon"])
def test_two_runs_are_bitwise_equal(rule):
    params = FULL_PARAMS[rule]
    x, w, b, relevance = _as(make_case((19,), 37, 21, False, True, rule, seed=3), torch.float32)
    runs = []
    for _ in range(2):
        saved = linear.linear_forward(x, w, b, rule, params)
        runs.append([*saved, linear.linear_relevance(x, w, b, saved, relevance, rule, params)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@needs_triton
@pytest.mark.interpret
def test_lrp0_gives_zero_not_nan_where_nothing_arrives():
    """ε = 0 (LRP-0) and a sample with no input: z = 0 and R = 0 there, so 0/stab(0, 0)."""
    case = make_case((4,), 6, 5, True, False, "epsilon", seed=13)
    case[0][1] = 0.0
    check_against_reference(case, "epsilon", [0.0])


@needs_triton
@pytest.mark.interpret
def test_relevance_accepts_the_reference_saved_tensors():
    """The contract fixes ``saved``: the reference's tensors work as well as the kernel's."""
    rule, params = "alphabeta", [2.0, 1.0, 1e-6, 1.0]
    case = make_case((5,), 9, 11, False, True, rule, seed=11)
    r_truth = reference(*case, rule, params)[1]
    saved_low, r_low = reference(*_as(case, torch.float32), rule, params)
    x, w, b, relevance = _as(case, torch.float32)
    r_kernel = linear.linear_relevance(x, w, b, saved_low, relevance, rule, params)
    assert_flash_close(r_kernel, r_low, r_truth)


@needs_triton
@pytest.mark.interpret
def test_rejects_wrong_params_and_dtypes():
    x, w, b, _ = _as(make_case((2,), 3, 4, False, True, "epsilon", seed=0), torch.float32)
    with pytest.raises(ValueError, match="takes 1 params"):
        linear.linear_forward(x, w, b, "epsilon", [0.1, 0.2])
    with pytest.raises(ValueError, match="unknown rule"):
        linear.linear_forward(x, w, b, "zminus", [0.1])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        linear.linear_forward(x.double(), w.double(), b.double(), "epsilon", [0.1])


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("rule", ["zplus", "alphabeta", "gamma"])
@pytest.mark.parametrize("nonneg", [False, True], ids=["mixed", "nonneg"])
def test_float16_matches_float64_reference(nonneg, rule):
    """16-bit inputs take their own forward for α-β (z⁻ = z − z⁺ from fp32 accumulators)."""
    params = FULL_PARAMS[rule]
    case = make_case((3,), 37, 21, nonneg, True, rule, seed=8)
    check_against_reference(case, rule, params, dtype=torch.float16, ulps=2.0)


@needs_triton
@pytest.mark.interpret
def test_float16_gamma_where_plain_torch_overflows():
    """The GPU test's γ case: plain torch in float16 overflows to NaN here (its shares leave the
    range), the kernel (float32 inside) stays finite and within a few ulps of the float64 truth."""
    rule = "gamma"
    params = FULL_PARAMS[rule]
    case = make_case((67,), 300, 130, True, True, rule, seed=5)
    _, torch_low = reference(*_as(case, torch.float16), rule, params)
    assert not torch.isfinite(torch_low).all()
    check_against_reference(case, rule, params, dtype=torch.float16, ulps=2.0)


def dead_inhibitor_case(seed: int = 3):
    """A non-negative input whose first 5 features are 0 for every sample and a unit 0 whose
    negative weights (and bias) all sit there: its ``z⁻`` is exactly 0, and α-β's share
    ``R/stab(0, 1e-6)`` is past float16's range (~1e6)."""
    x, w, b, relevance = make_case((4,), 23, 9, True, True, "alphabeta", seed)
    x[:, :5] = 0.0
    w[0, 5:] = w[0, 5:].abs()
    b[0] = b[0].abs()
    relevance[:, 0] = 1.0 + relevance[:, 0].abs()
    return [x, w, b, relevance]


@needs_triton
@pytest.mark.interpret
def test_float16_share_past_the_range_does_not_make_nan():
    """Stored in float16 an overflowed share is inf, and the transposed product gives
    ``inf · 0 = NaN`` for every input of the unit. The kernels saturate it at 65504 (as
    ``relprop::stabilized_divide`` does), which the zero inputs and weights then zero exactly,
    as in float64."""
    rule, params = "alphabeta", [2.0, 1.0, 1e-6, 1.0]
    case = dead_inhibitor_case()
    saved_truth, _ = reference(*_as(_as(case, torch.float16), torch.float64), rule, params)
    assert (saved_truth[2][:, 0] == 0).all()  # z⁻ of unit 0
    _, torch_low = reference(*_as(case, torch.float16), rule, params)
    assert not torch.isfinite(torch_low).all()  # the case is real: plain float16 torch has NaN
    check_against_reference(case, rule, params, dtype=torch.float16, ulps=2.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("rule", "params"), RULES, ids=RULE_IDS)
@pytest.mark.parametrize("nonneg", [False, True], ids=["mixed", "nonneg"])
def test_half_precision_on_gpu(nonneg, rule, params, dtype):
    case = make_case((67,), 300, 130, nonneg, True, rule, seed=5)
    check_against_reference(case, rule, params, dtype=dtype, ulps=2.0)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("rule", ["epsilon", "alphabeta", "zbox"])
def test_strided_and_expanded_biases(rule):
    """A bias need not be contiguous (``nn.Parameter(t[::2])`` is legal, a folded BatchNorm's
    alias keeps its strides); the kernels once read it at unit stride, past its elements. It
    gives what its contiguous copy gives (checked against float64 elsewhere)."""
    x, w, b, relevance = _as(make_case((3,), 5, 4, False, True, rule, seed=5), torch.float32)
    params = FULL_PARAMS[rule]
    for strided in (torch.stack([b, b + 1], dim=1)[:, 0], b[:1].expand(4)):
        assert not strided.is_contiguous()
        for bias in (strided, strided.contiguous()):
            saved = linear.linear_forward(x, w, bias, rule, params)
            r_in = linear.linear_relevance(x, w, bias, saved, relevance, rule, params)
            if bias is strided:
                first = saved, r_in
        assert all(torch.equal(a, c) for a, c in zip(first[0], saved))
        assert torch.equal(first[1], r_in)


@needs_triton
@pytest.mark.interpret
def test_refuses_shapes_it_would_read_out_of_bounds():
    x, w, b, relevance = _as(make_case((2,), 5, 4, False, True, "epsilon", seed=6), torch.float32)
    with pytest.raises(ValueError, match="weight"):
        linear.linear_forward(x, w[:, :3], b, "epsilon", [0.1])
    with pytest.raises(ValueError, match="bias"):
        linear.linear_forward(x, w, b[:2], "epsilon", [0.1])
    saved = linear.linear_forward(x, w, b, "epsilon", [0.1])
    with pytest.raises(ValueError, match="relevance"):
        linear.linear_relevance(x, w, b, saved, relevance[:, :3], "epsilon", [0.1])
