"""A relevance coefficient that only the next step reads donates its memory to that step's division
(``ops._layer_rules.DONATED_MARK``): one output-sized tensor fewer alive during the step's
transposed product, where a VGG's relevance pass holds the most.

Oracle: the same analysis without donation, bitwise (the division's arithmetic is the same; only
where its result is stored changes). A donation of a coefficient that another step still reads —
a residual sum's share goes to both branches — would change the other branch's relevance, which
the residual network here would show. That donations happen at all is counted (the memory itself
is measured by ``benchmarks/run.py``'s resident-set peak: VGG16, batch 8, ε 591 → 579 MB).
"""

from __future__ import annotations

import pytest
import torch
from tests.oracles import nets
from torch import nn

import relprop
from relprop.graph import layers as layers_module
from relprop.ops import _layer_rules

COMPOSITES = {
    "epsilon": lambda: relprop.composites.Composite(default=relprop.rules.Epsilon()),
    "EpsilonPlusFlat": relprop.composites.EpsilonPlusFlat,
    "EpsilonGammaBox": lambda: relprop.composites.EpsilonGammaBox(low=-3.0, high=3.0),
    "EpsilonAlpha2Beta1": relprop.composites.EpsilonAlpha2Beta1,
}


def _vgg_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 5),
    ).eval()  # fmt: skip


MODELS = {
    "vgg_like": (_vgg_like, (2, 3, 16, 16)),
    "small_resnet": (nets.small_resnet, (2, 3, 32, 32)),
}


def _analysis(monkeypatch, model_name, composite, donating: bool):
    """The relevance, and how many divisions wrote into their numerator's memory."""
    make, shape = MODELS[model_name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    donations = []
    with monkeypatch.context() as patch:
        if not donating:
            patch.setattr(layers_module, "donate", lambda t: t)
        into = _layer_rules.stabilized_divide_into

        def counted(out, numerator, *args):
            result = into(out, numerator, *args)
            donations.append(result is not None and result.data_ptr() == numerator.data_ptr())
            return result

        patch.setattr(_layer_rules, "stabilized_divide_into", counted)
        analyzer = relprop.create_analyzer("lrp", make(), composite=COMPOSITES[composite]())
        relevance = analyzer.analyze(x)
    return relevance, sum(donations)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_donation_changes_no_bit(monkeypatch, model_name, composite):
    monkeypatch.setenv("RELPROP_BACKEND", "native")
    donated, donations = _analysis(monkeypatch, model_name, composite, donating=True)
    kept, none = _analysis(monkeypatch, model_name, composite, donating=False)
    assert none == 0
    assert torch.equal(donated, kept)
    if composite == "epsilon":
        # ε reads the coefficient once: each convolution whose relevance arrives as the fresh
        # output of the step above takes it. In the VGG-like net the first and the third
        # convolution; the second's and the fourth's divisions are made by the max pools above
        # them as they spread their relevance, in one op that writes the spread shares
        # (layers.Shares; the fourth's relevance comes formed, through the flattening). In the
        # ResNet each block's first (from its
        # second), not the second, which gets the sum's share that the shortcut reads too, nor
        # the stem, whose division the max pool makes from the first block's two paths.
        assert donations == {"vgg_like": 2, "small_resnet": 4}[model_name]
