"""relprop runs unmodified on torchvision architectures (random weights, eval mode, no download)
and gives finite relevance of the input's shape.

Small 64×64 images keep this fast; the exact numbers are checked against Zennit in test_zennit.py.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from tests.oracles.nets import randomize_batchnorm, seeded_uniform
from torch import nn

import relprop

ARCHITECTURES = [
    "vgg16",
    "resnet50",
    "densenet121",
    "mobilenet_v2",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",  # x.chunk(2, dim=1) and a channel shuffle in every block
    "convnext_tiny",  # LayerNorms (nn.LayerNorm, and F.layer_norm on NHWC), layer scale, GELU
    "vit_b_16",  # nn.MultiheadAttention, class token, positional embedding (64×64: 16 patches)
]
# Constructor arguments for the 64×64 images of these tests.
SMALL_IMAGE = {"vit_b_16": {"image_size": 64}}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **SMALL_IMAGE.get(name, {}))
    randomize_batchnorm(model, seed=0)
    with torch.no_grad():
        for module in model.modules():
            # ViT's head starts at zero: its output, and every relevance, would be zero.
            if isinstance(module, nn.Linear) and not module.weight.any():
                module.weight.normal_(0.0, 0.02)
    return model.eval()


def _analyzers():
    return [
        ("lrp.epsilon", lambda model: relprop.create_analyzer("lrp.epsilon", model, epsilon=0.1)),
        (
            "EpsilonPlusFlat",
            lambda model: relprop.create_analyzer(
                "lrp", model, composite=relprop.composites.EpsilonPlusFlat()
            ),
        ),
    ]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_torchvision_model_runs(arch):
    model = _build(arch)
    x = seeded_uniform((1, 3, 64, 64), seed=51, low=-2.0, high=2.0, dtype=torch.float32)
    for label, make in _analyzers():
        analyzer = make(model)
        relevance = analyzer.analyze(x)
        assert relevance.shape == x.shape and relevance.dtype == x.dtype, label
        assert bool(torch.isfinite(relevance).all()), label
        assert relevance.abs().max() > 0, label
        plan = str(analyzer.plan)
        attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        for module_name, module in model.named_modules():
            # An attention's projections run inside its own step, which the plan names.
            inside_attention = any(module_name.startswith(f"{a}.") for a in attention)
            if isinstance(module, (nn.Conv2d, nn.Linear)) and not inside_attention:
                assert module_name in plan, f"{module_name} missing from the plan"
        for name in attention:
            assert name in plan, f"{name} missing from the plan"
