"""CPU benchmarks of relprop's host time per analysis: what a GPU waits for when kernels are short.

On an H100, ResNet50's relevance pass at batch 64 is host-bound in stretches (session 14's
profile, ``results/gpu_h100_profile_resnet50.md``: the GPU busy 29 of 34.5 ms for ε, 23.6 of 25.8
for the gradient): in layer4 and late layer3 each kernel runs for microseconds, and the next one
waits for Python to issue it. This measures that host cost where it can be seen without a GPU: a
ResNet50 with torchvision's own modules and topology (53 convolutions, 53 BatchNorms, 16
residual sums, the same steps relprop runs) but a sixteenth of the channels, on one 32×32 image,
so that each kernel takes a few microseconds and the time is the host's.

Rows per group (one group per method): ``relprop`` (the analysis) beside ``gradient`` (torch
autograd's forward and input backward, as ``benchmarks/run.py`` times it) and ``forward`` (the
model under ``no_grad``). Run it (it is not part of the test suite)::

    .venv/bin/python -m pytest benchmarks/test_bench_host.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name

One thread: torch's intra-op pool adds its wake-ups to every tiny kernel otherwise.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprop

pytest.importorskip("pytest_benchmark")

ROUNDS = 200
WIDTH_DIVISOR = 16
METHODS = ("lrp.epsilon", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1")


def narrow_resnet50(divisor: int = WIDTH_DIVISOR) -> nn.Module:
    """torchvision's ResNet50 with every channel count divided by ``divisor``: the same module
    types, blocks, strides and residual sums, seeded weights, BatchNorm statistics that are not
    the identity (so that folding them is real work), eval mode, frozen."""
    import torchvision
    from torchvision.models.resnet import Bottleneck

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    stem = 64 // divisor
    model.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(stem)
    inplanes = stem
    for index, (planes, blocks, stride) in enumerate(
        [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1
    ):
        width = planes // divisor
        stage = []
        for block in range(blocks):
            block_stride = stride if block == 0 else 1
            downsample = None
            if block == 0 and (block_stride != 1 or inplanes != width * Bottleneck.expansion):
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, width * Bottleneck.expansion, 1, block_stride, bias=False),
                    nn.BatchNorm2d(width * Bottleneck.expansion),
                )
            stage.append(Bottleneck(inplanes, width, block_stride, downsample))
            inplanes = width * Bottleneck.expansion
        setattr(model, f"layer{index}", nn.Sequential(*stage))
    model.fc = nn.Linear(inplanes, 1000)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def _analyzer(method: str, model: nn.Module):
    if method == "lrp.epsilon":
        return relprop.create_analyzer("lrp.epsilon", model)
    composite = {
        "EpsilonPlusFlat": lambda: relprop.composites.EpsilonPlusFlat(),
        "EpsilonGammaBox": lambda: relprop.composites.EpsilonGammaBox(low=-3.0, high=3.0),
        "EpsilonAlpha2Beta1": lambda: relprop.composites.EpsilonAlpha2Beta1(),
    }[method]()
    return relprop.create_analyzer("lrp", model, composite=composite)


@pytest.fixture(scope="module")
def model_and_input():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).clamp_(-3.0, 3.0)
    yield narrow_resnet50(), x
    torch.set_num_threads(threads)


def _gradient(model: nn.Module, x: torch.Tensor):
    def call():
        leaf = x.detach().requires_grad_()
        output = model(leaf)
        index = output.argmax(dim=1, keepdim=True)
        start = torch.zeros_like(output).scatter_(1, index, output.detach().gather(1, index))
        return torch.autograd.grad(output, leaf, start)[0]

    return call


def _forward(model: nn.Module, x: torch.Tensor):
    def call():
        with torch.no_grad():
            return model(x)

    return call


@pytest.mark.parametrize("provider", ["relprop", "gradient", "forward"])
@pytest.mark.parametrize("method", METHODS)
def test_host_time(benchmark, model_and_input, method, provider):
    model, x = model_and_input
    if provider == "relprop":
        analyzer = _analyzer(method, model)

        def call():
            return analyzer.analyze(x)
    else:
        call = (_gradient if provider == "gradient" else _forward)(model, x)
    benchmark.group = f"host time, narrow resnet50: {method}"
    for _ in range(5):  # the trace, the first folds, allocator warm-up
        call()
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1)
