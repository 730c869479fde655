"""The αβ rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from relprop.rules.base import Rule, check_non_negative


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """αβ: ``R_i = Σ_j (α z_ij⁺ / Σ_i z_ij⁺ − β z_ij⁻ / Σ_i z_ij⁻) R_j`` with α − β = 1.

    ``z_ij⁺ = x_i⁺w_ij⁺ + x_i⁻w_ij⁻`` (activating), ``z_ij⁻ = x_i⁺w_ij⁻ + x_i⁻w_ij⁺``
    (inhibiting). The bias goes where its sign belongs: ``b⁺`` to the activator's denominator,
    ``b⁻`` to the inhibitor's (iNNvestigate puts the whole bias in both, which breaks
    conservation). Bach et al., 2015, *On Pixel-Wise Explanations for Non-Linear Classifier
    Decisions by Layer-Wise Relevance Propagation*, PLoS ONE 10(7).

    Parameters
    ----------
    alpha, beta : float
        Weights of the activating and inhibiting parts; α ≥ 1, β ≥ 0, α − β = 1.
    stabilizer : float
        Added to the denominators with their sign.
    use_bias : bool
        False leaves the bias out of both denominators (iNNvestigate's ``_IB`` variants).
    """

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    use_bias: bool = True

    def __post_init__(self) -> None:
        # Written so that NaN fails too (every comparison with NaN is false).
        finite = math.isfinite(self.alpha) and math.isfinite(self.beta)
        if not (finite and self.alpha >= 0 and self.beta >= 0) or not (
            abs(self.alpha - self.beta - 1.0) <= 1e-9
        ):
            raise ValueError(
                f"AlphaBeta needs finite alpha >= 0, beta >= 0 with alpha - beta = 1 so that relevance is "
                f"conserved; got alpha={self.alpha}, beta={self.beta} (e.g. alpha=2, beta=1)"
            )
        check_non_negative("AlphaBeta", stabilizer=self.stabilizer)

    def op(self) -> tuple[str, list[float]]:
        return "alphabeta", [
            float(self.alpha),
            float(self.beta),
            float(self.stabilizer),
            1.0 if self.use_bias else 0.0,
        ]
