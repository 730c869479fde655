"""Shared by the Triton kernel tests: where they can run, the rules they cover, the division."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAN_RUN = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

needs_triton = pytest.mark.skipif(not CAN_RUN, reason="needs CUDA or TRITON_INTERPRET=1")


RULES = [
    ("epsilon", [0.25]),
    ("wsquare", [1e-6]),
    ("flat", [1e-6]),
    ("zplus", [1e-6, 1.0]),
    ("zplus", [1e-6, 0.0]),
    ("alphabeta", [2.0, 1.0, 1e-6, 1.0]),
    ("alphabeta", [1.0, 0.0, 1e-6, 0.0]),
    ("gamma", [0.25, 1e-6]),
    ("zbox", [-4.0, 4.0, 1e-6]),
]
RULE_IDS = [f"{rule}{params}" for rule, params in RULES]


def _div(r: torch.Tensor, d: torch.Tensor, e: float) -> torch.Tensor:
    """``r / stab(d, e)``, ``stab(d, e) = d + e·(sign(d) + [d == 0])``; 0 where that is 0."""
    den = d + e * (torch.sign(d) + (d == 0).to(d.dtype))
    return torch.where(den == 0, torch.zeros_like(r), r / den)
