"""Which implementation ``layer_backend`` picks: the rule the H100 measurements set."""

from __future__ import annotations

import pytest
import torch

from relprop.ops import _backend


@pytest.fixture
def triton_runs(monkeypatch):
    monkeypatch.delenv("RELPROP_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "triton_available", lambda: True)


CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    ("device", "dtype", "channels", "expected"),
    [
        (CUDA, torch.bfloat16, 3, "triton"),  # a first layer in 16 bits: Triton measured faster
        (CUDA, torch.float16, 4, "triton"),
        (CUDA, torch.bfloat16, 5, "native"),  # wider: cuDNN's composition
        (CUDA, torch.bfloat16, 512, "native"),
        (CUDA, torch.float32, 3, "native"),  # fp32: cuDNN wins at every measured shape
        (CUDA, torch.bfloat16, None, "native"),  # unknown width counts as wide
        (torch.device("cpu"), torch.bfloat16, 3, "native"),
    ],
)
def test_measured_choice(triton_runs, device, dtype, channels, expected):
    assert _backend.layer_backend(device, dtype, channels) == expected


def test_without_triton_cuda_takes_the_native_path(monkeypatch):
    monkeypatch.delenv("RELPROP_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    assert _backend.layer_backend(CUDA, torch.bfloat16, 3) == "native"


@pytest.mark.parametrize("forced", _backend.BACKENDS)
def test_environment_overrides_the_choice(triton_runs, monkeypatch, forced):
    monkeypatch.setenv("RELPROP_BACKEND", forced)
    assert _backend.layer_backend(CUDA, torch.float32, 512) == forced
    assert _backend.layer_backend(torch.device("cpu"), torch.float32, 3) == forced


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("RELPROP_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="RELPROP_BACKEND='cudnn' is not one of"):
        _backend.layer_backend(CUDA, torch.float32, 3)
