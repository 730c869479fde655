"""CPU micro-benchmark of the fused stabilised division against the torch composition.

On a VGG16 conv1 activation (4×64×224×224 float32, 51 MB per tensor), one benchmark group per
rule term compares two providers:

- ``relprop``: ``relprop::stabilized_divide`` as dispatched on CPU (one OpenMP pass);
- ``torch``: the same term composed of torch ops, as ``relprop.ops._layer_rules.divide`` wrote it
  before it called the fused op (``copysign`` + ``add_`` + ``div``; ``where``s for ε = 0; a mask
  product for the γ rule; a scaled numerator for α-β).

Run it (it is not part of the test suite)::

    .venv/bin/python -m pytest benchmarks/test_bench_elementwise.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name

The machine is shared and the work memory-bound: compare medians within one run.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from relprop.ops.elementwise import stabilized_divide

pytest.importorskip("pytest_benchmark")

ROUNDS = 7
SHAPE = (4, 64, 224, 224)
EPSILON = 1e-6
BETA = 1.0


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


@pytest.mark.parametrize("provider", ["relprop", "torch"])
@pytest.mark.parametrize("term", list(TERMS))
def test_stabilized_divide(benchmark, monkeypatch, activations, term: str, provider: str) -> None:
    monkeypatch.delenv("RELPROP_BACKEND", raising=False)
    relevance, z = activations
    composed, fused = TERMS[term]
    call = fused if provider == "relprop" else composed
    benchmark.group = f"stabilized_divide {term} {'x'.join(map(str, SHAPE))}"
    benchmark.extra_info.update(term=term, provider=provider)
    result = benchmark.pedantic(call, args=(relevance, z), rounds=ROUNDS, warmup_rounds=1)
    assert result.shape == SHAPE and bool(torch.isfinite(result).all())
