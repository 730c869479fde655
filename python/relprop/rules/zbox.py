"""The z^B rule for bounded input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from relprop.rules.base import Rule, check_non_negative

# A bound: one number for every input, or a tensor of one number per input channel (per feature
# of a dense layer), e.g. shape (1, 3, 1, 1) for the per-channel range of normalised images.
# typing.Union, not `|`: a module-level alias is evaluated, and Python 3.9 has no `type | type`.
Bound = Union[float, Tensor]


@dataclass(frozen=True, eq=False)
class ZBox(Rule):
    """z^B: ``R_i = Σ_j (x_i w_ij − l_i w_ij⁺ − h_i w_ij⁻) R_j / Σ_i (x_i w_ij − l_i w_ij⁺ − h_i w_ij⁻)``.

    For the input layer when every input lies in ``[low, high]`` (pixels). Montavon et al., 2017,
    *Explaining nonlinear classification decisions with deep Taylor decomposition*, Pattern
    Recognition 65.

    Per-channel bounds (normalised images: ``low = (0 − mean) / std`` per channel) are taken by
    mapping the layer's input to ``u = (x − l) / (h − l)`` in ``[0, 1]`` and its weights to
    ``W·diag(h − l)``: every term ``x_i w_ij − l_i w_ij⁺ − h_i w_ij⁻`` equals
    ``u_i w'_ij − 0·w'⁺_ij − 1·w'⁻_ij`` (since ``h − l > 0`` keeps the signs), zero padding
    included, so the layer runs the same kernels with the bounds 0 and 1
    (:meth:`unit_box`); the forward pass keeps ``x`` and ``W``.

    Parameters
    ----------
    low, high : float or Tensor
        The smallest and largest value an input can take (after normalisation): numbers, or
        tensors with one value per input channel (per feature for a dense layer) that broadcast
        against the input with the channel as their only dimension above 1, e.g. ``(1, 3, 1, 1)``
        or ``(3, 1, 1)`` for RGB images (broadcast as Zennit's ``ZBox`` broadcasts them; ``(3,)``
        would be per column). Bounds that vary within a channel are refused: a convolution
        shares its weights across positions.
    stabilizer : float
        Added to the denominator with its sign.
    """

    low: Bound = 0.0
    high: Bound = 1.0
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, Tensor):
                if not value.is_floating_point():
                    value = value.double()
                # One number in a tensor is a plain bound.
                object.__setattr__(
                    self, name, value.detach() if value.numel() > 1 else value.item()
                )
            else:
                object.__setattr__(self, name, float(value))
        low, high = torch.as_tensor(self.low), torch.as_tensor(self.high)
        try:
            gap = high.double() - low.double()
        except RuntimeError as error:
            raise ValueError(
                f"ZBox's low {tuple(low.shape)} and high {tuple(high.shape)} do not broadcast: "
                f"{error}"
            ) from None
        # Infinite bounds make inf · 0 = NaN in the denominators; NaN fails every comparison.
        finite = bool(torch.isfinite(low).all() and torch.isfinite(high).all())
        if not (finite and bool((gap > 0).all())):
            raise ValueError(
                f"ZBox needs finite bounds with low < high (the smallest and largest input "
                f"value), got low={self.low}, high={self.high}"
            )
        check_non_negative("ZBox", stabilizer=self.stabilizer)

    # Equality by value: a tensor bound compares element-wise (the generated __eq__ would ask
    # a multi-element tensor for its truth value).
    def _key(self) -> tuple:
        def value(bound: Bound) -> object:
            if isinstance(bound, Tensor):
                return (tuple(bound.shape), tuple(bound.reshape(-1).tolist()))
            return bound

        return (value(self.low), value(self.high), self.stabilizer)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self), self._key()))

    @property
    def per_channel(self) -> bool:
        """Whether a bound is a tensor of one value per input channel."""
        return isinstance(self.low, Tensor) or isinstance(self.high, Tensor)

    def unit_box(self, x: Tensor, weight: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
        """``(u, W')``: the layer input mapped to ``[0, 1]`` and the weights that keep every
        z^B term (see the class), for per-channel bounds.

        ``x`` is ``(N, C, ...)`` (a dense layer's ``(N, C)``), ``weight`` ``(O, C / groups,
        ...)``. Raises ``ValueError`` naming the shapes where a bound is not per channel.
        """
        channels = x.shape[1]
        low = self._channel_values(self.low, "low", x)
        high = self._channel_values(self.high, "high", x)
        gap = high - low
        view = (1, channels, *([1] * (x.dim() - 2)))
        u = (x - low.view(view)) / gap.view(view)
        # Input channel c of group g scales column c - g·C/g of that group's output rows.
        per_group = gap.view(groups, channels // groups)
        rows = per_group.repeat_interleave(weight.shape[0] // groups, dim=0)
        return u, weight * rows.view(*rows.shape, *([1] * (weight.dim() - 2)))

    @staticmethod
    def _channel_values(bound: Bound, name: str, x: Tensor) -> Tensor:
        """``bound`` as one value per input channel of ``x`` (its dtype and device)."""
        channels = x.shape[1]
        if not isinstance(bound, Tensor):
            return x.new_full((channels,), bound)
        shape = tuple(bound.shape)
        # Right-aligned against x: only the channel dim (dim 1; the batch dim may be 1) may
        # exceed 1, and it must match.
        padded = (1,) * (x.dim() - len(shape)) + shape
        others = [size for dim, size in enumerate(padded) if dim != 1]
        if len(shape) > x.dim() or any(size != 1 for size in others) or padded[1] not in (
            1, channels,
        ):  # fmt: skip
            raise ValueError(
                f"ZBox's {name} has shape {shape}, which is not one value per input channel of "
                f"an input of shape {tuple(x.shape)} (it broadcasts against the input from the "
                f"right): give one number, or a tensor of shape "
                f"(1, {channels}{', 1' * (x.dim() - 2)}). Bounds that vary "
                "within a channel cannot be folded into a layer that shares its weights across "
                "positions"
            )
        return bound.to(x).reshape(-1).expand(channels)

    def op(self) -> tuple[str, list[float]]:
        if self.per_channel:
            # The layer maps its input into the unit box first (unit_box).
            return "zbox", [0.0, 1.0, float(self.stabilizer)]
        return "zbox", [float(self.low), float(self.high), float(self.stabilizer)]

    def describe(self) -> str:
        def shown(bound: Bound) -> str:
            if isinstance(bound, Tensor):
                return f"per channel {[round(v, 4) for v in bound.reshape(-1).tolist()]}"
            return f"{bound:g}"

        return (
            f"ZBox(low={shown(self.low)}, high={shown(self.high)}, stabilizer={self.stabilizer:g})"
        )
