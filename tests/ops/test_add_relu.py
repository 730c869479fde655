"""The sum of two tensors and its ReLU in one pass, against an independent float64 oracle.

The oracle adds in float64 (exact for these operands: their exponents are close) and rounds the
ReLU of the sum to the dtype once, which is what one rounded addition and a select give: the
kernels must equal it bitwise. NaN and −0 are kept (a select ``v < 0 ? 0 : v``).
"""

from __future__ import annotations

import pytest
import torch
from tests.ops._backends import CUDA, use_backend
from tests.ops.test_bias_relu import assert_bitwise

from relprop.ops import add_relu as add_relu_ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def oracle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    v = a.double() + b.double()
    return torch.where(v < 0, torch.zeros_like(v), v).to(a.dtype)


def sample(shape, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    return a.to(dtype), b.to(dtype)


# A tail after the packs (109 = 13 packs of 8 + 5), a residual block's end, an empty batch.
SHAPES = [(109,), (2, 8, 7, 7), (0, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_oracle(backend, dtype, shape):
    a, b = sample(shape, dtype)
    out = add_relu_ops.add_relu(a, b)
    assert out.is_contiguous()
    assert_bitwise(out, oracle(a, b))
    # The operands are read, not written.
    assert torch.equal(a, sample(shape, dtype)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_infinity_and_negative_zero(backend, dtype):
    a = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), 1.0, -2.0, -float("inf"), 3.0])
    b = torch.tensor([1.0, -0.0, -0.0, 1.0, -1.0, 2.0, 1.0, -4.0])
    a, b = a.to(dtype), b.to(dtype)
    out = add_relu_ops.add_relu(a, b)
    assert_bitwise(out, oracle(a, b))
    assert out[0].isnan() and out[1].signbit() and out[3] == float("inf")
    assert out[4:].tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernel_gives_the_same_bits_at_any_alignment(cuda_device, dtype):
    """16 bytes of each operand a step where the addresses allow it, single elements where one
    does not (a view starting inside its allocation): the oracle's bits either way."""
    length = 1001 if cuda_device.type == "cpu" else 64 * 256 * 56 * 56 + 5
    a, b = sample((length + 3,), dtype, seed=9)
    operands = [t.to(cuda_device) for t in (a, b)]
    for offsets in ((0, 0), (1, 0), (0, 3), (2, 2)):
        views = [t[k : k + length] for t, k in zip(operands, offsets)]
        out = add_relu_ops.add_relu(*views)
        assert_bitwise(out.cpu(), oracle(*(v.cpu() for v in views)))


def test_opcheck(backend):
    a, b = sample((2, 3, 5, 4), torch.float32)
    torch.library.opcheck(add_relu_ops.add_relu_op, (a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_opcheck_cuda(monkeypatch):
    use_backend("cuda", monkeypatch)
    a, b = sample((2, 3, 5, 4), torch.float32)
    torch.library.opcheck(add_relu_ops.add_relu_op, (a.cuda(), b.cuda()))


def test_operands_of_another_shape_are_refused(backend):
    with pytest.raises(ValueError, match=r"b has shape \(1, 3\), a \(2, 3\)"):
        add_relu_ops.add_relu(torch.zeros(2, 3), torch.zeros(1, 3))
    # Called as an op (not through the checking wrapper), the kernels refuse the same: the
    # reference would broadcast and the native kernels read past the smaller operand's end.
    with pytest.raises(ValueError, match=r"b has shape \(1, 3\), a \(2, 3\)"):
        torch.ops.relprop.add_relu(torch.zeros(2, 3), torch.zeros(1, 3))
