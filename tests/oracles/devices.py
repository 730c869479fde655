"""Where the Triton kernels run in a test, and fp32 products without TF32.

Triton's kernels run on a GPU where one is visible, and on the CPU only under its interpreter
(``tests/conftest.py`` turns that on where no GPU is visible): tests that force the Triton
backend put their tensors on :data:`TRITON_DEVICE`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 products without TF32 inside the block (cuDNN convolutions take TF32 by default, and
    the Triton kernels follow torch's flags): TF32 rounds operands to 10 mantissa bits, far more
    than the fp32 tolerances of the tests. Nothing changes on a CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
