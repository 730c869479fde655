"""The z⁺ rule (Deep Taylor decomposition for ReLU layers with non-negative input)."""

from __future__ import annotations

from dataclasses import dataclass

from relprop.rules.base import Rule, check_non_negative


@dataclass(frozen=True)
class ZPlus(Rule):
    """z⁺: ``R_i = Σ_j (x_i⁺w_ij⁺ + x_i⁻w_ij⁻) R_j / Σ_i (x_i⁺w_ij⁺ + x_i⁻w_ij⁻) (+ b_j⁺)``.

    Only the positive contributions count. With ``x ≥ 0`` this is the Deep Taylor rule of a ReLU
    layer: Montavon et al., 2017, *Explaining nonlinear classification decisions with deep Taylor
    decomposition*, Pattern Recognition 65. Equal to α1β0.

    Parameters
    ----------
    stabilizer : float
        Added to the denominator with its sign.
    use_bias : bool
        Keep ``b⁺`` in the denominator (Zennit does); iNNvestigate's ``z_plus`` and Deep Taylor
        drop it (``use_bias=False``).
    """

    stabilizer: float = 1e-6
    use_bias: bool = True

    def __post_init__(self) -> None:
        check_non_negative(type(self).__name__, stabilizer=self.stabilizer)

    def op(self) -> tuple[str, list[float]]:
        return "zplus", [float(self.stabilizer), 1.0 if self.use_bias else 0.0]


@dataclass(frozen=True)
class ZPlusFast(ZPlus):
    """z⁺ for layers whose input is known to be non-negative (iNNvestigate's ``z_plus_fast``).

    Same formula as :class:`ZPlus` without bias; with ``x ≥ 0`` both are equal, and relprop skips
    the ``x⁻`` terms at run time whenever the input has no negative entry.
    """

    use_bias: bool = False
