"""What a rule is: how one layer hands the relevance of its output to its input."""

from __future__ import annotations

import math
from dataclasses import dataclass


def check_non_negative(owner: str, meaning: str = "", **values: float) -> None:
    """Raise ``ValueError`` naming ``owner``, the parameter and its value unless each of
    ``values`` is a finite number ≥ 0.

    A negative stabiliser pulls denominators towards zero instead of away from it (a
    denominator of −ε·sign becomes an exact zero, one of −ε/2 changes sign); a NaN or an infinity
    turns every relevance it touches into NaN. ``meaning`` says what the smallest value means.
    """
    for name, value in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(
                f"{owner} needs {name} >= 0 (a finite number{meaning}); got {name}={value!r}"
            )


@dataclass(frozen=True)
class Rule:
    """Base of the rules for layers with weights (dense and convolution layers).

    A rule names the op it runs (docs/ops.md) and the parameters it passes. ``ignore_bias``
    treats the layer as if it had no bias when redistributing (iNNvestigate's ``_IB`` variants);
    the forward pass keeps the bias.
    """

    def op(self) -> tuple[str, list[float]]:
        """The op's rule name and parameter list (docs/ops.md)."""
        raise NotImplementedError

    @property
    def ignore_bias(self) -> bool:
        return False

    def describe(self) -> str:
        """Short text for the plan table."""
        fields = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.__dict__.items()
        )
        return f"{type(self).__name__}({fields})"


@dataclass(frozen=True)
class Pass:
    """Pass the relevance through unchanged (activations, dropout, BatchNorm that cannot be folded).

    Zennit's ``Pass``; the standard choice for element-wise activations in LRP
    (Montavon et al., 2019, *Layer-Wise Relevance Propagation: An Overview*).
    """

    def describe(self) -> str:
        return "Pass"


@dataclass(frozen=True)
class Norm:
    """The z-rule for layers without weights: sums (residual additions) and average pooling.

    ``R_i = x_i · ∂/∂x_i (Σ_j R_j / stab(z_j))``: each summand gets the share it contributed
    (Zennit's ``Norm``; Bach et al., 2015, *On Pixel-Wise Explanations for Non-Linear Classifier
    Decisions by Layer-Wise Relevance Propagation*, PLoS ONE 10(7)).
    """

    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        check_non_negative("Norm", stabilizer=self.stabilizer)

    def describe(self) -> str:
        return f"Norm(stabilizer={self.stabilizer:g})"


@dataclass(frozen=True)
class WinnerTakesAll:
    """Max pooling hands all relevance of an output to the input that won the maximum.

    Equal to the gradient of max pooling (Zennit's default; Montavon et al., 2019).
    """

    def describe(self) -> str:
        return "WinnerTakesAll"
