"""Whole analyzers on a CUDA device: the Triton/CUDA path against the reference path.

``auto`` (each layer shape on the implementation it measures fastest, a mix of Triton, native and
reference layers) is held to the same criteria.

Skipped without a GPU (``gpu`` marker). fp32 must match the float64 reference as closely as the
fp32 reference does (flash-attention's criterion); bf16/fp16 within a loose, stated bound.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import relprop

pytestmark = pytest.mark.gpu

COMPOSITES = {
    "EpsilonPlusFlat": relprop.composites.EpsilonPlusFlat,
    "EpsilonGammaBox": lambda: relprop.composites.EpsilonGammaBox(low=-3.0, high=3.0),
    "EpsilonAlpha2Beta1": relprop.composites.EpsilonAlpha2Beta1,
}


def _model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval().to("cuda", dtype)


def _relevance(name, composite, dtype, backend, monkeypatch, x):
    monkeypatch.setenv("RELPROP_BACKEND", backend)
    analyzer = relprop.create_analyzer(
        "lrp", _model(name, dtype), composite=COMPOSITES[composite]()
    )
    return analyzer.analyze(x.to(dtype)).double()


@pytest.fixture(autouse=True)
def _no_tf32():
    # TF32 would make fp32 kernels and references differ by far more than fp32 rounding.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("backend", ["triton", "native", "auto"])
@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_fp32_kernels_match_reference(name, composite, backend, monkeypatch):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)).cuda()
    truth = _relevance(name, composite, torch.float64, "reference", monkeypatch, x)
    reference32 = _relevance(name, composite, torch.float32, "reference", monkeypatch, x)
    fused = _relevance(name, composite, torch.float32, backend, monkeypatch, x)
    scale = truth.abs().max()
    reference_error = (reference32 - truth).abs().max() / scale
    fused_error = (fused - truth).abs().max() / scale
    assert fused_error <= 2 * reference_error + 1e-6


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_half_precision_close_to_fp32(dtype, composite, backend, monkeypatch):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2)).cuda()
    fp32 = _relevance("vgg16", composite, torch.float32, "reference", monkeypatch, x)
    half = _relevance("vgg16", composite, dtype, backend, monkeypatch, x)
    assert torch.isfinite(half).all()
    cosine = torch.nn.functional.cosine_similarity(half.flatten(), fp32.flatten(), dim=0)
    assert cosine > 0.95


@pytest.mark.parametrize("backend", ["triton", "native", "auto"])
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_cuda_runs_are_bitwise_equal(composite, backend, monkeypatch):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3)).cuda()
    first = _relevance("resnet50", composite, torch.float32, backend, monkeypatch, x)
    second = _relevance("resnet50", composite, torch.float32, backend, monkeypatch, x)
    assert torch.equal(first, second)
