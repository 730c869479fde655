"""CPU micro-benchmarks of relprop's layer ops against the torch composition of the same step.

For a few layer shapes of VGG16 and ResNet50 and each rule a composite gives such a layer, one
benchmark group compares three providers of one layer step (forward, then relevance):

- ``gradient``: the layer's forward and the gradient with respect to its input by autograd,
  what a plain gradient pays for this layer and what LRP is measured against;
- ``relprop``: ``relprop::<op>_forward`` + ``relprop::<op>_relevance`` as dispatched on CPU;
- ``reference``: the same ops with ``RELPROP_BACKEND=reference`` (the plain-PyTorch truth).

Shapes are batch 1 (4 for dense layers) and some spatially cropped, so that the whole file runs
in a few minutes on two cores. Run it (it is not part of the test suite)::

    .venv/bin/python -m pytest benchmarks/test_bench_ops.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import relprop  # noqa: F401  (registers the relprop:: ops)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ops_triton  # its pool step, timed here on the CPU

pytest.importorskip("pytest_benchmark")

ROUNDS = 5
RULE_PARAMS = {
    "epsilon": [1e-6],
    "flat": [1e-6],
    "zbox": [-3.0, 3.0, 1e-6],
    "zplus": [1e-6, 1.0],
    "gamma": [0.25, 1e-6],
    "alphabeta": [2.0, 1.0, 1e-6, 1.0],
}


@dataclass(frozen=True)
class Layer:
    """A layer shape; ``first`` layers see mixed-sign pixels, the others ReLU outputs."""

    name: str
    kind: str  # "conv" or "linear"
    in_features: int  # channels for conv
    out_features: int
    size: int = 1  # input height = width (cropped where noted)
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    batch: int = 1
    first: bool = False
    output: bool = False  # the model's last layer: relevance is the max logit's one-hot value

    @property
    def rules(self) -> tuple[str, ...]:
        if self.first:  # EpsilonGammaBox's, EpsilonPlusFlat's and lrp.epsilon's first layer
            return ("zbox", "flat", "epsilon")
        if self.kind == "linear":  # the composites keep ε on dense layers
            return ("epsilon", "alphabeta")
        return ("epsilon", "zplus", "gamma", "alphabeta")


LAYERS = [
    Layer("vgg16.conv1_1@112", "conv", 3, 64, 112, 3, 1, 1, first=True),
    Layer("vgg16.conv4_2@14", "conv", 512, 512, 14, 3, 1, 1),
    Layer("vgg16.fc7", "linear", 4096, 4096, batch=4),
    Layer("resnet50.layer1.conv2", "conv", 64, 64, 56, 3, 1, 1),
    Layer("resnet50.layer2.0.conv2", "conv", 128, 128, 56, 3, 2, 1),
    Layer("resnet50.layer3.conv1", "conv", 1024, 256, 14, 1),
    Layer("resnet50.fc", "linear", 2048, 1000, batch=4, output=True),
]
PROVIDERS = ("gradient", "relprop", "reference")


def _layer_tensors(layer: Layer):
    generator = torch.Generator().manual_seed(0)
    if layer.kind == "conv":
        x = torch.randn(layer.batch, layer.in_features, layer.size, layer.size, generator=generator)
        fan_in = layer.in_features * layer.kernel**2
        weight = (
            torch.randn(
                layer.out_features,
                layer.in_features,
                layer.kernel,
                layer.kernel,
                generator=generator,
            )
            / fan_in**0.5
        )
    else:
        x = torch.randn(layer.batch, layer.in_features, generator=generator)
        fan_in = layer.in_features
        weight = torch.randn(layer.out_features, layer.in_features, generator=generator)
        weight /= fan_in**0.5
    if not layer.first:
        x = x.relu()
    bias = 0.1 * torch.randn(layer.out_features, generator=generator)
    return x, weight, bias


def _step(layer: Layer, rule: str, provider: str, x, weight, bias):
    """One layer step (forward + relevance, or forward + input gradient) as a no-arg callable."""
    params = RULE_PARAMS[rule]
    if layer.kind == "conv":
        geometry = ([layer.stride] * 2, [layer.padding] * 2, [1, 1], 1)
        forward_fn = lambda x: torch.ops.relprop.conv2d_forward(
            x, weight, bias, *geometry, rule, params
        )
        relevance_fn = lambda x, saved, r: torch.ops.relprop.conv2d_relevance(
            x, weight, bias, saved, r, *geometry, rule, params
        )
        plain = lambda x: F.conv2d(x, weight, bias, *geometry)
    else:
        forward_fn = lambda x: torch.ops.relprop.linear_forward(x, weight, bias, rule, params)
        relevance_fn = lambda x, saved, r: torch.ops.relprop.linear_relevance(
            x, weight, bias, saved, r, rule, params
        )
        plain = lambda x: F.linear(x, weight, bias)
    with torch.no_grad():
        z = plain(x)
    if layer.output:
        index = z.argmax(dim=1, keepdim=True)
        relevance = torch.zeros_like(z).scatter_(1, index, z.gather(1, index))
    else:
        # Every other layer here feeds a ReLU (after BN): relevance arrives only where z > 0,
        # which lets rules such as gamma skip their negative-part terms, as in a real network.
        relevance = torch.rand(z.shape, generator=torch.Generator().manual_seed(2)) * (z > 0)

    if provider == "gradient":

        def call():
            leaf = x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(plain(leaf), leaf, relevance)
            return grad
    else:

        def call():
            saved = forward_fn(x)
            return relevance_fn(x, saved, relevance)

    return call


CASES = [
    pytest.param(layer, rule, provider, id=f"{layer.name}-{rule}-{provider}")
    for layer in LAYERS
    for rule in layer.rules
    for provider in PROVIDERS
]


@pytest.mark.parametrize(("layer", "rule", "provider"), CASES)
def test_layer_step(benchmark, monkeypatch, layer: Layer, rule: str, provider: str) -> None:
    if provider == "reference":
        monkeypatch.setenv("RELPROP_BACKEND", "reference")
    else:
        monkeypatch.delenv("RELPROP_BACKEND", raising=False)
    x, weight, bias = _layer_tensors(layer)
    call = _step(layer, rule, provider, x, weight, bias)
    benchmark.group = f"{layer.name} {rule}"
    benchmark.extra_info.update(layer=layer.name, rule=rule, provider=provider)
    result = benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1)
    assert result.shape == x.shape and bool(torch.isfinite(result).all())


# -- pooling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    name: str
    kind: str  # "max", "avg" or "adaptive"
    channels: int
    size: int
    kernel: int = 2
    stride: int = 2
    padding: int = 0


POOLS = [
    Pool("vgg16.maxpool@112", "max", 64, 112, 2, 2),
    Pool("resnet50.maxpool@112", "max", 64, 112, 3, 2, 1),
    Pool("resnet50.avgpool", "adaptive", 2048, 7),
    Pool("avgpool2x2@28", "avg", 256, 28, 2, 2),
]


def _pool_step(pool: Pool, provider: str, x: torch.Tensor):
    geometry = ([pool.kernel] * 2, [pool.stride] * 2, [pool.padding] * 2)
    if pool.kind == "max":
        plain = lambda x: F.max_pool2d(x, *geometry)

        def lrp():
            out, indices = F.max_pool2d(x, *geometry, return_indices=True)
            return torch.ops.relprop.max_pool_relevance(
                torch.rand_like(out), indices, list(x.shape[2:])
            )
    elif pool.kind == "avg":
        plain = lambda x: F.avg_pool2d(x, *geometry)

        def lrp():
            out = F.avg_pool2d(x, *geometry)
            return torch.ops.relprop.avg_pool2d_relevance(
                x, torch.rand_like(out), *geometry, False, True, None, 1e-6
            )
    else:
        plain = lambda x: F.adaptive_avg_pool2d(x, 1)

        def lrp():
            out = F.adaptive_avg_pool2d(x, 1)
            return torch.ops.relprop.adaptive_avg_pool2d_relevance(
                x, torch.rand_like(out), [1, 1], 1e-6
            )

    if provider != "gradient":
        return lrp

    def gradient():
        leaf = x.detach().requires_grad_()
        out = plain(leaf)
        (grad,) = torch.autograd.grad(out, leaf, torch.rand_like(out))
        return grad

    return gradient


@pytest.mark.parametrize(
    ("pool", "provider"),
    [pytest.param(p, prov, id=f"{p.name}-{prov}") for p in POOLS for prov in PROVIDERS],
)
def test_pool_step(benchmark, monkeypatch, pool: Pool, provider: str) -> None:
    if provider == "reference":
        monkeypatch.setenv("RELPROP_BACKEND", "reference")
    else:
        monkeypatch.delenv("RELPROP_BACKEND", raising=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, pool.channels, pool.size, pool.size, generator=generator).relu()
    call = _pool_step(pool, provider, x)
    benchmark.group = f"{pool.name} pool"
    benchmark.extra_info.update(layer=pool.name, provider=provider)
    result = benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1)
    assert result.shape == x.shape and bool(torch.isfinite(result).all())


# -- a max pool's relevance divided at its winners (the z⁺/γ layer below it) --------------------


@pytest.mark.parametrize(
    ("pool", "provider"),
    [
        pytest.param(p, prov, id=f"{p.name}-{prov}")
        for p in POOLS
        if p.kind == "max"
        for prov in bench_ops_triton.POOL_PROVIDERS
    ],
)
def test_pool_divided_step(benchmark, pool: Pool, provider: str) -> None:
    """The relevance step between a max pool and the γ convolution under it, as the GPU script
    times it (``bench_ops_triton.pool_providers``): the fused op, the three ops it replaces, the
    spread then the division at full size, and the gradient's pool and ReLU backward."""
    geometry = bench_ops_triton.Pool(
        pool.name, pool.channels, pool.size, pool.kernel, pool.stride, pool.padding
    )
    call = bench_ops_triton.pool_providers(geometry, 1, torch.float32, "cpu")[provider]
    benchmark.group = f"{pool.name} divided at the winners"
    benchmark.extra_info.update(layer=pool.name, provider=provider)
    result = benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1)
    shape = (1, pool.channels, pool.size, pool.size)
    assert result.shape == shape and bool(torch.isfinite(result).all())
