"""The rules whose denominators do not depend on the input: flat (``_layer_rules.flat_share``:
each group's relevance summed, then divided once by the count its outputs share) and w²
(``_layer_rules._wsquare_fast``: the denominator made for one sample).

Oracles: the float64 reference (``relevance_reference``'s literal ``Wᵀ(R / stab(W·1))``, with
all-ones or squared weights); in 16-bit dtypes the criterion of the Triton tests, an error
against float64 at most twice the reference's computed in the same dtype; the storage ledger of
the tests for what a step allocates; the ops a step dispatches for the products it makes.
"""

from __future__ import annotations

import pytest
import torch
from tests.oracles.inside_ops import InsideCustomOps
from tests.oracles.live_bytes import LiveBytes

from relprop.ops import conv, linear

EPSILON = 1e-6
# stride, padding, dilation, groups: odd sizes, a group of two, padding past the dilated kernel.
GEOMETRIES = [
    ([1, 1], [1, 1], [1, 1], 1),
    ([2, 1], [1, 2], [1, 2], 2),
    ([1, 2], [3, 0], [2, 1], 1),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _conv_case(geometry, in_channels: int = 6, out_channels: int = 8):
    g = torch.Generator().manual_seed(3)
    groups = geometry[3]
    x = torch.randn(2, in_channels, 7, 9, generator=g, dtype=torch.float64)
    w = torch.randn(out_channels, in_channels // groups, 3, 3, generator=g, dtype=torch.float64)
    saved = conv.conv2d_forward_reference(x, w, None, *geometry, "flat", [EPSILON])
    relevance = torch.rand(saved[0].shape, generator=g, dtype=torch.float64) + 0.5
    return x, w, saved, relevance


def _error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return (got.double() - truth).abs().max().item()


def _bound(reference: torch.Tensor, truth: torch.Tensor) -> float:
    """Twice the reference's error in its dtype, and at least two roundings at the result's
    magnitude: a few sums can round closer by chance (a dense layer's seven shares)."""
    rounding = torch.finfo(reference.dtype).eps * truth.abs().max().item()
    return 2 * max(_error(reference, truth), rounding)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv_flat_within_the_reference_error(geometry, dtype):
    x, w, saved, relevance = _conv_case(geometry)
    truth = conv.conv2d_relevance_reference(
        x, w, None, saved, relevance, *geometry, "flat", [EPSILON]
    )
    low = [t.to(dtype) for t in (x, w, relevance)]
    low_saved = [t.to(dtype) for t in saved]
    reference = conv.conv2d_relevance_reference(
        low[0], low[1], None, low_saved, low[2], *geometry, "flat", [EPSILON]
    )
    got = conv.conv2d_relevance(
        low[0], low[1], None, low_saved, low[2], *geometry, "flat", [EPSILON]
    )
    assert got.dtype == dtype and got.shape == x.shape
    # Relevance is conserved where every output sees the image (count > 0 everywhere here).
    torch.testing.assert_close(truth.sum(), relevance.sum(), rtol=1e-6, atol=0)
    assert _error(got, truth) <= _bound(reference, truth)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_flat_within_the_reference_error(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 300, generator=g, dtype=torch.float64)
    w = torch.randn(7, 300, generator=g, dtype=torch.float64)
    saved = linear.linear_forward_reference(x, w, None, "flat", [EPSILON])
    relevance = torch.rand(3, 7, generator=g, dtype=torch.float64) + 0.5
    truth = linear.linear_relevance_reference(x, w, None, saved, relevance, "flat", [EPSILON])
    low = [t.to(dtype) for t in (x, w, relevance)]
    low_saved = [t.to(dtype) for t in saved]
    reference = linear.linear_relevance_reference(
        low[0], low[1], None, low_saved, low[2], "flat", [EPSILON]
    )
    got = linear.linear_relevance(low[0], low[1], None, low_saved, low[2], "flat", [EPSILON])
    assert got.dtype == dtype
    assert _error(got, truth) <= _bound(reference, truth)


def test_zero_count_with_zero_epsilon_gives_zero():
    """Outputs whose window lies in the padding alone see no input: their count is 0, and with
    ε = 0 their share is 0 (``divide``'s convention), not ``R/0``."""
    geometry = ([1, 1], [3, 3], [1, 1], 1)
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    saved = conv.conv2d_forward(x, w, None, *geometry, "flat", [0.0])
    relevance = torch.rand_like(saved[0]) + 0.5
    truth = conv.conv2d_relevance_reference(x, w, None, saved, relevance, *geometry, "flat", [0.0])
    got = conv.conv2d_relevance(x, w, None, saved, relevance, *geometry, "flat", [0.0])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_step_makes_no_tensor_of_the_output_size(dtype):
    """VGG's first layer (3 → 64 channels): the step holds nothing of its relevance's size.
    Dividing each share before the sum made three such tensors, in float32 for 16-bit dtypes
    (2.4 GB at batch 64, 224², bfloat16)."""
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    x = torch.rand(2, 3, 32, 32).to(dtype)
    w = torch.randn(64, 3, 3, 3).to(dtype)
    saved = conv.conv2d_forward(x, w, None, *geometry, "flat", [EPSILON])
    relevance = torch.rand_like(saved[0])
    memory = LiveBytes()
    with memory:
        got = conv.conv2d_relevance(x, w, None, saved, relevance, *geometry, "flat", [EPSILON])
    assert got.shape == x.shape
    assert memory.peak < relevance.nbytes // 4, (memory.peak, relevance.nbytes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_wsquare_within_the_reference_error(geometry, dtype, with_bias):
    x, w, _, relevance = _conv_case(geometry)
    b = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    b = b if with_bias else None
    saved = conv.conv2d_forward_reference(x, w, b, *geometry, "wsquare", [EPSILON])
    truth = conv.conv2d_relevance_reference(
        x, w, b, saved, relevance, *geometry, "wsquare", [EPSILON]
    )
    low = [None if t is None else t.to(dtype) for t in (x, w, b, relevance)]
    low_saved = [t.to(dtype) for t in saved]
    reference = conv.conv2d_relevance_reference(
        *low[:3], low_saved, low[3], *geometry, "wsquare", [EPSILON]
    )
    got = conv.conv2d_relevance(*low[:3], low_saved, low[3], *geometry, "wsquare", [EPSILON])
    assert got.dtype == dtype and got.shape == x.shape
    assert _error(got, truth) <= _bound(reference, truth)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_wsquare_makes_its_denominator_for_one_sample(kind):
    """The denominator ``W²·1 + b²`` is the same for every sample: one sample's product, not a
    batch of ones (which cost the layer's forward again). Counted: the batch sizes of the step's
    products — a convolution's transposed product is ``convolution_backward`` (not counted), a
    dense layer's a product of the whole batch."""

    class Products(InsideCustomOps):
        def __init__(self) -> None:
            super().__init__()
            self.batches: list[int] = []

        def record(self, func, args, kwargs, out) -> None:
            name = func.overloadpacket.__name__
            if name in ("conv2d", "convolution", "linear", "matmul", "addmm", "mm"):
                self.batches.append(args[0].shape[0] if name != "addmm" else args[1].shape[0])

    g = torch.Generator().manual_seed(2)
    if kind == "conv":
        geometry = ([1, 1], [1, 1], [1, 1], 1)
        x = torch.rand(5, 4, 6, 6, generator=g)
        w, b = torch.randn(3, 4, 3, 3, generator=g), torch.randn(3, generator=g)
        saved = conv.conv2d_forward(x, w, b, *geometry, "wsquare", [EPSILON])

        def step():
            return conv.conv2d_relevance(x, w, b, saved, relevance, *geometry, "wsquare", [EPSILON])

        def truth():
            return conv.conv2d_relevance_reference(
                x, w, b, saved, relevance, *geometry, "wsquare", [EPSILON]
            )
    else:
        x = torch.rand(5, 8, generator=g)
        w, b = torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
        saved = linear.linear_forward(x, w, b, "wsquare", [EPSILON])

        def step():
            return linear.linear_relevance(x, w, b, saved, relevance, "wsquare", [EPSILON])

        def truth():
            return linear.linear_relevance_reference(
                x, w, b, saved, relevance, "wsquare", [EPSILON]
            )

    relevance = torch.rand(saved[0].shape, generator=g)
    counted = Products()
    with counted:
        got = step()
    torch.testing.assert_close(got, truth(), rtol=1e-5, atol=1e-6)
    assert sorted(counted.batches) == ([1] if kind == "conv" else [1, 5]), counted.batches
