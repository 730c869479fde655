"""The input-independent rules: flat and w²."""

from __future__ import annotations

from dataclasses import dataclass

from relprop.rules.base import Rule, check_non_negative


@dataclass(frozen=True)
class Flat(Rule):
    """Flat: ``R_i = Σ_j R_j / n_j`` — every input of the receptive field gets an equal share.

    ``n_j`` counts the inputs of output j (zero padding does not count). Lapuschkin et al., 2019,
    *Unmasking Clever Hans predictors and assessing what machines really learn*, Nat. Commun. 10.
    """

    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        check_non_negative(type(self).__name__, stabilizer=self.stabilizer)

    def op(self) -> tuple[str, list[float]]:
        return "flat", [float(self.stabilizer)]


@dataclass(frozen=True)
class WSquare(Rule):
    """w²: ``R_i = Σ_j w_ij² R_j / Σ_i w_ij²`` (Zennit adds ``b_j²`` to the denominator).

    For a first layer with unbounded real-valued input. Montavon et al., 2017, *Explaining
    nonlinear classification decisions with deep Taylor decomposition*, Pattern Recognition 65.
    """

    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        check_non_negative(type(self).__name__, stabilizer=self.stabilizer)

    def op(self) -> tuple[str, list[float]]:
        return "wsquare", [float(self.stabilizer)]
