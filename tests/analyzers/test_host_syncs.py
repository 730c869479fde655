"""The relevance pass does not wait for the device: no value is read back to the host per layer.

On a GPU every read-back (``.item()``, ``bool(tensor)``) drains the queue of launched kernels and
leaves the device idle until the host has launched the next one. relprop decides per layer
whether an input is non-negative (to skip the x⁻ products of z⁺, α-β and γ); a ReLU marks its
output, pooling and reshaping keep the mark, so on ReLU networks the only input that needs a
test is the network's own input, and only where the first layer's rule has x⁻ terms.
"""

from __future__ import annotations

import pytest
import torch
from tests.oracles.inside_ops import InsideCustomOps
from tests.oracles.nets import small_resnet
from torch import nn

import relprop

READ_BACKS = {"_local_scalar_dense", "item", "is_nonzero"}
# Ops that wait for the device on CUDA without a read-back in their schema: an index_put with
# tensor indices checks them on the host (torch.cuda.set_sync_debug_mode reported the selection
# mask's `mask[arange(n), index] = 1` on an H100, between the forward and the relevance pass);
# nonzero sizes its output from device data.
DEVICE_WAITS = {"index_put", "index_put_", "_index_put_impl_", "nonzero"}


class _ReadBackCounter(InsideCustomOps):
    """Counts the read-backs and device waits, the ones inside relprop's custom ops too."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def record(self, func, args, kwargs, out) -> None:
        if func.overloadpacket.__name__ in READ_BACKS | DEVICE_WAITS:
            self.count += 1


def _vgg_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(256, 32),
        nn.ReLU(),
        nn.Linear(32, 5),
    ).eval()


COMPOSITES = {
    # composite: read-backs expected: the finiteness check, and the input's sign test where the
    # first layer's rule has x⁻ terms (flat and zB have none)
    "EpsilonPlusFlat": (relprop.composites.EpsilonPlusFlat, 1),
    "EpsilonGammaBox": (lambda: relprop.composites.EpsilonGammaBox(low=-3.0, high=3.0), 1),
    "EpsilonAlpha2Beta1": (relprop.composites.EpsilonAlpha2Beta1, 2),
    "alpha2beta1 everywhere": (
        lambda: relprop.composites.uniform(relprop.rules.AlphaBeta(2.0, 1.0)),
        2,
    ),
}


@pytest.mark.parametrize("selection", [None, [1, 3]], ids=["argmax", "given"])
@pytest.mark.parametrize("model", [_vgg_like, small_resnet], ids=["vgg_like", "resnet"])
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_no_read_back_per_layer(composite, model, selection, monkeypatch):
    monkeypatch.setenv("RELPROP_BACKEND", "native")
    make, expected = COMPOSITES[composite]
    analyzer = relprop.create_analyzer("lrp", model(), composite=make())
    x = torch.randn(2, 3, 32, 32)
    analyzer.analyze(x, neuron_selection=selection)  # first call: tracing and planning may read
    counter = _ReadBackCounter()
    with counter:
        analyzer.analyze(x.clone(), neuron_selection=selection)
    assert counter.count == expected
