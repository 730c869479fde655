"""The two baselines every comparison needs: the input itself and random noise."""

from __future__ import annotations

import math

import torch
from torch import nn

from relprop.analyzers.base import Analyzer


class Input(Analyzer):
    """Returns the input: the 'explanation' that only looks at the data."""

    def _analyze(self, x, neuron_selection):
        return x.detach().clone()


class Random(Analyzer):
    """Gaussian noise of the input's shape: the floor any method must beat.

    Parameters
    ----------
    seed : int, optional
        Seeds the noise.
    stddev : float
        Its standard deviation (iNNvestigate's keyword; 1 by default).
    """

    def __init__(
        self,
        model: nn.Module,
        seed: int | None = None,
        stddev: float = 1.0,
        neuron_selection_mode: str = "max_activation",
    ) -> None:
        super().__init__(model, neuron_selection_mode)
        if not (math.isfinite(stddev) and stddev > 0):
            raise ValueError(f"stddev must be a finite number > 0, got {stddev!r}")
        self.seed = seed
        self.stddev = float(stddev)

    def _analyze(self, x, neuron_selection):
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(int(self.seed))
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return noise if self.stddev == 1.0 else noise * self.stddev
