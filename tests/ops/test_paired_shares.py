"""The paired shares of the α-β and γ rules against an independent float64 oracle.

The oracle writes the formula of docs/ops.md literally, in float64: the second denominator
``z_weight·z − zp``, then ``[scale·R / stab(zp, ε), second_scale·R / stab(second, ε)]`` side by
side along dim 1, 0 where a stabilised denominator is 0 and, with sign masks, where ``z > 0``
(first) or ``z < 0`` (second) fails (the one-share oracle of test_elementwise.py, applied twice).
"""

from __future__ import annotations

import pytest
import torch
from tests.ops._backends import CUDA, NATIVE_ISAS, needs_native, use_backend, use_cpu_isa
from tests.ops.test_elementwise import assert_matches_oracle, oracle, with_special_values

from relprop.ops import paired_shares as shares_ops
from relprop.ops.conv import conv_map


def pair_oracle(relevance, z, zp, epsilon, scale, second_scale, z_weight=1.0, masks=False,
                factor=None):  # fmt: skip
    # The op's product z_weight·z is rounded to the compute dtype (float32 for 16-bit types)
    # before zp is subtracted (docs/ops.md): a difference that cancels amplifies that rounding,
    # whatever the implementation, so the oracle rounds it the same way and is exact after it.
    compute = torch.float64 if z.dtype == torch.float64 else torch.float32
    second = (z.to(compute) * z_weight).double() - zp.double()
    reference = z if masks else None
    first_share = oracle(relevance, zp, epsilon, scale, reference, 1, factor)
    second_share = oracle(relevance, second, epsilon, second_scale, reference, -1, factor)
    return torch.cat([first_share, second_share], dim=1)


# (ε, scale, second_scale, z_weight, sign_masks): α-β's (α, −β, 1, off), γ's (1, 1, 2 + γ, on).
RULE_CASES = [
    (0.0, 2.0, -1.0, 1.0, False),
    (1e-6, 3.0, -2.0, 1.0, False),
    (0.25, 1.5, -0.5, 1.0, False),
    (0.0, 1.0, 1.0, 2.25, True),
    (0.25, 1.0, 1.0, 2.25, True),
]


def sample(shape, dtype=torch.float64, seed=7):
    """R, z, zp and a non-negative factor, with exact zeros of zp and of z − zp spread in."""
    g = torch.Generator().manual_seed(seed)
    relevance, z, zp = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    factor = torch.rand(shape, generator=g, dtype=torch.float64)
    if zp.numel():
        zp.view(-1)[::5] = 0.0
        zp.view(-1)[2::9] = -0.0
        z.view(-1)[3::7] = zp.view(-1)[3::7]  # z − zp = 0 exactly
    return tuple(t.to(dtype) for t in (relevance, z, zp, factor))


SHAPES = [(1, 1), (2, 3), (2, 3, 5, 7), (3, 4, 17, 19), (0, 4), (4, 2 * 16384 + 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", RULE_CASES, ids=str)
@pytest.mark.parametrize("with_factor", [False, True], ids=["plain", "factor"])
def test_matches_the_oracle(backend, dtype, shape, case, with_factor):
    relevance, z, zp, factor = sample(shape, dtype)
    factor = factor if with_factor else None
    out = shares_ops.paired_shares(relevance, z, zp, *case, factor)
    assert out.shape == (shape[0], 2 * shape[1], *shape[2:])
    assert_matches_oracle(out, pair_oracle(relevance, z, zp, *case, factor), dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_factor", [False, True], ids=["plain", "factor"])
def test_native_equals_the_reference_bitwise(monkeypatch, dtype, with_factor):
    relevance, z, zp, factor = sample((3, 5, 33, 31), dtype, seed=3)
    factor = factor if with_factor else None
    monkeypatch.setenv("RELPROP_BACKEND", "native")
    for case in RULE_CASES:
        args = (relevance, z, zp, *case, factor)
        native = shares_ops.paired_shares(*args)
        assert torch.equal(native, shares_ops.paired_shares_reference(*args)), case


@needs_native
@pytest.mark.parametrize("isa", NATIVE_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 37), (3, 2 * 16384 + 13)], ids=["tail", "threads"])
def test_every_cpu_instruction_set_equals_the_reference_bitwise(monkeypatch, isa, dtype, shape):
    """Both compiled copies of the CPU loop (baseline and AVX2, csrc/include/relprop/cpu_isa.h)
    give the reference's bits for every rule case, with and without a factor, with infinities,
    the largest finite values and subnormals among the operands."""
    use_cpu_isa(isa, monkeypatch)
    relevance, z, zp, factor = sample(shape, dtype, seed=41)
    relevance, z, zp = (with_special_values(t, k) for k, t in enumerate((relevance, z, zp)))
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    for case in RULE_CASES:
        for factor_arg in (None, with_special_values(factor, 3)):
            args = (relevance, z, zp, *case, factor_arg)
            expected = shares_ops.paired_shares_reference(*args)
            actual = shares_ops._paired_shares_native(*args)
            assert torch.equal(actual.view(bits), expected.view(bits)), case


@needs_native
def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setenv("RELPROP_BACKEND", "native")
    args = (*sample((5, 3 * 16384 + 11), torch.float32)[:3], *RULE_CASES[-1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = shares_ops.paired_shares(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, shares_ops.paired_shares(*args))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(backend, dtype):
    relevance, z, zp, factor = sample((2, 3, 9, 11), dtype)
    for case in (RULE_CASES[1], RULE_CASES[2], RULE_CASES[4]):
        out = shares_ops.paired_shares(relevance, z, zp, *case, factor)
        assert_matches_oracle(out, pair_oracle(relevance, z, zp, *case, factor), dtype)
        if dtype == torch.float16 and case[0] == 1e-6:
            # R / stab(0, 1e-6) is past float16's range: saturated (assert_matches_oracle).
            assert (out.abs() == 65504).any() and torch.isfinite(out).all()


def test_zero_factor_gives_zero_shares_whatever_the_relevance(backend):
    # As for relprop::stabilized_divide: R = relevance · factor is 0 where the factor (x) is,
    # also for a relevance that overflowed (inf · 0 would be NaN).
    relevance = torch.tensor([[float("inf"), -float("inf"), float("nan"), 3.0]])
    factor = torch.tensor([[0.0, 0.0, -0.0, 0.5]])
    z = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    zp = torch.tensor([[3.0, 3.0, 3.0, 3.0]])
    out = shares_ops.paired_shares(relevance, z, zp, 0.0, 2.0, -1.0, 1.0, False, factor)
    assert out.tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.5]]
    assert not torch.signbit(out).any()


def test_one_stacked_transposed_product_gives_the_rules_bracket(backend):
    """The reason the op exists: with the two weight sets stacked along the output channels, one
    transposed convolution of the paired shares is α·W⁺ᵀ(R/z⁺) − β·W⁻ᵀ(R/z⁻) (α-β) and
    (W + γW⁺)ᵀ([z>0]R/z_pos) + (W + γW⁻)ᵀ([z<0]R/z_neg) (γ), computed here in float64 as two
    separate products with each denominator from its own convolution."""
    g = torch.Generator().manual_seed(11)
    x = torch.rand(2, 3, 9, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    relevance = torch.randn(2, 4, 5, 4, generator=g, dtype=torch.float64)
    lin = conv_map((2, 2), (1, 1), (1, 1), 1)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    z, zp = lin.forward(x, weight, bias), lin.forward(x, wp, bias.clamp(min=0))
    zn = lin.forward(x, wn, bias.clamp(max=0))
    eps, alpha, beta = 1e-3, 2.0, 1.0
    shares = shares_ops.paired_shares(relevance, z, zp, eps, alpha, -beta)
    stacked = lin.transpose(shares, torch.cat([wp, wn]), x)
    expected = lin.transpose(oracle(relevance, zp, eps, alpha), wp, x) + lin.transpose(
        oracle(relevance, zn, eps, -beta), wn, x
    )
    torch.testing.assert_close(stacked, expected, rtol=1e-12, atol=1e-12)

    # γ: z_neg = (W + γW⁻)x + b + γb⁻ = (2 + γ)z − z_pos, shares kept by the sign of z.
    gamma = 0.25
    w_up, w_down = weight + gamma * wp, weight + gamma * wn
    z_pos = lin.forward(x, w_up, bias + gamma * bias.clamp(min=0))
    z_neg = lin.forward(x, w_down, bias + gamma * bias.clamp(max=0))
    shares = shares_ops.paired_shares(relevance, z, z_pos, eps, 1.0, 1.0, 2 + gamma, True)
    stacked = lin.transpose(shares, torch.cat([w_up, w_down]), x)
    expected = lin.transpose(oracle(relevance, z_pos, eps, 1.0, z, 1), w_up, x) + lin.transpose(
        oracle(relevance, z_neg, eps, 1.0, z, -1), w_down, x
    )
    torch.testing.assert_close(stacked, expected, rtol=1e-10, atol=1e-10)


def test_invalid_arguments_are_refused():
    relevance, z, zp, _ = sample((2, 3))
    with pytest.raises(ValueError, match="needs a batch and a channel dimension"):
        shares_ops.paired_shares(relevance[0], z[0], zp[0], 0.1, 2.0, -1.0)
    with pytest.raises(ValueError, match=r"zp has shape \(2, 2\), relevance \(2, 3\)"):
        shares_ops.paired_shares(relevance, z, zp[:, :2], 0.1, 2.0, -1.0)
    with pytest.raises(ValueError, match="z is torch.float32"):
        shares_ops.paired_shares(relevance, z.float(), zp, 0.1, 2.0, -1.0)
    with pytest.raises(ValueError, match="factor has shape"):
        shares_ops.paired_shares(relevance, z, zp, 0.1, 2.0, -1.0, factor=relevance[:1])
    with pytest.raises(ValueError, match="expected floating-point"):
        ints = torch.ones(2, 3, dtype=torch.int64)
        shares_ops.paired_shares(ints, ints, ints, 0.1, 2.0, -1.0)


def _opcheck_samples():
    relevance, z, zp, factor = sample((3, 5, 7), torch.float32)
    r64, z64, zp64, _ = sample((2, 9), torch.float64, seed=5)
    return [
        (relevance, z, zp, 1e-6, 2.0, -1.0, 1.0, False),
        (relevance, z, zp, 0.0, 3.0, -2.0, 1.0, False, factor),
        (r64, z64, zp64, 0.25, 1.0, 1.0, 2.25, True),
        (relevance, z, zp, 1e-6, 1.0, 1.0, 2.25, True, factor),
        (relevance, z, zp, 1e-6, 1.0, 1.0, 2.25, True, factor, zp[0, :, 0].clone()),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(backend, case):
    torch.library.opcheck(shares_ops.paired_shares_op, _opcheck_samples()[case])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_factor", [False, True], ids=["plain", "factor"])
def test_cuda_kernel_matches_the_oracle(cuda_device, dtype, with_factor):
    # Emulated, each thread runs in turn on the CPU: fewer (still several blocks of) elements.
    inner = 16384 + 9 if cuda_device.type == "cuda" else 1009
    relevance, z, zp, factor = sample((3, 7, inner), dtype, seed=21)
    factor = factor if with_factor else None
    cuda = [None if t is None else t.to(cuda_device) for t in (relevance, z, zp, factor)]
    for case in RULE_CASES:
        out = shares_ops.paired_shares(*cuda[:3], *case, cuda[3])
        expected = pair_oracle(relevance, z, zp, *case, factor)
        assert_matches_oracle(out.cpu(), expected, dtype)
        again = shares_ops.paired_shares(*cuda[:3], *case, cuda[3])
        assert torch.equal(out, again), "not deterministic"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", range(4))
def test_opcheck_cuda(monkeypatch, case):
    use_backend("cuda", monkeypatch)
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _opcheck_samples()[case])
    torch.library.opcheck(shares_ops.paired_shares_op, args)


@pytest.mark.parametrize("operand", ["z", "zp", "factor"])
def test_the_op_refuses_operands_of_another_shape(backend, operand):
    """Called as an op (torch.ops.relprop.paired_shares, not the checking wrapper), the
    reference broadcast a batch-1 operand against a batch-2 relevance and the kernels read past
    its end (inf and garbage in the second sample's shares)."""
    relevance, z, zp, factor = sample((2, 3), torch.float32, seed=8)
    operands = {"z": z, "zp": zp, "factor": factor}
    operands[operand] = operands[operand][:1].clone()
    with pytest.raises(ValueError, match=rf"{operand} has shape \(1, 3\)"):
        torch.ops.relprop.paired_shares(
            relevance, operands["z"], operands["zp"], 1e-6, 2.0, -1.0, 1.0, False,
            operands["factor"],
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inner", [(2, 8, 5), (3, 3, 3)], ids=["packs", "odd-inner"])
def test_cuda_kernel_gives_the_same_bits_at_any_alignment(cuda_device, dtype, inner):
    """The kernel takes 16 bytes of each operand a step where every address and the per-sample
    size allow it (80 elements: packs of 2, 4 or 8 stay in one sample; 27: never), else single
    elements: each operand offset gives the oracle's values, and operands shifted together the
    bits of aligned copies."""
    shape = (3, *inner)
    numel = 3 * torch.Size(inner).numel()
    buffers = [t.reshape(-1) for t in sample((numel + 3,), dtype, seed=41)]
    operands = [t.to(cuda_device) for t in buffers]
    case = RULE_CASES[4]  # γ's: both masks and both scales at work

    def shares(views):
        relevance, z, zp, factor = (v.view(shape) for v in views)
        return shares_ops.paired_shares(relevance, z, zp, *case, factor)

    for offsets in ((0, 0, 0, 0), (1, 0, 0, 0), (0, 2, 0, 0), (0, 0, 3, 0), (0, 0, 0, 1)):
        views = [t[k : k + numel] for t, k in zip(operands, offsets)]
        relevance, z, zp, factor = (v.cpu().view(shape) for v in views)
        expected = pair_oracle(relevance, z, zp, *case, factor)
        assert_matches_oracle(shares(views).cpu(), expected, dtype)
    shifted = [t[1 : 1 + numel] for t in operands]
    assert shifted[0].data_ptr() % 16 != 0
    assert torch.equal(shares(shifted), shares([v.clone() for v in shifted]))


def biased(zp: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``zp + bias`` along dim 1, added in the dtype the op computes in (the contract)."""
    compute = torch.float32 if zp.dtype in (torch.float16, torch.bfloat16) else zp.dtype
    return zp.to(compute) + bias.to(compute).view((1, -1) + (1,) * (zp.dim() - 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 7, 9), (3, 4, 16)], ids=str)
@pytest.mark.parametrize("case", [RULE_CASES[1], RULE_CASES[4]], ids=["alpha-beta", "gamma"])
def test_zp_bias_is_added_per_channel(backend, dtype, shape, case):
    """The layer's modified bias, added to zp inside the pass: in both shares' denominators
    (the second is z_weight·z − (zp + b)), each channel its own value."""
    relevance, z, zp, factor = sample(shape, dtype, seed=71)
    bias = torch.randn(shape[1], generator=torch.Generator().manual_seed(72), dtype=torch.float64)
    bias = bias.to(dtype)
    out = shares_ops.paired_shares(relevance, z, zp, *case, factor, bias)
    expected = pair_oracle(relevance, z, biased(zp, bias), *case, factor)
    assert_matches_oracle(out, expected, dtype)
    if dtype in (torch.float32, torch.float64):
        # One rounding of zp + b either way: the same bits as the bias added in a pass before.
        before = shares_ops.paired_shares(relevance, z, biased(zp, bias), *case, factor)
        assert torch.equal(out, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [16, 9], ids=["packs", "odd-rows"])
def test_cuda_kernel_adds_the_zp_bias_at_any_alignment(cuda_device, dtype, per_channel):
    """With a bias of zp a step of the wide kernel stays in one channel: 16 elements per channel
    take packs of 2, 4 and 8 where the addresses allow, 9 single elements."""
    shape = (3, 5, per_channel)
    numel = 3 * 5 * per_channel
    buffers = [t.reshape(-1) for t in sample((numel + 3,), dtype, seed=73)]
    bias = torch.randn(5, generator=torch.Generator().manual_seed(74), dtype=torch.float64)
    bias = bias.to(dtype)
    operands = [t.to(cuda_device) for t in buffers]
    case = RULE_CASES[4]
    for offset in (0, 1):
        views = [t[offset : offset + numel].view(shape) for t in operands]
        out = shares_ops.paired_shares(*views[:3], *case, views[3], bias.to(cuda_device))
        relevance, z, zp, factor = (v.cpu() for v in views)
        expected = pair_oracle(relevance, z, biased(zp, bias), *case, factor)
        assert_matches_oracle(out.cpu(), expected, dtype)


@pytest.mark.parametrize("bias_shape", [(4,), (3, 1)], ids=str)
def test_a_zp_bias_without_one_value_per_channel_is_refused(backend, bias_shape):
    relevance, z, zp, _ = sample((2, 3, 5), torch.float32)
    bias = torch.zeros(bias_shape)
    with pytest.raises(ValueError, match=r"zp_bias has shape .* one value per channel"):
        shares_ops.paired_shares(relevance, z, zp, *RULE_CASES[0], zp_bias=bias)
    with pytest.raises(ValueError, match=r"zp_bias has shape .* one value per channel"):
        torch.ops.relprop.paired_shares(relevance, z, zp, *RULE_CASES[0], None, bias)


def test_a_strided_zp_bias_is_read_as_its_values(backend):
    relevance, z, zp, _ = sample((2, 3, 4, 5), torch.float32, seed=93)
    wide = torch.randn(6, generator=torch.Generator().manual_seed(94))
    strided = wide[::2]
    assert not strided.is_contiguous()
    out = shares_ops.paired_shares(relevance, z, zp, *RULE_CASES[4], zp_bias=strided)
    expected = pair_oracle(relevance, z, biased(zp, strided), *RULE_CASES[4])
    assert_matches_oracle(out, expected, torch.float32)
