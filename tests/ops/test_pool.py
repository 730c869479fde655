"""Pooling relevance: native CPU kernels and the references against independent float64 oracles.

Oracles follow the formulas, not the code under test:

- max pool: winner-takes-all relevance is the vector-Jacobian product of the max pool with R
  (autograd through ``F.max_pool*``, which routes each gradient to its window's maximum);
- average pools: the z-rule ``x · Pᵀ(R / stab(P x, e))`` with ``P`` an explicit matrix whose
  columns are the pooling of the unit images (so padding, ceil_mode, count_include_pad and the
  divisor are nothing but entries of ``P``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from tests.ops._backends import CUDA, needs_native, use_backend

import relprop
from relprop import _native
from relprop.ops import pool

STABILIZER = 1e-6


def stab_divide(r: torch.Tensor, d: torch.Tensor, e: float) -> torch.Tensor:
    """``r / stab(d, e)``, ``stab(d, e) = d + e·(sign(d) + [d = 0])``, 0 where that is 0."""
    denominator = d + e * (torch.sign(d) + (d == 0).to(d.dtype))
    return torch.where(denominator == 0, torch.zeros_like(r), r / denominator)


def pooling_matrix(pool_fn, plane_shape: tuple[int, ...]) -> torch.Tensor:
    """``P`` with ``pool_fn(x).flatten() = P @ x.flatten()`` on one plane, in float64."""
    numel = 1
    for size in plane_shape:
        numel *= size
    basis = torch.eye(numel, dtype=torch.float64).reshape(numel, 1, *plane_shape)
    return pool_fn(basis).reshape(numel, -1).T


def z_rule_oracle(pool_fn, x: torch.Tensor, relevance: torch.Tensor, e: float) -> torch.Tensor:
    x64, r64 = x.double(), relevance.double()
    matrix = pooling_matrix(pool_fn, tuple(x.shape[2:]))
    flat_x = x64.reshape(x.shape[0] * x.shape[1], -1)
    z = flat_x @ matrix.T
    share = stab_divide(r64.reshape(z.shape), z, e)
    return (flat_x * (share @ matrix)).reshape(x.shape)


def max_pool_oracle(pool_fn, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    x64 = x.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(pool_fn(x64), x64, relevance.double())
    return grad


def assert_close_to_oracle(actual: torch.Tensor, oracle: torch.Tensor, rtol: float) -> None:
    assert actual.shape == oracle.shape
    scale = oracle.abs().max().clamp_min(1e-30)
    error = (actual.double() - oracle).abs().max() / scale
    assert error <= rtol, f"max |Δ| / max |oracle| = {error:.3e} > {rtol:.0e}"


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# (kernel, stride, padding, ceil_mode) of 2-D pools on a 7x9 image: overlapping windows,
# non-square kernels, windows hanging over the edge in ceil mode.
MAX_POOL_2D = [
    (3, 2, 1, False),
    (3, 2, 1, True),
    (2, 2, 0, False),
    (3, 1, 1, False),
    ((2, 3), (1, 2), (1, 1), True),
]
MAX_POOL_1D = [(3, 2, 1, False), (3, 2, 1, True), (2, 2, 0, False), (4, 1, 2, False)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geometry", MAX_POOL_2D, ids=str)
def test_max_pool2d_is_the_vjp_of_max_pool(backend, dtype, geometry):
    kernel, stride, padding, ceil_mode = geometry
    x = torch.randn(2, 5, 7, 9, generator=generator(), dtype=dtype)

    def pool_fn(t):
        return F.max_pool2d(t, kernel, stride, padding, ceil_mode=ceil_mode)

    out, indices = F.max_pool2d(
        x, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True
    )
    relevance = torch.randn(out.shape, generator=generator(), dtype=dtype)
    actual = pool.max_pool_relevance(relevance, indices, x.shape)
    assert actual.dtype == dtype
    assert_close_to_oracle(
        actual,
        max_pool_oracle(pool_fn, x, relevance),
        rtol=1e-6 if dtype == torch.float32 else 1e-13,
    )


@pytest.mark.parametrize("geometry", MAX_POOL_1D, ids=str)
def test_max_pool1d_is_the_vjp_of_max_pool(backend, geometry):
    kernel, stride, padding, ceil_mode = geometry
    x = torch.randn(3, 5, 11, generator=generator(), dtype=torch.float64)

    def pool_fn(t):
        return F.max_pool1d(t, kernel, stride, padding, ceil_mode=ceil_mode)

    out, indices = F.max_pool1d(
        x, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True
    )
    relevance = torch.randn(out.shape, generator=generator(), dtype=torch.float64)
    actual = pool.max_pool_relevance(relevance, indices, x.shape)
    assert_close_to_oracle(actual, max_pool_oracle(pool_fn, x, relevance), rtol=1e-13)


@pytest.mark.parametrize(
    ("in_shape", "out_size"), [((7, 9), (3, 4)), ((5, 5), (7, 3)), ((11,), 4), ((7,), 3)], ids=str
)
def test_adaptive_max_pool_is_the_vjp(backend, in_shape, out_size):
    x = torch.randn(2, 5, *in_shape, generator=generator(), dtype=torch.float64)
    adaptive = F.adaptive_max_pool1d if len(in_shape) == 1 else F.adaptive_max_pool2d
    out, indices = adaptive(x, out_size, return_indices=True)
    relevance = torch.randn(out.shape, generator=generator(), dtype=torch.float64)
    actual = pool.max_pool_relevance(relevance, indices, x.shape)
    oracle = max_pool_oracle(lambda t: adaptive(t, out_size), x, relevance)
    assert_close_to_oracle(actual, oracle, rtol=1e-13)


# (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_POOL_2D = [
    (3, 2, 1, False, True, None),
    (3, 2, 1, True, True, None),
    (3, 2, 1, True, False, None),
    (3, 2, 1, False, False, None),
    (2, 2, 0, False, True, None),
    (3, 1, 1, False, False, 5),
    ((3, 2), (2, 1), (1, 1), True, True, 4),
    ((2, 3), (1, 2), (1, 0), True, False, None),
]
AVG_POOL_1D = [
    (3, 2, 1, False, True),
    (3, 2, 1, True, False),
    (4, 3, 2, True, True),
    (2, 2, 0, False, True),
]


@pytest.mark.parametrize("geometry", AVG_POOL_2D, ids=str)
def test_avg_pool2d_z_rule(backend, geometry):
    kernel, stride, padding, ceil_mode, count_include_pad, divisor = geometry
    x = torch.randn(2, 5, 7, 9, generator=generator(), dtype=torch.float64)

    def pool_fn(t):
        return F.avg_pool2d(t, kernel, stride, padding, ceil_mode, count_include_pad, divisor)

    relevance = torch.randn(pool_fn(x).shape, generator=generator(), dtype=torch.float64)
    actual = pool.avg_pool_relevance(
        x, relevance, kernel, stride, padding, ceil_mode, count_include_pad, divisor, STABILIZER
    )
    assert_close_to_oracle(actual, z_rule_oracle(pool_fn, x, relevance, STABILIZER), rtol=1e-12)


@pytest.mark.parametrize("geometry", AVG_POOL_1D, ids=str)
def test_avg_pool1d_z_rule(backend, geometry):
    kernel, stride, padding, ceil_mode, count_include_pad = geometry
    x = torch.randn(3, 5, 13, generator=generator(), dtype=torch.float64)

    def pool_fn(t):
        return F.avg_pool1d(t, kernel, stride, padding, ceil_mode, count_include_pad)

    relevance = torch.randn(pool_fn(x).shape, generator=generator(), dtype=torch.float64)
    actual = pool.avg_pool_relevance(
        x, relevance, kernel, stride, padding, ceil_mode, count_include_pad, None, STABILIZER
    )
    assert_close_to_oracle(actual, z_rule_oracle(pool_fn, x, relevance, STABILIZER), rtol=1e-12)


@pytest.mark.parametrize(
    ("in_shape", "out_size"),
    [((7, 9), (3, 4)), ((7, 7), 3), ((5, 4), (7, 6)), ((6, 9), (None, 2)), ((11,), 4), ((7,), 3)],
    ids=str,
)
def test_adaptive_avg_pool_z_rule(backend, in_shape, out_size):
    x = torch.randn(2, 5, *in_shape, generator=generator(), dtype=torch.float64)
    adaptive = F.adaptive_avg_pool1d if len(in_shape) == 1 else F.adaptive_avg_pool2d
    relevance = torch.randn(adaptive(x, out_size).shape, generator=generator(), dtype=torch.float64)
    actual = pool.adaptive_avg_pool_relevance(x, relevance, out_size, STABILIZER)
    oracle = z_rule_oracle(lambda t: adaptive(t, out_size), x, relevance, STABILIZER)
    assert_close_to_oracle(actual, oracle, rtol=1e-12)


@pytest.mark.parametrize("op", ["avg", "adaptive"])
def test_float32_error_at_most_twice_the_reference_error(monkeypatch, native_kernels, op):
    # flash-attention's criterion: the kernel in float32 may be off the float64 oracle by at most
    # twice what the plain-PyTorch reference computed in float32 is.
    x = torch.rand(4, 5, 7, 9, generator=generator()) + 0.05
    if op == "avg":
        args = (3, 2, 1, True, False, None, STABILIZER)

        def run(r):
            return pool.avg_pool_relevance(x, r, *args)

        def pool_fn(t):
            return F.avg_pool2d(t, 3, 2, 1, True, False)
    else:

        def run(r):
            return pool.adaptive_avg_pool_relevance(x, r, (3, 4), STABILIZER)

        def pool_fn(t):
            return F.adaptive_avg_pool2d(t, (3, 4))

    relevance = torch.randn(pool_fn(x).shape, generator=generator())
    oracle = z_rule_oracle(pool_fn, x, relevance, STABILIZER)
    native_error = (run(relevance).double() - oracle).abs().max()
    monkeypatch.setenv("RELPROP_BACKEND", "reference")
    reference_error = (run(relevance).double() - oracle).abs().max()
    assert native_error <= 2 * reference_error + 1e-7 * oracle.abs().max()


@pytest.mark.parametrize("op", ["max", "avg", "adaptive"])
def test_relevance_is_conserved(backend, op):
    # With e = 0 and positive inputs every window hands on exactly its R: Σ R_in = Σ R.
    x = torch.rand(2, 5, 7, 9, generator=generator(), dtype=torch.float64) + 0.1
    if op == "max":
        out, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
        relevance = torch.randn(out.shape, generator=generator(), dtype=torch.float64)
        actual = pool.max_pool_relevance(relevance, indices, x.shape)
    elif op == "avg":
        relevance = torch.randn(2, 5, 4, 5, generator=generator(), dtype=torch.float64)
        actual = pool.avg_pool_relevance(x, relevance, 3, 2, 1, True, True, None, 0.0)
    else:
        relevance = torch.randn(2, 5, 3, 4, generator=generator(), dtype=torch.float64)
        actual = pool.adaptive_avg_pool_relevance(x, relevance, (3, 4), 0.0)
    torch.testing.assert_close(
        actual.sum(dim=(2, 3)), relevance.sum(dim=(2, 3)), rtol=1e-12, atol=1e-12
    )


def test_zero_denominator_gives_zero_relevance(backend):
    # e = 0 on an all-zero window: 0 / 0 is taken as 0 (the engine's convention), not NaN.
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    x[0, 0, :2, :2] = 1.0
    relevance = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    actual = pool.avg_pool_relevance(x, relevance, 2, 2, 0, False, True, None, 0.0)
    expected = torch.zeros_like(x)
    expected[0, 0, :2, :2] = 0.25
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_native_reads_strided_inputs(native_kernels):
    base = torch.randn(2, 9, 5, 7, generator=generator(), dtype=torch.float64)
    x = base.transpose(2, 3)  # (2, 9, 7, 5), not contiguous
    x_last = x.contiguous(memory_format=torch.channels_last)
    relevance = torch.randn(2, 9, 4, 3, generator=generator(), dtype=torch.float64)[:, ::2]
    x, x_last = x[:, ::2], x_last[:, ::2]
    for inp in (x, x_last):
        actual = pool.avg_pool_relevance(inp, relevance, 3, 2, 1, True, False, None, STABILIZER)
        oracle = z_rule_oracle(
            lambda t: F.avg_pool2d(t, 3, 2, 1, True, False), inp, relevance, STABILIZER
        )
        assert_close_to_oracle(actual, oracle, rtol=1e-12)
        actual = pool.adaptive_avg_pool_relevance(inp, relevance, (4, 3), STABILIZER)
        oracle = z_rule_oracle(
            lambda t: F.adaptive_avg_pool2d(t, (4, 3)), inp, relevance, STABILIZER
        )
        assert_close_to_oracle(actual, oracle, rtol=1e-12)
    out, indices = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    r = torch.randn(out.shape[::-1], generator=generator(), dtype=torch.float64).permute(3, 2, 1, 0)
    actual = pool.max_pool_relevance(
        r, indices.transpose(2, 3).contiguous().transpose(2, 3), x.shape
    )
    oracle = max_pool_oracle(lambda t: F.max_pool2d(t, 3, 2, 1, ceil_mode=True), x, r)
    assert_close_to_oracle(actual, oracle, rtol=1e-13)


def test_native_runs_are_bitwise_equal(native_kernels):
    x = torch.randn(4, 6, 15, 13, generator=generator())
    out, indices = F.max_pool2d(x, 3, 1, 1, return_indices=True)
    relevance = torch.randn(out.shape, generator=generator())
    first = pool.max_pool_relevance(relevance, indices, x.shape)
    assert torch.equal(first, pool.max_pool_relevance(relevance, indices, x.shape))
    relevance = torch.randn(4, 6, 8, 7, generator=generator())
    first = pool.avg_pool_relevance(x, relevance, 3, 2, 1, False, True, None, STABILIZER)
    again = pool.avg_pool_relevance(x, relevance, 3, 2, 1, False, True, None, STABILIZER)
    assert torch.equal(first, again)


@needs_native
def test_native_rejects_indices_outside_the_plane(monkeypatch):
    # The CPU twin checks; the CUDA kernels do not (that would need a read-back of a flag, a
    # device sync per pool): an index out of the plane matches no input there and its
    # relevance is dropped. Indices come from torch's own max pool, which is always in range.
    monkeypatch.setenv("RELPROP_BACKEND", "native")
    relevance = torch.ones(1, 1, 2, 2)
    indices = torch.tensor([[[[0, 1], [2, 16]]]])
    with pytest.raises(IndexError, match="outside the input plane"):
        pool.max_pool_relevance(relevance, indices, (1, 1, 4, 4))


def test_relevance_of_the_wrong_shape_is_refused():
    x = torch.randn(1, 2, 7, 9)
    with pytest.raises(ValueError, match="pooling produces"):
        pool.avg_pool_relevance(x, torch.randn(1, 2, 3, 4), 3, 2, 1, False)
    with pytest.raises(ValueError, match="pooling produces"):
        pool.adaptive_avg_pool_relevance(x, torch.randn(1, 2, 3, 4), (4, 3))


def test_missing_native_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("RELPROP_BACKEND", raising=False)
    monkeypatch.delenv("RELPROP_ALLOW_NO_NATIVE", raising=False)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_error", "ImportError: simulated")
    monkeypatch.setattr(_native, "_warned", False)
    x = torch.rand(1, 2, 6, 6, generator=generator(), dtype=torch.float64)
    relevance = torch.randn(1, 2, 3, 3, generator=generator(), dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = pool.avg_pool_relevance(x, relevance, 2, 2)
        pool.adaptive_avg_pool_relevance(x, relevance, 3)
    assert len([w for w in caught if "relprop._C" in str(w.message)]) == 1
    oracle = z_rule_oracle(lambda t: F.avg_pool2d(t, 2, 2), x, relevance, 1e-6)
    assert_close_to_oracle(first, oracle, rtol=1e-12)
    monkeypatch.setenv("RELPROP_BACKEND", "native")
    with pytest.raises(RuntimeError, match="relprop._C is not available"):
        pool.avg_pool_relevance(x, relevance, 2, 2)


def _opcheck_samples():
    x = torch.randn(2, 3, 7, 9, generator=generator(), dtype=torch.float64)
    out, indices = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    x1 = torch.randn(2, 3, 11, generator=generator())
    out1, indices1 = F.max_pool1d(x1, 3, 2, return_indices=True)
    return [
        (pool.max_pool_relevance_op, (torch.randn_like(out), indices, [7, 9])),
        (pool.max_pool_relevance_op, (torch.randn_like(out1), indices1, [11])),
        (
            pool.avg_pool2d_relevance_op,
            (
                x,
                torch.randn(2, 3, 4, 5, dtype=torch.float64),
                [3, 3],
                [2, 2],
                [1, 1],
                True,
                False,
                None,
                1e-6,
            ),
        ),
        (
            pool.avg_pool2d_relevance_op,
            (x.float(), torch.randn(2, 3, 3, 4), [2, 2], [2, 2], [0, 0], False, True, 3, 0.1),
        ),
        (
            pool.adaptive_avg_pool2d_relevance_op,
            (x, torch.randn(2, 3, 3, 4, dtype=torch.float64), [3, 4], 1e-6),
        ),
        # The division at the winners: bare, and with every optional operand (1-D).
        (pool.max_pool_divided_relevance_op, (torch.randn_like(out), indices, x, 1e-3)),
        (
            pool.max_pool_divided_relevance_op,
            (torch.randn_like(out1), indices1, x1, 1e-3, out1, out1, torch.randn(3)),
        ),
        # The denominator at the outputs (an ε layer's), with a second coefficient.
        (
            pool.max_pool_divided_relevance_op,
            (torch.randn_like(out), indices, out, 1e-3, out, None, None, None, out.neg(), [7, 9]),
        ),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(backend, case):
    op, args = _opcheck_samples()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_kernels_match_the_reference(monkeypatch, cuda_device, dtype):
    # Criterion of flash-attention: the kernel's error against the float64 reference is at most
    # twice that of the reference computed in the same precision.
    device = cuda_device
    x64 = (torch.rand(4, 6, 23, 19, generator=generator(), dtype=torch.float64) + 0.05).to(device)
    _, indices = F.max_pool2d(x64, 3, 2, 1, ceil_mode=True, return_indices=True)
    r_max = torch.randn(indices.shape, generator=generator(), dtype=torch.float64).to(device)
    r_avg = torch.randn(4, 6, 12, 10, generator=generator(), dtype=torch.float64).to(device)
    r_ada = torch.randn(4, 6, 7, 5, generator=generator(), dtype=torch.float64).to(device)

    def run(dt):
        return [
            pool.max_pool_relevance(r_max.to(dt), indices, x64.shape),
            pool.avg_pool_relevance(x64.to(dt), r_avg.to(dt), 3, 2, 1, True, False, None, 1e-6),
            pool.adaptive_avg_pool_relevance(x64.to(dt), r_ada.to(dt), (7, 5), 1e-6),
        ]

    monkeypatch.setenv("RELPROP_BACKEND", "reference")
    oracles, references = run(torch.float64), run(dtype)
    monkeypatch.setenv("RELPROP_BACKEND", "native")
    natives = run(dtype)
    assert all(torch.equal(a, b) for a, b in zip(natives, run(dtype))), "not deterministic"
    for native_out, reference_out, oracle in zip(natives, references, oracles):
        assert native_out.dtype == dtype
        reference_error = (reference_out.double() - oracle).abs().max()
        native_error = (native_out.double() - oracle).abs().max()
        assert native_error <= 2 * reference_error + 1e-12 * oracle.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", range(8))
def test_opcheck_cuda(monkeypatch, case):
    use_backend("cuda", monkeypatch)
    op, args = _opcheck_samples()[case]
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


def test_float16_zero_inputs_get_zero_even_under_saturated_shares(backend):
    # Zero windows under relevance: every share is R / stab(0, 1e-6), saturated at 65504 in
    # float16, and where windows overlap their sum overflows. The relevance x · Σ shares is 0
    # where x is (docs/ops.md), not 0 · inf = NaN. (A w² or flat rule above sends relevance to
    # zero activations.)
    x = torch.zeros(1, 2, 2, 2, dtype=torch.float16)
    x[0, 1] = 0.5
    relevance = torch.ones(1, 2, 3, 3, dtype=torch.float16)
    adaptive = pool.adaptive_avg_pool_relevance(x, relevance, (3, 3), STABILIZER)
    overlapping = pool.avg_pool_relevance(x, relevance[..., :1, :1], 2, 1, 0, False, True, None,
                                          STABILIZER)  # fmt: skip
    for out in (adaptive, overlapping):
        assert torch.isfinite(out).all()
        assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
    z_rule = z_rule_oracle(lambda t: F.adaptive_avg_pool2d(t, (3, 3)), x, relevance, STABILIZER)
    assert_close_to_oracle(adaptive, z_rule, rtol=2e-3)


@pytest.mark.parametrize("output_size", [(None, 2), (3, None), 2])
def test_adaptive_pool_sizes_with_none_in_an_analysis(backend, output_size):
    """``nn.AdaptiveAvgPool2d((None, 2))`` keeps the input's height: the analysis resolves the
    size as torch does. Oracle: LRP-0 on a bias-free ReLU net is gradient × input."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1, bias=False), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(output_size), torch.nn.Flatten(), torch.nn.LazyLinear(4, bias=False),
    ).double()  # fmt: skip
    x = torch.rand(2, 2, 5, 6, generator=generator(), dtype=torch.float64) + 0.5
    model(x)  # materialises the lazy layer
    model.eval()
    with torch.no_grad():
        model[0].weight.abs_()  # pooled z far above the pool's stabilizer (1e-6)
    relevance = relprop.create_analyzer("lrp.z", model).analyze(x, neuron_selection=[0, 3])
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    (grad,) = torch.autograd.grad(out[[0, 1], [0, 3]].sum(), xg)
    assert_close_to_oracle(relevance, grad * x, rtol=1e-5)


def test_references_refuse_a_relevance_of_another_batch():
    """The references broadcast a batch-1 relevance against a batch-2 input (or failed inside
    scatter_add with a message about its index); the public wrappers refuse it."""
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    r = torch.rand(1, 3, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"avg_pool2d_relevance.*\(1, 3, 3, 3\)"):
        pool.avg_pool2d_relevance_reference(x, r, [2, 2], [2, 2], [0, 0], False, True, None, 1e-6)
    with pytest.raises(ValueError, match=r"adaptive_avg_pool2d_relevance.*\(1, 3, 3, 3\)"):
        pool.adaptive_avg_pool2d_relevance_reference(x, r, [3, 3], 1e-6)
    _, indices = F.max_pool2d(x, 2, return_indices=True)
    with pytest.raises(ValueError, match=r"max_pool_relevance.*\(1, 3, 3, 3\)"):
        pool.max_pool_relevance_reference(r, indices, [6, 6])
