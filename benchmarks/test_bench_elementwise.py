"""CPU micro-benchmarks of the fused element-wise ops against the torch composition.

On a VGG16 conv1 activation (4×64×224×224 float32, 51 MB per tensor), one benchmark group per
rule term compares two providers:

- ``relprop``: ``relprop::stabilized_divide`` as dispatched on CPU (one OpenMP pass);
- ``torch``: the same term composed of torch ops, as ``relprop.ops._layer_rules.divide`` wrote it
  before it called the fused op (``copysign`` + ``add_`` + ``div``; ``where``s for ε = 0; a mask
  product for the γ rule; a scaled numerator for α-β).

Run it (it is not part of the test suite)::

    .venv/bin/python -m pytest benchmarks/test_bench_elementwise.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name

``relprop::paired_shares`` (α-β's and γ's two shares in one pass, with the relevance's factor)
is compared with its torch composition (the reference) and with what the engine ran before it:
the second denominator in a pass of its own and two fused divisions.

``test_small_divide`` times the engine's division (``_layer_rules.divide_fast``, the native kernel
called as a function) against the torch composition on the small tensors of a batch-1 analysis,
where the cost per call, not per byte, decides: the composition was used below 65 536 elements
while every op call paid the dispatcher.

Each group also has ``relprop baseline``: the same native kernel with its loop's baseline copy
(SSE2 on x86-64) instead of the AVX2 copy the module picks where the CPU has it
(csrc/include/relprop/cpu_isa.h); on a machine without AVX2 the two rows are the same code.

The machine is shared and the work memory-bound: compare medians within one run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from relprop import _native
from relprop.ops._layer_rules import divide_fast
from relprop.ops.elementwise import stabilized_divide, stabilized_divide_reference
from relprop.ops.paired_shares import paired_shares, paired_shares_reference

pytest.importorskip("pytest_benchmark")

ROUNDS = 7
SHAPE = (4, 64, 224, 224)
EPSILON = 1e-6
BETA = 1.0


@contextlib.contextmanager
def loops_for(provider: str) -> Iterator[None]:
    """The CPU loops' instruction set for ``provider``: the baseline copy for ``relprop
    baseline``, the module's own choice otherwise."""
    if provider != "relprop baseline":
        yield
        return
    module = _native.native()
    previous = module.cpu_isa()
    module.set_cpu_isa("baseline")
    try:
        yield
    finally:
        module.set_cpu_isa(previous)


def _torch_divide(numerator: Tensor, denominator: Tensor, epsilon: float) -> Tensor:
    if epsilon == 0:
        safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
        return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / safe)
    shift = torch.copysign(denominator.new_full((), epsilon), denominator)
    return numerator / shift.add_(denominator)


TERMS = {
    # R / stab(z, ε): the ε, z⁺ and z^B rules
    "epsilon": (
        lambda r, z: _torch_divide(r, z, EPSILON),
        lambda r, z: stabilized_divide(r, z, EPSILON),
    ),
    # R / z with 0 for z = 0: LRP-0
    "epsilon=0": (
        lambda r, z: _torch_divide(r, z, 0.0),
        lambda r, z: stabilized_divide(r, z, 0.0),
    ),
    # [z > 0]·R / stab(z⁺, ε): the γ rule (z stands in for both z and z⁺)
    "gamma [z>0]": (
        lambda r, z: _torch_divide((z > 0) * r, z, EPSILON),
        lambda r, z: stabilized_divide(r, z, EPSILON, sign_reference=z, sign=1),
    ),
    # −β·R / stab(z_n, ε): α-β's negative term
    "alphabeta -beta": (
        lambda r, z: _torch_divide(-BETA * r, z, EPSILON),
        lambda r, z: stabilized_divide(r, z, EPSILON, scale=-BETA),
    ),
}


@pytest.fixture(scope="module")
def activations() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    relevance = torch.randn(SHAPE, generator=generator)
    z = torch.randn(SHAPE, generator=generator)
    return relevance, z


@pytest.mark.parametrize("provider", ["relprop", "relprop baseline", "torch"])
@pytest.mark.parametrize("term", list(TERMS))
def test_stabilized_divide(benchmark, monkeypatch, activations, term: str, provider: str) -> None:
    monkeypatch.delenv("RELPROP_BACKEND", raising=False)
    relevance, z = activations
    composed, fused = TERMS[term]
    call = composed if provider == "torch" else fused
    benchmark.group = f"stabilized_divide {term} {'x'.join(map(str, SHAPE))}"
    benchmark.extra_info.update(term=term, provider=provider)
    with loops_for(provider):
        result = benchmark.pedantic(call, args=(relevance, z), rounds=ROUNDS, warmup_rounds=1)
    assert result.shape == SHAPE and bool(torch.isfinite(result).all())


# (scale, second_scale, z_weight, sign_masks) of each rule's pair of shares.
PAIRS = {"alphabeta": (2.0, -1.0, 1.0, False), "gamma": (1.0, 1.0, 2.25, True)}


def _two_divisions(r, z, zp, factor, scale, second_scale, z_weight, masks):
    second = torch.sub(z, zp) if z_weight == 1 else torch.add(-zp, z, alpha=z_weight)
    reference = z if masks else None
    first = stabilized_divide(r, zp, EPSILON, scale, reference, 1, factor)
    return first, stabilized_divide(r, second, EPSILON, second_scale, reference, -1, factor)


@pytest.mark.parametrize("provider", ["relprop", "relprop baseline", "two divisions", "torch"])
@pytest.mark.parametrize("rule", list(PAIRS))
def test_paired_shares(benchmark, monkeypatch, activations, rule: str, provider: str) -> None:
    monkeypatch.delenv("RELPROP_BACKEND", raising=False)
    relevance, z = activations
    generator = torch.Generator().manual_seed(1)
    zp, factor = torch.randn(SHAPE, generator=generator), torch.rand(SHAPE, generator=generator)
    params = PAIRS[rule]
    call = {
        "relprop": lambda: paired_shares(relevance, z, zp, EPSILON, *params, factor),
        "relprop baseline": lambda: paired_shares(relevance, z, zp, EPSILON, *params, factor),
        "two divisions": lambda: _two_divisions(relevance, z, zp, factor, *params),
        "torch": lambda: paired_shares_reference(relevance, z, zp, EPSILON, *params, factor),
    }[provider]
    benchmark.group = f"paired_shares {rule} {'x'.join(map(str, SHAPE))}"
    benchmark.extra_info.update(rule=rule, provider=provider)
    with loops_for(provider):
        result = benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1)
    shares = torch.cat(result, dim=1) if isinstance(result, tuple) else result
    assert shares.shape == (SHAPE[0], 2 * SHAPE[1], *SHAPE[2:])
    assert bool(torch.isfinite(shares).all())


# Batch-1 relevance tensors: ResNet50's pooled features, its last stage, a 32×32 image's first
# stage, and the old threshold's size.
SMALL_SHAPES = [(1, 2048, 1, 1), (1, 512, 7, 7), (1, 64, 16, 16), (1, 256, 16, 16)]


@pytest.mark.parametrize("provider", ["relprop", "relprop baseline", "torch"])
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_small_divide(benchmark, monkeypatch, shape, provider: str) -> None:
    monkeypatch.delenv("RELPROP_BACKEND", raising=False)
    generator = torch.Generator().manual_seed(2)
    relevance, z, factor = (torch.randn(shape, generator=generator) for _ in range(3))
    call = stabilized_divide_reference if provider == "torch" else divide_fast
    benchmark.group = f"small divide {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(provider=provider)
    with torch.no_grad(), loops_for(provider):  # no_grad: as the engine runs it
        result = benchmark.pedantic(
            call, args=(relevance, z, EPSILON, 1.0, None, 1, factor), rounds=200, warmup_rounds=5
        )
    assert result.shape == shape and bool(torch.isfinite(result).all())
