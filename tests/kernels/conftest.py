"""The Triton kernel tests compare fp32 products in IEEE precision (see the fixture)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """On a GPU, fp32 products in IEEE precision for kernels and torch alike (the kernels follow
    torch's TF32 flags), so the criterion compares like with like."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
