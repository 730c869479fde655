"""Canonizers: rewrite parameters into the form LRP rules expect, on copies.

The only one relprop needs on torchvision models is folding a BatchNorm into the dense or
convolution layer right before it: ``W' = W·γ/√(σ² + ε)``, ``b' = (b − μ)·γ/√(σ² + ε) + β``.
(iNNvestigate divides by the variance rather than the standard deviation; that is wrong.)
The user's parameters are read, never written.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from relprop.ops._layer_rules import keep_derived_weights


class FoldedParameters:
    """Weight and bias of a dense/conv layer, with the BatchNorms that follow it folded in.

    The folded tensors are recomputed only when a source parameter changed (its version counter
    moved), so analyzing many batches pays for the fold once, and a model trained between two
    calls is never explained with stale weights. The same holds for what the rules derive from
    the weight (``ops._layer_rules.DERIVED_WEIGHTS_MARK``).
    """

    def __init__(self, layer: nn.Module, batch_norms: list[nn.Module] | None = None) -> None:
        self.layer = layer
        self.batch_norms = list(batch_norms or [])
        self._key: tuple | None = None
        self._value: tuple[Tensor, Tensor | None] | None = None

    def _sources(self) -> list[Tensor]:
        tensors = [self.layer.weight] + ([self.layer.bias] if self.layer.bias is not None else [])
        for bn in self.batch_norms:
            tensors += [
                t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None
            ]
        return tensors

    def get(self) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) to use, detached from autograd."""
        key = tuple((t.data_ptr(), t._version) for t in self._sources())
        if key != self._key or self._value is None:
            self._value = self._fold()
            self._key = key
            # The rules' derived weights (W⁺, W + γW⁺, ...) are kept on these tensors, which
            # are the analyzer's own (detached aliases or folded copies, never the user's
            # parameters), until the next fold.
            keep_derived_weights(self._value[0])
        return self._value

    def _fold(self) -> tuple[Tensor, Tensor | None]:
        weight = self.layer.weight.detach()
        bias = None if self.layer.bias is None else self.layer.bias.detach()
        for bn in self.batch_norms:
            scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
            shift = -bn.running_mean.detach() * scale
            if bn.weight is not None:
                scale = scale * bn.weight.detach()
                shift = shift * bn.weight.detach()
            if bn.bias is not None:
                shift = shift + bn.bias.detach()
            weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
            bias = shift if bias is None else bias * scale + shift
        return weight, bias


def can_fold(bn: nn.Module) -> bool:
    """True when ``bn`` is an eval-mode-usable BatchNorm (it tracks running statistics)."""
    return (
        isinstance(bn, nn.modules.batchnorm._BatchNorm)
        and bn.track_running_stats
        and bn.running_mean is not None
    )
