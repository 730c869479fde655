"""LRP-0 and LRP-ε."""

from __future__ import annotations

from dataclasses import dataclass

from relprop.rules.base import Rule, check_non_negative


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-ε: ``R_i = x_i Σ_j w_ij R_j / (z_j + ε·sign(z_j))`` with ``z_j = Σ_i x_i w_ij + b_j``.

    ε absorbs weak or contradictory contributions; ε = 0 is LRP-0 (:class:`Z`). Bach et al., 2015,
    *On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise Relevance
    Propagation*, PLoS ONE 10(7).

    Parameters
    ----------
    epsilon : float
        Added to the denominator with its sign (zero counts as positive); ε ≥ 0.
    use_bias : bool
        False ignores the bias in the denominator (iNNvestigate's ``epsilon_IB``).
    """

    epsilon: float = 1e-6
    use_bias: bool = True

    def __post_init__(self) -> None:
        check_non_negative(
            type(self).__name__, "; 0 is LRP-0, relprop.rules.Z", epsilon=self.epsilon
        )

    def op(self) -> tuple[str, list[float]]:
        return "epsilon", [float(self.epsilon)]

    @property
    def ignore_bias(self) -> bool:
        return not self.use_bias


@dataclass(frozen=True)
class Z(Epsilon):
    """LRP-0: ``R_i = x_i Σ_j w_ij R_j / z_j`` (Bach et al., 2015); zero denominators give zero.

    On a ReLU network LRP-0 equals gradient × input.
    """

    epsilon: float = 0.0
