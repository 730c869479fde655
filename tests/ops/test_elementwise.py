"""The fused stabilised division against an independent float64 oracle.

The oracle writes the formula of docs/ops.md literally, in float64:
``stab(d, e) = d + e·(sign(d) + [d = 0])`` (``torch.sign(-0.0)`` is ``-0.0`` and ``-0.0 == 0``, so
negative zero gets ``+e``), ``out = scale · n / stab(d, e)``, 0 where ``stab = 0`` and, with a sign
reference, 0 where ``sign · reference > 0`` fails.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tests.ops._backends import CUDA, NATIVE_ISAS, needs_native, use_backend, use_cpu_isa

from relprop import _native
from relprop.ops import elementwise

# Largest relative error of one element: stab, scale·n and the division each round once (plus
# float32(ε)), so a few units of roundoff; float16 and bfloat16 are computed in float32 and
# rounded once, at most one unit of roundoff (2^-11, 2^-8) on top.
RTOL = {
    torch.float64: 2.0**-50,
    torch.float32: 2.0**-21,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
}


def generator(seed: int = 1234) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def oracle(n, d, epsilon, scale=1.0, reference=None, sign=1, factor=None):
    n64, d64 = n.double(), d.double()
    if factor is not None:
        n64 = n64 * factor.double()
    stabilized = d64 + epsilon * (torch.sign(d64) + (d64 == 0).double())
    out = torch.where(stabilized == 0, torch.zeros_like(n64), scale * n64 / stabilized)
    if reference is not None:
        out = torch.where(sign * reference.double() > 0, out, torch.zeros_like(out))
    return out


def assert_matches_oracle(actual: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    assert actual.shape == expected.shape and actual.dtype == dtype
    assert actual.is_contiguous()
    actual = actual.double()
    # Entries the formula sets to 0 are exactly +0.0, whatever the numerator held.
    zero = expected == 0
    assert torch.equal(actual[zero], torch.zeros_like(actual[zero]))
    assert not torch.signbit(actual[zero]).any()
    # Quotients beyond the dtype's range: float16 saturates at ±65504 (an infinite share would
    # make NaN in the transposed product), the others are ±inf.
    overflow = torch.isinf(expected.to(dtype))
    stored = expected.clamp(-65504, 65504) if dtype == torch.float16 else expected
    assert torch.equal(actual[overflow], stored.to(dtype).double()[overflow])
    actual, expected = actual[~overflow], expected[~overflow]
    tiny = 2.0**-24 if dtype == torch.float16 else 0.0  # float16 subnormal spacing
    error = (actual - expected).abs()
    bound = RTOL[dtype] * expected.abs() + tiny
    worst = (error / expected.abs().clamp(min=tiny or 1e-300)).max() if error.numel() else 0.0
    assert (error <= bound).all(), f"max relative error {worst:.3e}"


def sample(shape, dtype=torch.float64, seed=1234, zeros=True):
    """Numerator, denominator and sign reference with exact ±0 entries spread through them."""
    g = generator(seed)
    n = torch.randn(shape, generator=g, dtype=torch.float64)
    d = torch.randn(shape, generator=g, dtype=torch.float64)
    reference = torch.randn(shape, generator=g, dtype=torch.float64)
    if zeros and n.numel() > 0:
        flat_d, flat_r = d.view(-1), reference.view(-1)
        flat_d[::5] = 0.0
        flat_d[2::7] = -0.0
        flat_r[1::6] = 0.0
        flat_r[3::11] = -0.0
    return n.to(dtype), d.to(dtype), reference.to(dtype)


SHAPES = [(), (1,), (7,), (3, 5, 7), (2, 3, 17, 19), (0, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("epsilon", [0.0, 1e-6, 0.25])
def test_matches_the_oracle(backend, dtype, shape, epsilon):
    n, d, _ = sample(shape, dtype)
    out = elementwise.stabilized_divide(n, d, epsilon)
    assert_matches_oracle(out, oracle(n, d, epsilon), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize(("epsilon", "scale"), [(0.0, 1.0), (1e-6, 2.0), (0.25, -0.75)])
def test_sign_mask_and_scale(backend, dtype, sign, epsilon, scale):
    n, d, reference = sample((3, 7, 11), dtype)
    out = elementwise.stabilized_divide(n, d, epsilon, scale, reference, sign)
    expected = oracle(n, d, epsilon, scale, reference, sign)
    assert_matches_oracle(out, expected, dtype)
    # The mask removes exactly the entries of the other sign and the zeros (±0) of the reference.
    kept = reference > 0 if sign > 0 else reference < 0
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))


def test_gamma_and_alpha_beta_terms(backend):
    # The rule terms the op serves, each against its literal torch composition in float64.
    n, zpos, z = sample((2, 4, 9, 9), torch.float64, zeros=False)
    zneg = -zpos.abs()
    e = 0.25
    positive = elementwise.stabilized_divide(n, zpos, e, sign_reference=z, sign=1)
    negative = elementwise.stabilized_divide(n, zneg, e, sign_reference=z, sign=-1)
    alpha = elementwise.stabilized_divide(n, zpos.abs(), e, scale=2.0)
    beta = elementwise.stabilized_divide(n, zneg, e, scale=-1.0)
    torch.testing.assert_close(positive, (z > 0) * n / (zpos + e * torch.sign(zpos)))
    torch.testing.assert_close(negative, (z < 0) * n / (zneg - e))
    torch.testing.assert_close(alpha, 2.0 * n / (zpos.abs() + e))
    torch.testing.assert_close(beta, -1.0 * n / (zneg - e))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_epsilon_zero_gives_zero_for_zero_denominators(backend, dtype):
    n = torch.tensor([3.0, -2.0, 5.0, 0.0, 1.5, -4.0], dtype=dtype)
    d = torch.tensor([0.0, -0.0, 2.0, 0.0, -0.5, 0.0], dtype=dtype)
    out = elementwise.stabilized_divide(n, d, 0.0)
    expected = torch.tensor([0.0, 0.0, 2.5, 0.0, -3.0, 0.0], dtype=dtype)
    assert torch.equal(out, expected)
    assert not torch.signbit(out[[0, 1, 3, 5]]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negative_zero_counts_as_positive(backend, dtype):
    # stab(-0.0, e) = +e, so 1 / stab = 1/e: 2.0 for e = 0.5, not -2.0.
    n = torch.tensor([1.0, 1.0, 1.0], dtype=dtype)
    d = torch.tensor([-0.0, 0.0, -0.25], dtype=dtype)
    out = elementwise.stabilized_divide(n, d, 0.5)
    assert torch.equal(out, torch.tensor([2.0, 2.0, -4.0 / 3.0], dtype=dtype))


def test_masked_entries_are_zero_even_for_non_finite_values(backend):
    n = torch.tensor([float("inf"), float("nan"), 1.0, float("nan"), 2.0])
    d = torch.tensor([1.0, 2.0, float("nan"), 0.0, 4.0])
    reference = torch.tensor([-1.0, 0.0, -2.0, -0.0, 3.0])
    out = elementwise.stabilized_divide(n, d, 0.0, 1.0, reference, 1)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5]))


@pytest.mark.parametrize("sign", [0, 1, -1])
def test_multithreaded_chunks_match_the_oracle(backend, sign):
    # More than the native loop's parallel threshold (4 chunks of 16384) with a ragged tail, so
    # several OpenMP threads and a partial last chunk take part.
    n, d, reference = sample((5 * 16384 + 13,), torch.float32, seed=7)
    if sign == 0:
        out = elementwise.stabilized_divide(n, d, 1e-3)
        expected = oracle(n, d, 1e-3)
    else:
        out = elementwise.stabilized_divide(n, d, 1e-3, 0.5, reference, sign)
        expected = oracle(n, d, 1e-3, 0.5, reference, sign)
    assert_matches_oracle(out, expected, torch.float32)


def test_results_do_not_depend_on_the_split(backend):
    # Deterministic and element-wise: repeated runs agree bitwise, and so do runs on pieces
    # (which the native loop handles single-threaded and with other chunk boundaries).
    n, d, reference = sample((6 * 16384 + 5,), torch.float32, seed=11)
    whole = elementwise.stabilized_divide(n, d, 1e-6, 1.0, reference, -1)
    assert torch.equal(whole, elementwise.stabilized_divide(n, d, 1e-6, 1.0, reference, -1))
    bounds = [0, 1, 9999, 50001, n.numel()]
    pieces = [
        elementwise.stabilized_divide(n[a:b], d[a:b], 1e-6, 1.0, reference[a:b], -1)
        for a, b in zip(bounds, bounds[1:])
    ]
    assert torch.equal(whole, torch.cat(pieces))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_factor", [False, True], ids=["plain", "factor"])
def test_native_equals_the_reference_bitwise(monkeypatch, dtype, masked, with_factor):
    # Same operations in the same order, IEEE rounding on both sides.
    n, d, reference = sample((4, 9, 31), dtype, seed=3)
    reference = reference if masked else None
    factor = sample((4, 9, 31), dtype, seed=4)[0] if with_factor else None
    monkeypatch.setenv("RELPROP_BACKEND", "native")
    native = elementwise.stabilized_divide(n, d, 1e-6, -0.5, reference, 1, factor)
    monkeypatch.setenv("RELPROP_BACKEND", "reference")
    expected = elementwise.stabilized_divide(n, d, 1e-6, -0.5, reference, 1, factor)
    assert torch.equal(native, expected)


def with_special_values(t: torch.Tensor, offset: int) -> torch.Tensor:
    """``t`` with infinities, the largest finite values and subnormals spread through it (from
    ``offset`` on, so that operands get them at different places); NaN stays out: its payload is
    not part of the contract."""
    info = torch.finfo(t.dtype)
    flat = t.clone().view(-1)
    flat[offset::13] = float("inf")
    flat[offset + 3 :: 17] = -float("inf")
    flat[offset + 5 :: 19] = info.max
    flat[offset + 7 :: 23] = info.smallest_normal / 8  # subnormal
    flat[offset + 9 :: 29] = -info.smallest_normal / 3
    return flat.view_as(t)


@needs_native
@pytest.mark.parametrize("isa", NATIVE_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [37, 5 * 16384 + 13], ids=["tail", "threads"])
def test_every_cpu_instruction_set_equals_the_reference_bitwise(monkeypatch, isa, dtype, length):
    """The CPU loop is compiled for the baseline target and for AVX2 (one picked at run time,
    csrc/include/relprop/cpu_isa.h): each copy gives the reference's bits, on a vector tail and on
    the multithreaded chunks, for every mask and with a factor, with infinities, the largest
    finite values and subnormals among the operands."""
    use_cpu_isa(isa, monkeypatch)
    n, d, reference = sample((length,), dtype, seed=31)
    n, d = with_special_values(n, 0), with_special_values(d, 2)
    factor = with_special_values(sample((length,), dtype, seed=32)[0].abs(), 4)
    cases = [
        (0.0, 1.0, None, 1, None),
        (1e-6, -0.5, reference, 1, None),
        (0.25, 2.0, reference, -1, factor),
        (1e-6, 1.0, None, 1, factor),
    ]
    for epsilon, scale, sign_reference, sign, factor_arg in cases:
        args = (n, d, epsilon, scale, sign_reference, sign, factor_arg)
        expected = elementwise.stabilized_divide_reference(*args)
        actual = elementwise._stabilized_divide_native(*args)
        assert _native.cpu_isa() == isa
        # Bit patterns, not values: -0.0 must stay -0.0, and inf · 0 must not become NaN.
        bits = torch.int32 if dtype == torch.float32 else torch.int64
        assert torch.equal(actual.view(bits), expected.view(bits)), (epsilon, scale, sign)


@needs_native
def test_the_loops_use_avx2_where_the_machine_has_it():
    """The module picks the AVX2 copy exactly where the CPU reports AVX2 (read here from
    /proc/cpuinfo, or from torch's own dispatch where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next(line for line in info if line.startswith("flags")).split()
        has_avx2 = "avx2" in flags
    except (OSError, StopIteration):
        has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert _native.cpu_isa() == ("avx2" if has_avx2 else "baseline")
    assert NATIVE_ISAS == (["baseline", "avx2"] if has_avx2 else ["baseline"])


@needs_native
def test_an_unknown_instruction_set_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'.*'baseline' or 'avx2'"):
        _native.native().set_cpu_isa("sse9")
    if "avx2" not in NATIVE_ISAS:
        with pytest.raises(ValueError, match="cannot run 'avx2'.*supported: baseline"):
            _native.native().set_cpu_isa("avx2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sign", [0, 1, -1])
@pytest.mark.parametrize("shape", [(7,), (2, 3, 17, 19), (3, 16384 * 5 + 7)], ids=str)
def test_factor_multiplies_the_numerator(backend, dtype, sign, shape):
    """``factor`` gives ``scale · (n · f) / stab(d, ε)``: a relevance ``c · x`` divided without
    being formed (the last shape runs the multithreaded chunks)."""
    n, d, reference = sample(shape, dtype, seed=11)
    factor = sample(shape, dtype, seed=12)[0].abs()  # an input after a ReLU: x ≥ 0
    factor.view(-1)[::9] = 0.0
    reference_arg = None if sign == 0 else reference
    out = elementwise.stabilized_divide(n, d, 0.25, -1.5, reference_arg, sign or 1, factor)
    expected = oracle(n, d, 0.25, -1.5, reference_arg, sign or 1, factor)
    assert out.shape == expected.shape and out.dtype == dtype and out.is_contiguous()
    # One more rounding (the product) than the plain division; where the factor is 0 the result
    # is a zero of either sign, as n · 0 is.
    torch.testing.assert_close(out.double(), expected, rtol=2 * RTOL[dtype], atol=0)
    formed = elementwise.stabilized_divide(n * factor, d, 0.25, -1.5, reference_arg, sign or 1)
    torch.testing.assert_close(out, formed, rtol=4 * RTOL[dtype], atol=0)


def test_factor_of_another_shape_is_refused():
    n, d, _ = sample((3, 4), torch.float32)
    with pytest.raises(ValueError, match="factor has shape"):
        elementwise.stabilized_divide(n, d, 0.1, factor=torch.ones(4, 3))


def test_strided_inputs(backend):
    n, d, reference = sample((9, 13), torch.float64)
    out = elementwise.stabilized_divide(n.T, d.T, 1e-3, 1.0, reference.T, 1)
    assert_matches_oracle(out, oracle(n.T, d.T, 1e-3, 1.0, reference.T, 1), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(backend, dtype):
    # The CUDA kernel and the reference compute in float32 and round once (the CPU twin takes
    # float32 and float64 only, so `native` runs the reference here).
    n, d, reference = sample((5, 23), dtype)
    out = elementwise.stabilized_divide(n, d, 0.25, 1.5, reference, -1)
    assert_matches_oracle(out, oracle(n, d, 0.25, 1.5, reference, -1), dtype)


def test_float16_shares_saturate_instead_of_overflowing(backend):
    # 1 / stab(0, 1e-9) is 1e9 in float32, past float16's 65504: stored as ±65504, never ±inf,
    # so that a zero weight or input still zeroes it in the product (inf · 0 would be NaN). A NaN
    # stays a NaN. Oracle: float64, clamped to float16's range by hand.
    n = torch.tensor([1.0, -1.0, 3.0, 1.0, float("nan"), 2.0], dtype=torch.float16)
    d = torch.tensor([0.0, 0.0, 1e-5, -1e-5, 1.0, 4.0], dtype=torch.float16)
    out = elementwise.stabilized_divide(n, d, 1e-9)
    assert out.dtype == torch.float16
    assert out[[0, 1, 2, 3, 5]].tolist() == [65504.0, -65504.0, 65504.0, -65504.0, 0.5]
    assert out[4].isnan()
    products = out[:4].unsqueeze(0) * torch.zeros(1, 4, dtype=torch.float16)
    assert torch.equal(products, torch.zeros_like(products))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_factor_gives_zero_whatever_the_numerator(backend, dtype):
    # A relevance c · x is 0 where x is: also where c overflowed (float16 c = Wᵀs past 65504)
    # and inf · 0 would be NaN. The oracle is that definition, not the IEEE product.
    n = torch.tensor([float("inf"), -float("inf"), float("nan"), 2.0, 3.0], dtype=dtype)
    factor = torch.tensor([0.0, -0.0, 0.0, 0.5, 0.0], dtype=dtype)
    d = torch.full_like(n, 2.0)
    out = elementwise.stabilized_divide(n, d, 0.25, 1.0, None, 1, factor)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.0, 1.0 / 2.25, 0.0], dtype=dtype))
    assert not torch.signbit(out).any()


def test_invalid_arguments_are_refused():
    n = torch.randn(3, 4)
    with pytest.raises(ValueError, match="shape"):
        elementwise.stabilized_divide(n, torch.randn(4, 3), 0.1)
    with pytest.raises(ValueError, match="float64"):
        elementwise.stabilized_divide(n, torch.randn(3, 4, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="sign_reference has shape"):
        elementwise.stabilized_divide(n, n, 0.1, 1.0, torch.randn(3), 1)
    with pytest.raises(ValueError, match="sign must be"):
        elementwise.stabilized_divide(n, n, 0.1, 1.0, n, 0)
    with pytest.raises(ValueError, match="floating-point"):
        ones = torch.ones(3, dtype=torch.int64)
        elementwise.stabilized_divide(ones, ones, 0.1)


def test_missing_native_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("RELPROP_BACKEND", raising=False)
    monkeypatch.delenv("RELPROP_ALLOW_NO_NATIVE", raising=False)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_error", "ImportError: simulated")
    monkeypatch.setattr(_native, "_warned", False)
    n, d, _ = sample((4, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = elementwise.stabilized_divide(n, d, 0.0)
        elementwise.stabilized_divide(n, d, 0.1)
    assert len([w for w in caught if "relprop._C" in str(w.message)]) == 1
    assert_matches_oracle(first, oracle(n, d, 0.0), torch.float64)
    monkeypatch.setenv("RELPROP_BACKEND", "native")
    with pytest.raises(RuntimeError, match="relprop._C is not available"):
        elementwise.stabilized_divide(n, d, 0.1)


def _opcheck_samples():
    n, d, reference = sample((3, 5, 7), torch.float32)
    n64, d64, reference64 = sample((2, 9), torch.float64, seed=5)
    return [
        (n, d, 1e-6, 1.0, None, 1),
        (n, d, 0.0, 2.0, reference, -1),
        (n64, d64, 0.25, -1.0, reference64, 1),
        (n, d, 1e-6, 1.0, reference, 1, reference.abs()),
        (n, d, 1e-6, 1.0, reference, -1, reference.abs(), n[0, :, 0].clone()),
        (n, d, 1e-6, 1.0, None, 1, reference.abs(), None, d.flip(0)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(backend, case):
    torch.library.opcheck(elementwise.stabilized_divide_op, _opcheck_samples()[case])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sign", [0, 1, -1])
def test_cuda_kernel_matches_the_oracle(cuda_device, dtype, sign):
    # Emulated, each thread runs in turn on the CPU: fewer (still several blocks of) elements.
    shape = (3, 16384 * 5 + 7) if cuda_device.type == "cuda" else (3, 2053)
    n, d, reference = (t.to(cuda_device) for t in sample(shape, dtype, seed=21))
    reference_arg = None if sign == 0 else reference
    factor = sample(shape, dtype, seed=22)[0].abs().to(cuda_device)
    for epsilon, factor_arg in ((0.0, None), (0.25, None), (0.25, factor)):
        out = elementwise.stabilized_divide(
            n, d, epsilon, -1.5, reference_arg, sign or 1, factor_arg
        )
        expected = oracle(n.cpu(), d.cpu(), epsilon, -1.5, None if sign == 0 else reference.cpu(),
                          sign or 1, None if factor_arg is None else factor.cpu())  # fmt: skip
        assert_matches_oracle(out.cpu(), expected, dtype)
        again = elementwise.stabilized_divide(
            n, d, epsilon, -1.5, reference_arg, sign or 1, factor_arg
        )
        assert torch.equal(out, again), "not deterministic"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", range(4))
def test_opcheck_cuda(monkeypatch, case):
    use_backend("cuda", monkeypatch)
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _opcheck_samples()[case])
    torch.library.opcheck(elementwise.stabilized_divide_op, args)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("operand", ["denominator", "sign_reference", "factor"])
def test_the_op_refuses_operands_of_another_shape(monkeypatch, backend, operand):
    """Called as an op (torch.ops.relprop.stabilized_divide), the reference broadcast a batch-1
    operand against a batch-2 numerator and the native kernel read past its end."""
    if backend == "native" and not _native.native_available():
        pytest.skip("needs relprop._C")
    use_backend(backend, monkeypatch)
    numerator = torch.randn(2, 3)
    operands = {"denominator": torch.randn(2, 3), "sign_reference": None, "factor": None}
    operands[operand] = torch.randn(1, 3)
    with pytest.raises(ValueError, match=rf"{operand} has shape \(1, 3\)"):
        torch.ops.relprop.stabilized_divide(
            numerator, operands["denominator"], 1e-6, 1.0, operands["sign_reference"], 1,
            operands["factor"],
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_kernel_gives_the_same_bits_at_any_alignment(cuda_device, dtype):
    """The kernel takes 16 bytes of each operand a step where every address allows it, and
    single elements where one does not (a view starting inside its allocation): each operand
    offset gives the oracle's values, and operands shifted together the bits of aligned copies,
    in the packs and in the tail after them (109 = 13 packs of 8 + 5)."""
    length = 109
    n, d, reference = sample((length + 3,), dtype, seed=31)
    factor = sample((length + 3,), dtype, seed=32)[0]
    operands = [t.to(cuda_device) for t in (n, d, reference, factor)]

    def divide(views):
        return elementwise.stabilized_divide(views[0], views[1], 0.25, -1.5, views[2], 1, views[3])

    for offsets in ((0, 0, 0, 0), (1, 0, 0, 0), (0, 3, 0, 0), (0, 0, 2, 0), (0, 0, 0, 1)):
        views = [t[k : k + length] for t, k in zip(operands, offsets)]
        n_view, d_view, reference_view, factor_view = (v.cpu() for v in views)
        expected = oracle(n_view, d_view, 0.25, -1.5, reference_view, 1, factor_view)
        assert_matches_oracle(divide(views).cpu(), expected, dtype)
    shifted = [t[1 : 1 + length] for t in operands]
    assert shifted[0].data_ptr() % 16 != 0
    assert torch.equal(divide(shifted), divide([v.clone() for v in shifted]))


def biased(d: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``d + bias`` along dim 1, added in the dtype the op computes in (the contract)."""
    compute = torch.float32 if d.dtype in (torch.float16, torch.bfloat16) else d.dtype
    view = bias.to(compute).view((1, -1) + (1,) * (d.dim() - 2))
    return d.to(compute) + view


# (N, C): one element per row; (N, C, H, W) rows of 63; rows of 16 (packs of 2, 4 and 8 fit).
BIAS_SHAPES = [(4, 5), (2, 3, 7, 9), (3, 4, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=str)
@pytest.mark.parametrize("sign", [0, 1, -1])
def test_denominator_bias_is_added_per_channel(backend, dtype, shape, sign):
    """The layer's bias, added to the denominator inside the pass: each channel its own value,
    also where it cancels the denominator to 0 (ε = 0 keeps those entries exactly 0)."""
    n, d, reference = sample(shape, dtype, seed=51)
    factor = sample(shape, dtype, seed=52)[0].abs()
    bias = torch.randn(shape[1], generator=generator(53), dtype=torch.float64).to(dtype)
    d[::2, 1] = -bias[1]  # d + b = 0 exactly in channel 1 of every other sample
    reference_arg = None if sign == 0 else reference
    for epsilon in (0.0, 0.25):
        out = elementwise.stabilized_divide(n, d, epsilon, -1.5, reference_arg, sign or 1, factor,
                                            bias)  # fmt: skip
        expected = oracle(n, biased(d, bias), epsilon, -1.5, reference_arg, sign or 1, factor)
        assert_matches_oracle(out, expected, dtype)
    if dtype in (torch.float32, torch.float64):
        # One rounding of d + b either way: the same bits as the bias added in a pass before.
        assert torch.equal(
            elementwise.stabilized_divide(n, d, 0.25, 1.0, None, 1, None, bias),
            elementwise.stabilized_divide(n, biased(d, bias), 0.25, 1.0),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inner", [16, 9], ids=["packs", "odd-rows"])
def test_cuda_kernel_adds_the_bias_at_any_alignment(cuda_device, dtype, inner):
    """With a denominator bias a step of the wide kernel stays in one channel's row: rows of 16
    take packs of 2, 4 and 8 where the addresses allow, rows of 9 single elements."""
    shape = (3, 5, inner)
    numel = 3 * 5 * inner
    n, d, reference = (t.reshape(-1) for t in sample((numel + 3,), dtype, seed=61))
    bias = torch.randn(5, generator=generator(62), dtype=torch.float64).to(dtype)
    operands = [t.to(cuda_device) for t in (n, d, reference)]
    for offset in (0, 1):
        views = [t[offset : offset + numel].view(shape) for t in operands]
        out = elementwise.stabilized_divide(
            views[0], views[1], 0.25, 1.0, views[2], 1, None, bias.to(cuda_device)
        )
        cpu = [v.cpu() for v in views]
        expected = oracle(cpu[0], biased(cpu[1], bias), 0.25, 1.0, cpu[2], 1)
        assert_matches_oracle(out.cpu(), expected, dtype)


@pytest.mark.parametrize("bias_shape", [(4,), (1,), (3, 1)], ids=str)
def test_a_bias_without_one_value_per_channel_is_refused(backend, bias_shape):
    n, d, _ = sample((2, 3, 5), torch.float32)
    bias = torch.zeros(bias_shape)
    with pytest.raises(ValueError, match=r"denominator_bias has shape .* one value per channel"):
        elementwise.stabilized_divide(n, d, 0.1, denominator_bias=bias)
    with pytest.raises(ValueError, match=r"denominator_bias has shape .* one value per channel"):
        torch.ops.relprop.stabilized_divide(n, d, 0.1, 1.0, None, 1, None, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_factor", [False, True], ids=["plain", "factor"])
def test_numerator_addend_is_added_before_the_factor(backend, dtype, with_factor):
    """A relevance ``(c₁ + c₂) · x`` reaching a tensor along two paths: the coefficients are
    summed inside the pass (in the compute dtype), then multiplied by the factor."""
    n, d, reference = sample((3, 4, 5, 7), dtype, seed=81)
    addend = sample((3, 4, 5, 7), dtype, seed=82)[0]
    factor = sample((3, 4, 5, 7), dtype, seed=83)[0].abs() if with_factor else None
    out = elementwise.stabilized_divide(n, d, 0.25, -1.5, reference, -1, factor,
                                        numerator_addend=addend)  # fmt: skip
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    summed = n.to(compute) + addend.to(compute)
    assert_matches_oracle(out, oracle(summed, d, 0.25, -1.5, reference, -1, factor), dtype)
    if dtype in (torch.float32, torch.float64):
        # One rounding of n + a either way: the same bits as the sum formed in a pass before.
        assert torch.equal(out, elementwise.stabilized_divide(summed, d, 0.25, -1.5, reference,
                                                              -1, factor))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_kernel_adds_the_addend_at_any_alignment(cuda_device, dtype):
    length = 109
    n, d, _ = sample((length + 3,), dtype, seed=84)
    addend = sample((length + 3,), dtype, seed=85)[0]
    factor = sample((length + 3,), dtype, seed=86)[0].abs()
    operands = [t.to(cuda_device) for t in (n, addend, factor, d)]
    for offsets in ((0, 0, 0, 0), (0, 1, 0, 0), (2, 1, 3, 0)):
        views = [t[k : k + length] for t, k in zip(operands, offsets)]
        out = elementwise.stabilized_divide(
            views[0], views[3], 1e-3, 1.0, None, 1, views[2], numerator_addend=views[1]
        )
        n_view, a_view, f_view, d_view = (v.cpu() for v in views)
        compute = torch.float32 if dtype == torch.float16 else dtype
        expected = oracle(n_view.to(compute) + a_view.to(compute), d_view, 1e-3, 1.0, None, 1,
                          f_view)  # fmt: skip
        assert_matches_oracle(out.cpu(), expected, dtype)


def test_an_addend_of_another_shape_is_refused(backend):
    n, d, _ = sample((2, 3, 5), torch.float32)
    with pytest.raises(ValueError, match=r"numerator_addend has shape \(2, 3, 1\)"):
        elementwise.stabilized_divide(n, d, 0.1, numerator_addend=torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match=r"numerator_addend has shape \(2, 3, 1\)"):
        torch.ops.relprop.stabilized_divide(
            n, d, 0.1, 1.0, None, 1, None, None, torch.zeros(2, 3, 1)
        )


def test_a_strided_bias_is_read_as_its_values(backend):
    """A bias that is a strided view (every other channel of a larger one) is made contiguous
    and kept alive for the kernel: the same result as a contiguous copy."""
    n, d, _ = sample((2, 3, 4, 5), torch.float32, seed=91)
    wide = torch.randn(6, generator=generator(92))
    strided = wide[::2]
    assert not strided.is_contiguous()
    out = elementwise.stabilized_divide(n, d, 0.25, denominator_bias=strided)
    assert torch.equal(out, elementwise.stabilized_divide(n, d, 0.25,
                                                          denominator_bias=strided.clone()))  # fmt: skip
    assert_matches_oracle(out, oracle(n, biased(d, strided), 0.25), torch.float32)
