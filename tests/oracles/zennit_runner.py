"""Zennit attributions started from the same output relevance as relprop's analyzers.

relprop's LRP starts from the selected output's value (Deep Taylor: ``max(0, y)``) at the selected
neuron and zero elsewhere; with Zennit that is ``attributor(x, one_hot * output)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite, NameLayerMapComposite
from zennit.core import Composite
from zennit.layer import Sum
from zennit.rules import Norm, Pass
from zennit.types import Activation, AvgPool, BatchNorm
from zennit.types import Linear as ZennitLinear


def base_layer_map(stabilizer: float = 1e-6) -> list:
    """Zennit's map for the layers without weights, as relprop treats them: activations pass
    relevance through, sums and average pools use the z-rule (Zennit's ``Norm``)."""
    return [
        (Activation, Pass()),
        (Sum, Norm(stabilizer=stabilizer)),
        (AvgPool, Norm(stabilizer=stabilizer)),
        (BatchNorm, Pass()),
    ]


def every_layer(rule, canonizers: Sequence | None = None) -> Composite:
    """A Zennit composite applying ``rule`` to every dense and convolutional layer."""
    return LayerMapComposite(
        layer_map=base_layer_map() + [(ZennitLinear, rule)], canonizers=canonizers
    )


def by_name_and_type(
    name_map: list, layer_map: list, canonizers: Sequence | None = None
) -> Composite:
    """Zennit's name-then-type composite with relprop's treatment of layers without weights."""
    return NameLayerMapComposite(
        name_map=name_map, layer_map=layer_map + base_layer_map(), canonizers=canonizers
    )


def start_relevance(output: Tensor, selection: Tensor, start: str) -> Tensor:
    """``one_hot(selection) * value`` with value the output (``"value"``), its positive part
    (``"positive"``) or one (``"one"``); ``"all"``: every output's value (selection ignored)."""
    if start == "all":
        return output.clone()
    one_hot = torch.zeros_like(output)
    one_hot[torch.arange(output.shape[0]), selection] = 1
    if start == "value":
        return one_hot * output
    if start == "positive":
        return one_hot * output.clamp(min=0)
    if start == "one":
        return one_hot
    raise ValueError(start)


def zennit_attribution(
    model: nn.Module,
    x: Tensor,
    composite: Composite | None,
    selection: Sequence[int] | Tensor | None = None,
    start: str = "value",
) -> Tensor:
    """Zennit's relevance of ``x`` for the selected outputs (default: the max per sample).

    Runs on a deep copy, so Zennit's canonizers never touch the model relprop analyses.
    """
    model = copy.deepcopy(model).eval()
    x = x.detach().clone().requires_grad_(True)

    def attr_output(output: Tensor) -> Tensor:
        index = output.argmax(dim=1) if selection is None else torch.as_tensor(selection)
        return start_relevance(output, index, start)

    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x, attr_output)
    return relevance.detach()
