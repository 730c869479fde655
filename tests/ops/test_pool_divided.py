"""``relprop::max_pool_divided_relevance``: the division of a layer under a max pool at the pool's
winners, and the spread, in one pass (``ops/pool.py``).

Oracles: a loop over the outputs in float64 written from the formula (independent of every
path); the composition of the three ops it replaces (the denominator gathered at the winners,
``stabilized_divide``, ``max_pool_relevance``), bitwise on the CPU twin and the emulated CUDA
kernel in float32 and float64; in 16 bits, flash-attention's criterion against the float64 loop
(at most twice the reference's error computed in the same precision).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from tests.cuda_emulation import emulate_cuda

from relprop.ops import pool
from relprop.ops.elementwise import stabilized_divide_reference

EPSILON = 1e-3
# (kernel, stride, padding, dilation): VGG's 2×2, ResNet's overlapping 3×3/2 with padding (an input
# may win two windows), a dilated one.
GEOMETRIES = [(2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 2)]
# Which optional operands are given: factor, sign reference, bias.
OPERANDS = list(itertools.product([False, True], repeat=3))


def _case(geometry, dims=2, dtype=torch.float64, seed=0):
    """A pooled ReLU output, its indices, and operands of the pool's two sizes: relevance of
    both signs, a denominator of both signs with exact zeros (the stabiliser's sign), the
    pool's output as factor and sign reference (zero where the window was all zeros)."""
    k, s, p, d = geometry
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 3, 13) if dims == 1 else (2, 3, 9, 11)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).clamp(min=0)
    max_pool = F.max_pool1d if dims == 1 else F.max_pool2d
    out, indices = max_pool(x, k, s, p, d, return_indices=True)
    relevance = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    denominator = torch.randn(shape, generator=generator, dtype=torch.float64)
    denominator[..., ::4] = 0.0
    bias = torch.randn(shape[1], generator=generator, dtype=torch.float64)
    window = tuple([v] * dims for v in geometry)
    return [t.to(dtype) for t in (relevance, denominator, out, bias)] + [indices, window]


def _loop(relevance, indices, denominator, epsilon, factor, reference, bias):
    """The formula in float64, one output at a time."""
    r, d = relevance.double(), denominator.double()
    out = torch.zeros_like(d).reshape(*d.shape[:2], -1)
    flat_r, flat_i = r.reshape(*r.shape[:2], -1), indices.reshape(*indices.shape[:2], -1)
    f = None if factor is None else factor.double().reshape(flat_r.shape)
    ref = None if reference is None else reference.double().reshape(flat_r.shape)
    flat_d = d.reshape(out.shape)
    for n, c, o in itertools.product(*(range(size) for size in flat_r.shape)):
        i = int(flat_i[n, c, o])
        value = float(flat_d[n, c, i]) + (0.0 if bias is None else float(bias[c]))
        stabilized = value + (epsilon if value >= 0 else -epsilon)
        if ref is not None and not float(ref[n, c, o]) > 0:
            continue
        numerator = float(flat_r[n, c, o]) * (1.0 if f is None else float(f[n, c, o]))
        out[n, c, i] += numerator / stabilized
    return out.reshape(d.shape)


def _composed(relevance, indices, denominator, epsilon, factor, reference, bias, window):
    """The three ops the fused one replaces, each on the current backend."""
    at_winners = pool.gather_winners(denominator, indices)
    shares = stabilized_divide_reference(
        relevance, at_winners, epsilon, 1.0, reference, 1, factor, bias
    )
    return pool.max_pool_relevance(shares, indices, denominator.shape, window)


def _operands(flags, out, bias):
    with_factor, with_reference, with_bias = flags
    return (
        out if with_factor else None,
        out if with_reference else None,
        bias if with_bias else None,
    )


@pytest.mark.parametrize("flags", OPERANDS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_float64_matches_the_formula(geometry, flags):
    relevance, denominator, out, bias, indices, window = _case(geometry)
    factor, reference, b = _operands(flags, out, bias)
    expected = _loop(relevance, indices, denominator, EPSILON, factor, reference, b)
    for given in (window, None):
        fused = pool.max_pool_divided_relevance(
            relevance, indices, denominator, EPSILON, factor, reference, b, given
        )
        torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
    reference_op = pool.max_pool_divided_relevance_reference(
        relevance, indices, denominator, EPSILON, factor, reference, b
    )
    torch.testing.assert_close(reference_op, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_cpu_twin_is_the_composition_bit_for_bit(geometry, dims, dtype):
    # Each share computed as stabilized_divide computes it, added to its winner in the order
    # max_pool_relevance adds: the same bits, overlapping windows included.
    relevance, denominator, out, bias, indices, window = _case(geometry, dims, dtype)
    for flags in OPERANDS:
        operands = _operands(flags, out, bias)
        fused = pool.max_pool_divided_relevance(
            relevance, indices, denominator, EPSILON, *operands, window
        )
        composed = _composed(relevance, indices, denominator, EPSILON, *operands, window)
        assert torch.equal(fused, composed), flags


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_emulated_cuda_kernel_is_the_composition_bit_for_bit(monkeypatch, geometry, dtype):
    relevance, denominator, out, bias, indices, window = _case(geometry, 2, dtype, seed=1)
    expected = [
        _composed(relevance, indices, denominator, EPSILON, *_operands(flags, out, bias), window)
        for flags in OPERANDS
    ]
    module = emulate_cuda(monkeypatch)
    for flags, composed in zip(OPERANDS, expected):
        operands = _operands(flags, out, bias)
        for given in (window, None):  # the host's bounds, and the device's measured ones
            fused = pool.max_pool_divided_relevance(
                relevance, indices, denominator, EPSILON, *operands, given
            )
            assert torch.equal(fused, composed), (flags, given)
    assert module.calls["max_pool_divided_relevance_cuda"] == 2 * len(OPERANDS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_cuda_kernel_in_16_bits_is_as_close_as_the_reference(monkeypatch, dtype):
    # Computed in float32 and rounded once per input, where the composition rounds each share.
    relevance, denominator, out, bias, indices, window = _case(GEOMETRIES[1], 2, torch.float64, 2)
    operands = (out, out, bias)
    truth = _loop(relevance, indices, denominator, EPSILON, *operands)
    low = [t.to(dtype) for t in (relevance, denominator, out, bias)]
    relevance16, denominator16, out16, bias16 = low
    baseline = pool.max_pool_divided_relevance_reference(
        relevance16, indices, denominator16, EPSILON, out16, out16, bias16
    )
    module = emulate_cuda(monkeypatch)
    fused = pool.max_pool_divided_relevance(
        relevance16, indices, denominator16, EPSILON, out16, out16, bias16, window
    )
    assert module.calls["max_pool_divided_relevance_cuda"] == 1
    assert fused.dtype == dtype
    error = torch.linalg.vector_norm(fused.double() - truth)
    assert error <= 2 * torch.linalg.vector_norm(baseline.double() - truth)


def test_a_zero_factor_gives_zero_where_the_coefficient_overflowed():
    # x · c with x = 0 is 0 even where c is inf (float16 coefficients can overflow), as in
    # stabilized_divide.
    relevance, denominator, out, _, indices, _ = _case(GEOMETRIES[0])
    out[..., 0] = 0.0
    relevance[..., 0] = float("inf")
    fused = pool.max_pool_divided_relevance(relevance, indices, denominator, EPSILON, out)
    assert torch.isfinite(fused).all()
    assert torch.equal(
        fused, _composed(relevance, indices, denominator, EPSILON, out, None, None, None)
    )


def test_opcheck():
    relevance, denominator, out, bias, indices, window = _case(GEOMETRIES[1])
    bounds = pool.max_pool_offset_bounds(denominator.shape[2:], out.shape[2:], *window)
    for args in [
        (relevance, indices, denominator, EPSILON),
        (relevance, indices, denominator, EPSILON, out, out, bias, bounds),
    ]:
        torch.library.opcheck(pool.max_pool_divided_relevance_op, args)


def test_bad_shapes_are_refused_with_the_reason():
    relevance, denominator, out, bias, indices, _ = _case(GEOMETRIES[0])
    with pytest.raises(ValueError, match="must both be"):
        pool.max_pool_divided_relevance(relevance, indices[:1], denominator, EPSILON)
    with pytest.raises(ValueError, match="not of the pool's input"):
        pool.max_pool_divided_relevance(relevance, indices, denominator[:, :1], EPSILON)
    with pytest.raises(ValueError, match="factor .* differs from relevance"):
        pool.max_pool_divided_relevance(relevance, indices, denominator, EPSILON, out[:1])
    with pytest.raises(ValueError, match="not one value per channel"):
        pool.max_pool_divided_relevance(
            relevance, indices, denominator, EPSILON, denominator_bias=bias[:1]
        )


@pytest.mark.parametrize("emulated", [False, True], ids=["cpu", "cuda-emulated"])
def test_operands_in_any_layout(monkeypatch, emulated):
    # A channels-last denominator (a convolution's output in that format), and pool-size operands
    # that are views with gaps: copied to the kernels' layout, each kept until the kernel ran.
    relevance, denominator, out, bias, indices, window = _case(GEOMETRIES[1], 2, torch.float32)
    operands = (out, out, bias)
    expected = _composed(relevance, indices, denominator, EPSILON, *operands, window)
    wide = torch.zeros(*relevance.shape[:3], 2 * relevance.shape[3])
    strided = wide[..., ::2]
    strided.copy_(relevance)
    factor = torch.zeros_like(wide)[..., ::2]
    factor.copy_(out)
    if emulated:
        emulate_cuda(monkeypatch)
    fused = pool.max_pool_divided_relevance(
        strided, indices, denominator.to(memory_format=torch.channels_last), EPSILON,
        factor, out, bias, window,
    )  # fmt: skip
    assert torch.equal(fused, expected)


def _at_outputs_loop(relevance, addend, indices, out, epsilon, factor, input_size):
    """The formula with the denominator at each output (an ε layer's: its output at the winner
    is the pool's), in float64, one output at a time."""
    result = torch.zeros(*relevance.shape[:2], *input_size, dtype=torch.float64)
    flat_out = result.reshape(*result.shape[:2], -1)
    r, a, d = (t.double().reshape(*t.shape[:2], -1) for t in (relevance, addend, out))
    f = None if factor is None else factor.double().reshape(r.shape)
    flat_i = indices.reshape(r.shape)
    for n, c, o in itertools.product(*(range(size) for size in r.shape)):
        value = float(d[n, c, o])
        stabilized = value + (epsilon if value >= 0 else -epsilon)
        numerator = (float(r[n, c, o]) + float(a[n, c, o])) * (
            1.0 if f is None else float(f[n, c, o])
        )
        flat_out[n, c, int(flat_i[n, c, o])] += numerator / stabilized
    return result


@pytest.mark.parametrize("with_factor", [False, True], ids=["formed", "unformed"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_denominator_at_the_outputs_with_an_addend(monkeypatch, geometry, with_factor):
    # An ε layer's division, made by its pool: the denominator is the pool's output (the layer's
    # output at each winner), the relevance c · out from two paths (c + a) — ResNet's stem pool.
    # Oracles: the float64 formula; the composition the engine ran before (stabilized_divide at
    # the pool's size, then the spread), bitwise on the CPU twin and the emulated CUDA kernel.
    relevance, denominator, out, _, indices, window = _case(geometry)
    addend = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    factor = out if with_factor else None
    input_size = denominator.shape[2:]
    expected = _at_outputs_loop(relevance, addend, indices, out, EPSILON, factor, input_size)

    def fused():
        return pool.max_pool_divided_relevance(
            relevance, indices, out, EPSILON, factor, None, None, window, addend, input_size
        )

    torch.testing.assert_close(fused(), expected, rtol=1e-12, atol=1e-12)
    for dtype in (torch.float32, torch.float64):
        low = [t.to(dtype) for t in (relevance, out, addend)]
        share = stabilized_divide_reference(
            low[0], low[1], EPSILON, 1.0, None, 1, low[1] if with_factor else None, None, low[2]
        )
        composed = pool.max_pool_relevance(share, indices, denominator.shape, window)
        cpu = pool.max_pool_divided_relevance(
            low[0], indices, low[1], EPSILON, low[1] if with_factor else None, None, None,
            window, low[2], input_size,
        )  # fmt: skip
        assert torch.equal(cpu, composed), dtype
        with monkeypatch.context() as patch:
            module = emulate_cuda(patch)
            emulated = pool.max_pool_divided_relevance(
                low[0], indices, low[1], EPSILON, low[1] if with_factor else None, None, None,
                window, low[2], input_size,
            )  # fmt: skip
            assert module.calls["max_pool_divided_relevance_cuda"] == 1
        assert torch.equal(emulated, composed), dtype
    with pytest.raises(ValueError, match="the one at each output"):
        pool.max_pool_divided_relevance(
            relevance, indices, denominator, EPSILON, input_size=input_size
        )
