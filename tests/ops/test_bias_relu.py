"""A layer's bias and its ReLU in one in-place pass, against an independent float64 oracle.

The oracle adds in float64 (exact for these operands: their exponents are close) and rounds the
ReLU of the sum to the dtype once, which is what one rounded addition and a select give: the
kernels must equal it bitwise. NaN and −0 are kept (a select ``v < 0 ? 0 : v``).
"""

from __future__ import annotations

import pytest
import torch
from tests.ops._backends import CUDA, use_backend

from relprop.ops import bias_relu as bias_relu_ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def oracle(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    v = z.double() + bias.double().view((1, -1) + (1,) * (z.dim() - 2))
    return torch.where(v < 0, torch.zeros_like(v), v).to(z.dtype)


def sample(shape, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64)
    return z.to(dtype), bias.to(dtype)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    # Bits, so that -0 against +0 and NaN payload-free comparisons count.
    assert torch.equal(actual.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(actual[keep], expected[keep])
    assert torch.equal(actual[keep].signbit(), expected[keep].signbit())


# (N, C) dense outputs; conv outputs whose rows take packs of 2, 4 or 8 (inner 16) and ones that
# do not (5·7, 1·13); an empty batch.
SHAPES = [(2, 3), (2, 5, 7, 9), (3, 4, 4, 4), (3, 4, 1, 13), (2, 6, 16), (0, 4, 3, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_oracle(backend, dtype, shape):
    z, bias = sample(shape, dtype)
    expected = oracle(z, bias)
    out = bias_relu_ops.bias_relu_(z, bias)
    assert out is z
    assert_bitwise(z, expected)
    assert (z >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_infinity_and_negative_zero(backend, dtype):
    z = torch.tensor([[[float("nan"), -0.0, 0.0, float("inf")], [1.0, -2.0, -float("inf"), 3.0]]])
    bias = torch.tensor([-0.0, 2.0])
    z, bias = z.to(dtype), bias.to(dtype)
    expected = oracle(z, bias)
    bias_relu_ops.bias_relu_(z, bias)
    assert_bitwise(z, expected)
    assert z[0, 0, 0].isnan() and z[0, 0, 1].signbit() and z[0, 0, 3] == float("inf")
    assert z[0, 1].tolist() == [3.0, 0.0, 0.0, 5.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernel_gives_the_same_bits_at_any_alignment(cuda_device, dtype):
    """16 bytes a step where z's address and its rows allow it, single elements where not (a view
    starting inside its allocation): the oracle's bits either way, across several blocks."""
    shape = (3, 5, 8, 40) if cuda_device.type == "cpu" else (7, 33, 56, 56)
    z, bias = sample(shape, dtype, seed=9)
    numel = z.numel()
    for offset in (0, 1, 3):
        buffer = torch.zeros(numel + 3, dtype=dtype)
        buffer[offset : offset + numel] = z.reshape(-1)
        buffer = buffer.to(cuda_device)
        view = buffer[offset : offset + numel].view(shape)
        assert view.is_contiguous()
        bias_relu_ops.bias_relu_(view, bias.to(cuda_device))
        assert_bitwise(view.cpu(), oracle(z, bias))
        # The operation stays inside z: the buffer around it is untouched.
        assert not buffer[:offset].any() and not buffer[offset + numel :].any()


def test_opcheck(backend):
    z, bias = sample((2, 3, 5, 4), torch.float32)
    torch.library.opcheck(bias_relu_ops.bias_relu_op, (z, bias))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_opcheck_cuda(monkeypatch):
    use_backend("cuda", monkeypatch)
    z, bias = sample((2, 3, 5, 4), torch.float32)
    torch.library.opcheck(bias_relu_ops.bias_relu_op, (z.cuda(), bias.cuda()))


@pytest.mark.parametrize(
    "z, bias, message",
    [
        (torch.zeros(4), torch.zeros(4), "batch and a channel dimension"),
        (
            torch.zeros(2, 3, 4),
            torch.zeros(4),
            r"bias has shape \(4,\); it needs one value per channel \(dim 1\) of a tensor of shape \(2, 3, 4\)",
        ),
        (torch.zeros(2, 3), torch.zeros(3, dtype=torch.float64), "bias is torch.float64"),
        (torch.zeros(3, 2).T, torch.zeros(3), "must be contiguous"),
        (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), "floating"),
    ],
)
def test_invalid_arguments_are_refused(backend, z, bias, message):
    with pytest.raises(ValueError, match=message):
        bias_relu_ops.bias_relu_(z, bias)
    # Called as an op (not through the checking wrapper), the kernels refuse the same.
    with pytest.raises(ValueError, match=message):
        torch.ops.relprop.bias_relu_(z, bias)
