"""The z^B rule for bounded input."""

from __future__ import annotations

import math
from dataclasses import dataclass

from relprop.rules.base import Rule, check_non_negative


@dataclass(frozen=True)
class ZBox(Rule):
    """z^B: ``R_i = Σ_j (x_i w_ij − l_i w_ij⁺ − h_i w_ij⁻) R_j / Σ_i (x_i w_ij − l_i w_ij⁺ − h_i w_ij⁻)``.

    For the input layer when every input lies in ``[low, high]`` (pixels). Montavon et al., 2017,
    *Explaining nonlinear classification decisions with deep Taylor decomposition*, Pattern
    Recognition 65.

    Parameters
    ----------
    low, high : float
        The smallest and largest value an input can take (after normalisation).
    stabilizer : float
        Added to the denominator with its sign.
    """

    low: float = 0.0
    high: float = 1.0
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        # Infinite bounds make inf · 0 = NaN in the denominators; NaN fails every comparison.
        finite = math.isfinite(self.low) and math.isfinite(self.high)
        if not (finite and self.low < self.high):
            raise ValueError(
                f"ZBox needs finite bounds with low < high (the smallest and largest input "
                f"value), got low={self.low}, high={self.high}"
            )
        check_non_negative("ZBox", stabilizer=self.stabilizer)

    def op(self) -> tuple[str, list[float]]:
        return "zbox", [float(self.low), float(self.high), float(self.stabilizer)]
