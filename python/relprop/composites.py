"""Composites: which rule goes to which layer — by module type, by module name, first layer.

The presets carry Zennit's names and defaults (epsilon = stabilizer = 1e-6, γ = 0.25), so a
relprop heatmap and a Zennit heatmap of the same composite are the same numbers. BatchNorms after
a dense/conv layer are always folded into it; activations pass relevance through; sums and
average pooling use the z-rule (``Norm``); max pooling is winner-takes-all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

from torch import nn

from relprop.rules import AlphaBeta, Epsilon, Flat, Gamma, Pass, Rule, ZBox, ZPlus
from relprop.rules.base import check_non_negative
from relprop.rules.zbox import Bound

Convolution = (nn.Conv1d, nn.Conv2d)
Dense = (nn.Linear,)
WeightLayer = (nn.Linear, nn.Conv1d, nn.Conv2d)

TypeMap = Sequence[tuple[Union[type, tuple[type, ...]], Union[Rule, Pass]]]


class Composite:
    """Assigns a rule to every layer with weights (and optionally ``Pass`` to custom modules).

    Parameters
    ----------
    layer_map : sequence of (type or tuple of types, rule)
        First match wins, checked with ``isinstance``.
    first_map : sequence of (type or tuple of types, rule)
        Checked before ``layer_map`` for the first layer with weights (the one the input meets).
    name_map : mapping of module path → rule, or sequence of (paths, rule)
        Checked before everything else.
    stabilizer : float
        The stabiliser of the z-rule on sums and average pooling, and of the default rule.
    default : Rule, optional
        The rule for a layer with weights no map covers; LRP-ε with ε = ``stabilizer`` if None.
    """

    def __init__(
        self,
        layer_map: TypeMap = (),
        first_map: TypeMap = (),
        name_map: Mapping[str, Any] | Sequence[tuple[Iterable[str], Any]] | None = None,
        stabilizer: float = 1e-6,
        default: Rule | None = None,
    ) -> None:
        self.layer_map = list(layer_map)
        self.first_map = list(first_map)
        self.name_map = _normalise_name_map(name_map)
        check_non_negative(type(self).__name__, stabilizer=stabilizer)
        self.stabilizer = stabilizer
        self.default = default
        for _, rule in [*self.layer_map, *self.first_map, *self.name_map.items()]:
            if not isinstance(rule, (Rule, Pass)):
                raise TypeError(
                    f"composite maps must map to a relprop rule (relprop.rules.*), got {rule!r}"
                )

    def rule_for(self, path: str, module: nn.Module, is_first: bool) -> Rule | Pass | None:
        """The rule of the module at ``path``, or None where no map applies."""
        if path in self.name_map:
            return self.name_map[path]
        if is_first:
            for types, rule in self.first_map:
                if isinstance(module, types):
                    return rule
        for types, rule in self.layer_map:
            if isinstance(module, types):
                return rule
        return None

    def rule_entry_for_unweighted(self, path: str, module: nn.Module) -> str | None:
        """The map entry that gives a rule of layers with weights to ``module`` (which has none),
        described for an error message, or None.

        A type entry matches only where it names a type that is no weight layer's base (an entry
        for ``nn.Module`` means "whatever can take it", not this module).
        """
        if isinstance(self.name_map.get(path), Rule):
            return f"name_map[{path!r}] = {self.name_map[path]!r}"
        for label, entries in (("layer_map", self.layer_map), ("first_map", self.first_map)):
            for types, rule in entries:
                if not isinstance(rule, Rule):
                    continue
                for t in types if isinstance(types, tuple) else (types,):
                    named = isinstance(module, t) and not any(issubclass(w, t) for w in WeightLayer)
                    if named:
                        return f"the {label} entry ({t.__name__}, {rule!r})"
        return None

    def default_rule(self) -> Rule:
        """The rule of layers with weights that no map covers."""
        return self.default if self.default is not None else Epsilon(epsilon=self.stabilizer)

    def leaf_types(self) -> tuple[type, ...]:
        """Module types named in the maps: the tracer keeps them whole."""
        types: list[type] = []
        for t, _ in [*self.layer_map, *self.first_map]:
            types.extend(t if isinstance(t, tuple) else (t,))
        return tuple(types)

    def leaf_names(self) -> frozenset[str]:
        """Module paths ``name_map`` maps to ``Pass``: the tracer keeps them whole, so that a
        block of one's own (whose inside relprop may not map) passes relevance through as one."""
        return frozenset(path for path, rule in self.name_map.items() if isinstance(rule, Pass))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _normalise_name_map(name_map) -> dict[str, Any]:
    if name_map is None:
        return {}
    if isinstance(name_map, Mapping):
        return dict(name_map)
    result: dict[str, Any] = {}
    for names, rule in name_map:
        for name in [names] if isinstance(names, str) else names:
            result[name] = rule
    return result


class EpsilonPlus(Composite):
    """z⁺ on convolutions, ε on dense layers (Zennit's ``EpsilonPlus``)."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, **kwargs: Any) -> None:
        layer_map = list(kwargs.pop("layer_map", [])) + [
            (Convolution, ZPlus(stabilizer=stabilizer)),
            (Dense, Epsilon(epsilon=epsilon)),
        ]
        super().__init__(layer_map=layer_map, stabilizer=stabilizer, **kwargs)


class EpsilonPlusFlat(Composite):
    """Flat on the first layer, z⁺ on convolutions, ε on dense layers (Zennit's
    ``EpsilonPlusFlat``; Kohlbrenner et al., 2020, *Towards best practice in explaining neural
    network decisions with LRP*, IJCNN)."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, **kwargs: Any) -> None:
        layer_map = list(kwargs.pop("layer_map", [])) + [
            (Convolution, ZPlus(stabilizer=stabilizer)),
            (Dense, Epsilon(epsilon=epsilon)),
        ]
        first_map = list(kwargs.pop("first_map", [])) + [(WeightLayer, Flat(stabilizer))]
        super().__init__(layer_map=layer_map, first_map=first_map, stabilizer=stabilizer, **kwargs)


class EpsilonGammaBox(Composite):
    """z^B on the first convolution, γ on convolutions, ε on dense layers (Zennit's
    ``EpsilonGammaBox``; Montavon et al., 2019). ``low``/``high``: numbers, or one value per
    input channel such as ``(1, 3, 1, 1)`` tensors for normalised images (:class:`ZBox`)."""

    def __init__(
        self,
        low: Bound = -3.0,
        high: Bound = 3.0,
        epsilon: float = 1e-6,
        gamma: float = 0.25,
        stabilizer: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        layer_map = list(kwargs.pop("layer_map", [])) + [
            (Convolution, Gamma(gamma=gamma, stabilizer=stabilizer)),
            (Dense, Epsilon(epsilon=epsilon)),
        ]
        first_map = list(kwargs.pop("first_map", [])) + [
            (Convolution, ZBox(low=low, high=high, stabilizer=stabilizer))
        ]
        super().__init__(layer_map=layer_map, first_map=first_map, stabilizer=stabilizer, **kwargs)


class EpsilonAlpha2Beta1(Composite):
    """α2β1 on convolutions, ε on dense layers (Zennit's ``EpsilonAlpha2Beta1``)."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, **kwargs: Any) -> None:
        layer_map = list(kwargs.pop("layer_map", [])) + [
            (Convolution, AlphaBeta(alpha=2.0, beta=1.0, stabilizer=stabilizer)),
            (Dense, Epsilon(epsilon=epsilon)),
        ]
        super().__init__(layer_map=layer_map, stabilizer=stabilizer, **kwargs)


class EpsilonAlpha2Beta1Flat(Composite):
    """Flat on the first layer, α2β1 on convolutions, ε on dense layers (Zennit's
    ``EpsilonAlpha2Beta1Flat``)."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, **kwargs: Any) -> None:
        layer_map = list(kwargs.pop("layer_map", [])) + [
            (Convolution, AlphaBeta(alpha=2.0, beta=1.0, stabilizer=stabilizer)),
            (Dense, Epsilon(epsilon=epsilon)),
        ]
        first_map = list(kwargs.pop("first_map", [])) + [(WeightLayer, Flat(stabilizer))]
        super().__init__(layer_map=layer_map, first_map=first_map, stabilizer=stabilizer, **kwargs)


def uniform(rule: Rule, first: Rule | None = None, stabilizer: float = 1e-6) -> Composite:
    """One rule on every layer with weights (optionally another on the first)."""
    first_map = [(WeightLayer, first)] if first is not None else []
    return Composite(layer_map=[(WeightLayer, rule)], first_map=first_map, stabilizer=stabilizer)


def by_kind(
    conv: Rule, dense: Rule, first: Rule | None = None, stabilizer: float = 1e-6
) -> Composite:
    """``conv`` on convolutions, ``dense`` on dense layers (iNNvestigate's sequential presets)."""
    first_map = [(WeightLayer, first)] if first is not None else []
    return Composite(
        layer_map=[(Convolution, conv), (Dense, dense)], first_map=first_map, stabilizer=stabilizer
    )
