"""Rules: how one layer hands the relevance of its output to its input (one family per file)."""

from relprop.rules.alpha_beta import AlphaBeta
from relprop.rules.base import Norm, Pass, Rule, WinnerTakesAll
from relprop.rules.epsilon import Epsilon, Z
from relprop.rules.flat import Flat, WSquare
from relprop.rules.gamma import Gamma
from relprop.rules.zbox import ZBox
from relprop.rules.zplus import ZPlus, ZPlusFast

__all__ = [
    "AlphaBeta",
    "Epsilon",
    "Flat",
    "Gamma",
    "Norm",
    "Pass",
    "Rule",
    "WSquare",
    "WinnerTakesAll",
    "Z",
    "ZBox",
    "ZPlus",
    "ZPlusFast",
]
