"""What the README claims of relprop's work, held by counting it (``benchmarks/traffic.py``):
FLOPs of the products, bytes moved and peak memory of each method against a plain gradient's,
on the CPU, extrapolated to batch 64 from batches 2 and 4 at 64×64.

The oracles are the gradient's own counts and issue 3's floors: an ε-LRP needs the gradient's
products and no more bytes (its relevance travels between layers as an unformed ``c · x``,
docs/ops.md); z⁺ and γ on ``x ≥ 0`` one extra forward product per layer (1.5×), α-β one more
transposed product (2.0×); every method within 1.2× the gradient's peak memory. VGG16 has no
residual sums, so Zennit's generalised γ has no ``z < 0`` term there and the floors hold as
stated; ResNet50's layers that feed a residual sum pay that term (EpsilonGammaBox 1.67×,
EpsilonAlpha2Beta1 2.07×: README), so only its ε and EpsilonPlusFlat floors are held here.
Counting is deterministic: these are not timings.
"""

from __future__ import annotations

import pytest
from tests._benchmarks import load_benchmark

# Methods whose FLOP floor (``run.FLOOR``, issue 3's) each model is held to.
FLOORED = {
    "vgg16": ["lrp.epsilon", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1"],
    "resnet50": ["lrp.epsilon", "EpsilonPlusFlat"],
}


@pytest.fixture(scope="module", params=["vgg16", "resnet50"])
def ratios(request):
    """``{method: (FLOPs, bytes, peak)}`` as multiples of the gradient's."""
    traffic = load_benchmark("traffic.py")
    methods = list(traffic.run.FLOOR)  # the gradient first
    results = traffic.count_methods(request.param, methods, ["relprop"], (2, 4), 64, 64)
    (base_key, base), *rest = results
    assert base_key.startswith("gradient")
    out = {}
    for key, counts in rest:
        out[key.split(" / ")[0]] = (
            counts.total("flops") / base.total("flops"),
            counts.total("bytes") / base.total("bytes"),
            counts.peak_bytes / base.peak_bytes,
        )
    assert sorted(out) == sorted(methods[1:])
    return request.param, out, traffic.run.FLOOR


def test_products_stay_at_the_flop_floor(ratios):
    model, by_method, floor = ratios
    for method in FLOORED[model]:
        flops = by_method[method][0]
        assert flops <= floor[method] * 1.005, (model, method, flops)
    assert by_method["lrp.epsilon"][0] == pytest.approx(1.0, abs=1e-3)


def test_epsilon_moves_no_more_bytes_than_the_gradient(ratios):
    model, by_method, _ = ratios
    assert by_method["lrp.epsilon"][1] <= 1.0, model


def test_peak_memory_within_issue_3s_target(ratios):
    model, by_method, _ = ratios
    for method, (_, _, peak) in by_method.items():
        assert peak <= 1.2, (model, method, peak)
