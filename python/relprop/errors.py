"""The exceptions relprop raises. Each message names the problem and the way out."""

from __future__ import annotations


class RelpropError(Exception):
    """Base class of every error relprop raises on purpose."""


class UnsupportedLayerError(RelpropError):
    """A layer or operation of the model has no relevance mapping.

    The message names the module path, its type and how to map it.
    """


class SoftmaxOutputError(RelpropError, ValueError):
    """The model ends in a softmax; explain the logits instead (`relprop.model_wo_softmax`)."""


class AnalyzerInputError(RelpropError, ValueError):
    """The input or the neuron selection passed to ``analyze`` cannot be used."""


class UnknownAnalyzerError(RelpropError, ValueError):
    """``create_analyzer`` was given a name it does not know; the message lists the valid ones."""


class UnknownLayerNameError(RelpropError, ValueError):
    """A composite's ``name_map`` names no layer of the model (a typo, or a container); the
    message lists the names and the closest layer paths."""


class RuleMappingError(RelpropError, ValueError):
    """A composite gives a rule of layers with weights (ε, z⁺, α-β, γ, …) to a module without
    weights (a pooling, an activation, a BatchNorm), where it would be ignored; the message names
    the module, the map entry and the way out."""


class BackendError(RelpropError):
    """No implementation of a layer op could run (``RELPROP_BACKEND=auto`` found none that
    works for a layer's shape); the message names the layer signature and each failure."""


class TraceError(RelpropError):
    """The model could not be traced into a plan (e.g. data-dependent Python control flow)."""


def caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called here that points at the first frame
    outside relprop (the user's line), however deep relprop's own frames are on the path."""
    import sys

    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "relprop":
        level, frame = level + 1, frame.f_back
    return level
