"""The oracle behind the GPU tests' whole-model comparisons (tests/oracles/winners.py): replayed
max-pool winners are the ones the analysis uses, and replaying a run's own winners changes
nothing."""

from __future__ import annotations

import torch
import torchvision
from tests.oracles.winners import Winners
from torch import nn

import relprop


def _pool_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()


def test_relevance_reaches_only_the_replayed_winners(monkeypatch):
    model = _pool_net()
    analyzer = relprop.create_analyzer("lrp.epsilon", model)
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    winners = Winners()
    with winners.recorded(monkeypatch):
        analyzer.analyze(y, neuron_selection=1)
    _, y_winners = nn.functional.max_pool2d(y, 2, return_indices=True)
    assert torch.equal(winners.indices[0], y_winners)
    with winners.replayed(monkeypatch):
        replayed = analyzer.analyze(x, neuron_selection=1)
    own = analyzer.analyze(x, neuron_selection=1)
    chosen = torch.zeros(2, 3, 64, dtype=torch.bool)
    chosen.scatter_(2, y_winners.flatten(2), True)
    # Every window's relevance sits on y's winner (the input there, times the output's share).
    assert (replayed.flatten(2)[~chosen] == 0).all()
    assert (replayed.flatten(2)[chosen] != 0).all()
    assert not torch.equal(replayed, own)
    # Outside replay the model's own winners are back.
    _, x_winners = nn.functional.max_pool2d(x, 2, return_indices=True)
    mine = torch.zeros(2, 3, 64, dtype=torch.bool).scatter_(2, x_winners.flatten(2), True)
    assert (own.flatten(2)[~mine] == 0).all()


def test_replaying_own_winners_changes_nothing(monkeypatch):
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=10).eval()
    analyzer = relprop.create_analyzer("lrp", model, composite=relprop.composites.EpsilonPlusFlat())
    x = torch.randn(1, 3, 32, 32)
    winners = Winners()
    with winners.recorded(monkeypatch):
        recorded = analyzer.analyze(x)
    assert len(winners.indices) == 5
    with winners.replayed(monkeypatch):
        replayed = analyzer.analyze(x)
    assert torch.equal(recorded, replayed)
