"""Analyzers: the LRP family, Deep Taylor, the gradient family, and the two baselines."""

from relprop.analyzers.base import Analyzer
from relprop.analyzers.baselines import Input, Random
from relprop.analyzers.gradient import (
    Deconvnet,
    Gradient,
    GuidedBackprop,
    InputTimesGradient,
    IntegratedGradients,
    SmoothGrad,
)
from relprop.analyzers.lrp import LRP, DeepTaylor
from relprop.analyzers.registry import analyzer_names, create_analyzer

__all__ = [
    "LRP",
    "Analyzer",
    "Deconvnet",
    "DeepTaylor",
    "Gradient",
    "GuidedBackprop",
    "Input",
    "InputTimesGradient",
    "IntegratedGradients",
    "Random",
    "SmoothGrad",
    "analyzer_names",
    "create_analyzer",
]
