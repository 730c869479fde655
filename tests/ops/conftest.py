"""Fixtures of the op tests: which implementation runs (tests/ops/_backends.py)."""

from __future__ import annotations

import pytest
import torch
from tests.ops._backends import BACKENDS, CUDA_KERNELS, KERNELS, use_backend


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    """The ops run natively (CPU twins), as references, or as the emulated CUDA kernels."""
    use_backend(request.param, monkeypatch)
    return request.param


@pytest.fixture(params=CUDA_KERNELS)
def cuda_device(request, monkeypatch) -> torch.device:
    """The ops run their CUDA kernels: on the GPU, or emulated on the CPU. Where tensors go."""
    return use_backend(request.param, monkeypatch)


@pytest.fixture(params=KERNELS)
def native_kernels(request, monkeypatch) -> str:
    """The ops run the compiled kernels: the CPU twins, or the emulated CUDA kernels."""
    use_backend(request.param, monkeypatch)
    return request.param
