"""The two baselines every comparison needs: the input itself and random noise."""

from __future__ import annotations

import torch
from torch import nn

from relprop.analyzers.base import Analyzer


class Input(Analyzer):
    """Returns the input: the 'explanation' that only looks at the data."""

    def _analyze(self, x, neuron_selection):
        return x.detach().clone()


class Random(Analyzer):
    """Standard-normal noise of the input's shape: the floor any method must beat.

    Parameters
    ----------
    seed : int, optional
        Seeds the noise.
    """

    def __init__(
        self,
        model: nn.Module,
        seed: int | None = None,
        neuron_selection_mode: str = "max_activation",
    ) -> None:
        super().__init__(model, neuron_selection_mode)
        self.seed = seed

    def _analyze(self, x, neuron_selection):
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(int(self.seed))
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
