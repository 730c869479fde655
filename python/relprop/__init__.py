"""relprop: attribution for PyTorch models — LRP, Deep Taylor and the gradient family.

>>> import relprop
>>> analyzer = relprop.create_analyzer("lrp.epsilon", model, epsilon=0.1)
>>> relevance = analyzer.analyze(x)
"""

from relprop import composites, rules
from relprop._native import native_available
from relprop.analyzers import analyzer_names, create_analyzer
from relprop.errors import (
    AnalyzerInputError,
    BackendError,
    RelpropError,
    RuleMappingError,
    SoftmaxOutputError,
    TraceError,
    UnknownAnalyzerError,
    UnknownLayerNameError,
    UnsupportedLayerError,
)
from relprop.graph.trace import model_wo_softmax

__version__ = "0.1.0"

__all__ = [
    "AnalyzerInputError",
    "BackendError",
    "RelpropError",
    "RuleMappingError",
    "SoftmaxOutputError",
    "TraceError",
    "UnknownAnalyzerError",
    "UnknownLayerNameError",
    "UnsupportedLayerError",
    "__version__",
    "analyzer_names",
    "composites",
    "create_analyzer",
    "model_wo_softmax",
    "native_available",
    "rules",
]
