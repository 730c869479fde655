"""The γ rule."""

from __future__ import annotations

from dataclasses import dataclass

from relprop.rules.base import Rule, check_non_negative


@dataclass(frozen=True)
class Gamma(Rule):
    """γ: ``R_i = Σ_j x_i(w_ij + γw_ij⁺) R_j / Σ_i x_i(w_ij + γw_ij⁺)`` (for ``x ≥ 0, z_j > 0``).

    Favours positive contributions by γ. Montavon et al., 2019, *Layer-Wise Relevance Propagation:
    An Overview*, in Explainable AI, LNCS 11700. relprop uses the generalised form of Andéol et
    al., 2021 (as Zennit does): neurons with ``z_j < 0`` use ``w + γw⁻``, and negative inputs take
    the opposite weight part (docs/ops.md).

    Parameters
    ----------
    gamma : float
        Weight of the added positive part, γ ≥ 0; γ = 0 is LRP-ε with ε = ``stabilizer``.
    stabilizer : float
        Added to the denominators with their sign; ≥ 0.
    """

    gamma: float = 0.25
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        # γ < 0 would favour the negative contributions and can make the denominators vanish.
        check_non_negative("Gamma", "; 0 is LRP-ε", gamma=self.gamma)
        check_non_negative("Gamma", stabilizer=self.stabilizer)

    def op(self) -> tuple[str, list[float]]:
        return "gamma", [float(self.gamma), float(self.stabilizer)]
