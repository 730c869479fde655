"""A regular max pool's winners lie where its window says (``ops.pool.max_pool_offset_bounds``).

The CUDA gather scans, for each input, the outputs whose winners can reach it: between the
widest offsets of a winner from its output's nominal position ``⌊o·in/out⌋``, which the kernel
measured on the device in a pass over the indices, and which a regular pool's window gives on the
host. Oracles: the offsets torch's own indices show, over geometries with padding, dilation,
ceil mode, odd sizes and inputs that push the winners to either end of their windows (the host
bounds must contain them, and equal them for VGG's and ResNet's pools); and the kernel with
measured bounds, bitwise, run by the CUDA emulation (tests/cuda_emulation).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from tests.cuda_emulation import emulate_cuda

from relprop.ops import pool


def _measured(indices: torch.Tensor, in_h: int, in_w: int) -> list[int]:
    """``[row_min, row_max, col_min, col_max]`` of the winners' offsets, as the kernel measures."""
    out_h, out_w = indices.shape[-2:]
    rows = indices // in_w
    cols = indices % in_w
    nominal_rows = (torch.arange(out_h) * in_h // out_h).view(-1, 1)
    nominal_cols = (torch.arange(out_w) * in_w // out_w).view(1, -1)
    dr, dc = rows - nominal_rows, cols - nominal_cols
    return [int(dr.min()), int(dr.max()), int(dc.min()), int(dc.max())]


def _inputs(shape):
    """Random values, and ramps whose winners sit at the first and last places of each window."""
    generator = torch.Generator().manual_seed(0)
    h, w = shape[-2:]
    ramp = (torch.arange(h).view(-1, 1) * w + torch.arange(w)).to(torch.float64).expand(shape)
    return [torch.randn(shape, generator=generator, dtype=torch.float64), ramp, -ramp]


GEOMETRIES = [
    # kernel, stride, padding, dilation, ceil_mode
    (k, s, p, d, c)
    for k, s, d in itertools.product((1, 2, 3, 4), (1, 2, 3), (1, 2))
    for p in range(k // 2 + 1)
    for c in (False, True)
]


@pytest.mark.parametrize("size", [(7, 9), (10, 10), (13, 6)], ids=str)
def test_host_bounds_contain_every_winner(size):
    h, w = size
    checked = 0
    for k, s, p, d, c in GEOMETRIES:
        if (k - 1) * d + 1 > min(h, w) + 2 * p:
            continue
        for x in _inputs((2, 3, h, w)):
            out, indices = F.max_pool2d(x, k, s, p, d, ceil_mode=c, return_indices=True)
            given = pool.max_pool_offset_bounds(
                (h, w), out.shape[-2:], (k, k), (s, s), (p, p), (d, d)
            )
            seen = _measured(indices, h, w)
            assert given[0] <= seen[0] and seen[1] <= given[1], ((k, s, p, d, c), given, seen)
            assert given[2] <= seen[2] and seen[3] <= given[3], ((k, s, p, d, c), given, seen)
            checked += 1
    assert checked > 100


@pytest.mark.parametrize(
    ("size", "window", "expected"),
    [
        ((224, 224), (2, 2, 0, 1), [0, 1, 0, 1]),  # VGG's pools: each window exactly
        ((112, 112), (3, 2, 1, 1), [-1, 1, -1, 1]),  # ResNet's stem pool
    ],
    ids=["vgg", "resnet"],
)
def test_host_bounds_are_the_windows_for_the_usual_pools(size, window, expected):
    k, s, p, d = window
    x = _inputs((1, 2, *size))
    out_shapes = {F.max_pool2d(t, k, s, p, d).shape[-2:] for t in x}
    (out_shape,) = out_shapes
    given = pool.max_pool_offset_bounds(size, out_shape, (k, k), (s, s), (p, p), (d, d))
    assert given == expected
    seen = [_measured(F.max_pool2d(t, k, s, p, d, return_indices=True)[1], *size) for t in x]
    assert [min(b[0] for b in seen), max(b[1] for b in seen)] == expected[:2]


@pytest.mark.parametrize("geometry", [(2, 2, 0, 1, False), (3, 2, 1, 1, True), (3, 1, 1, 2, False)])
@pytest.mark.parametrize("dims", [1, 2])
def test_emulated_kernel_with_host_bounds_gives_the_measured_bits(monkeypatch, geometry, dims):
    k, s, p, d, c = geometry
    generator = torch.Generator().manual_seed(3)
    shape = (2, 3, 11) if dims == 1 else (2, 3, 11, 9)
    x = torch.randn(shape, generator=generator)
    max_pool = F.max_pool1d if dims == 1 else F.max_pool2d
    out, indices = max_pool(x, k, s, p, d, ceil_mode=c, return_indices=True)
    relevance = torch.randn(out.shape, generator=generator)
    module = emulate_cuda(monkeypatch)
    window = tuple([v] * dims for v in (k, s, p, d))
    measured = pool.max_pool_relevance(relevance, indices, x.shape)
    known = pool.max_pool_relevance(relevance, indices, x.shape, window)
    assert module.calls["max_pool_relevance_cuda"] == 2
    assert torch.equal(known, measured)
    monkeypatch.setenv("RELPROP_BACKEND", "reference")
    torch.testing.assert_close(known, pool.max_pool_relevance(relevance, indices, x.shape))


def test_opcheck_with_bounds():
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    out, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    bounds = pool.max_pool_offset_bounds((7, 9), out.shape[-2:], (3, 3), (2, 2), (1, 1), (1, 1))
    torch.library.opcheck(
        pool.max_pool_relevance_op, (torch.randn_like(out), indices, [7, 9], bounds)
    )
