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
# One parameter set per rule, the first listed: the full rule (α-β with β ≠ 0, z⁺ with its bias).
# (``dict(RULES)`` would keep the last, α-β with β = 0, which runs no second stream.)
FULL_PARAMS: dict[str, list[float]] = {}
for _rule, _params in RULES:
    FULL_PARAMS.setdefault(_rule, _params)


def _div(r: torch.Tensor, d: torch.Tensor, e: float) -> torch.Tensor:
    """``r / stab(d, e)``, ``stab(d, e) = d + e·(sign(d) + [d == 0])``; 0 where that is 0."""
    den = d + e * (torch.sign(d) + (d == 0).to(d.dtype))
    return torch.where(den == 0, torch.zeros_like(r), r / den)


def _pos(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(max=0)


def rule_reference(x, w, b, relevance, rule, params, product, transposed):
    """docs/ops.md, line by line, for any linear map given by ``product(inp, weight, bias=None)``
    and ``transposed(weight, s)``: returns (saved, input relevance)."""
    xp, xn, wp, wn = _pos(x), _neg(x), _pos(w), _neg(w)
    z = product(x, w, b)
    if rule == "epsilon":
        return [z], x * transposed(w, _div(relevance, z, params[0]))
    if rule == "wsquare":
        den = product(torch.ones_like(x), w * w, None if b is None else b * b)
        return [z], transposed(w * w, _div(relevance, den, params[0]))
    if rule == "flat":
        den = product(torch.ones_like(x), torch.ones_like(w))
        return [z], transposed(torch.ones_like(w), _div(relevance, den, params[0]))
    if rule == "zplus":
        e, use_bias = params
        bias = None if b is None else use_bias * _pos(b)
        zp = product(xp, wp, bias) + product(xn, wn)
        s = _div(relevance, zp, e)
        return [z, zp], xp * transposed(wp, s) + xn * transposed(wn, s)
    if rule == "alphabeta":
        alpha, beta, e, use_bias = params
        zp = product(xp, wp, None if b is None else use_bias * _pos(b)) + product(xn, wn)
        zn = product(xp, wn, None if b is None else use_bias * _neg(b)) + product(xn, wp)
        sp, sn = _div(relevance, zp, e), _div(relevance, zn, e)
        r_in = alpha * (xp * transposed(wp, sp) + xn * transposed(wn, sp)) - beta * (
            xp * transposed(wn, sn) + xn * transposed(wp, sn)
        )
        return [z, zp, zn], r_in
    if rule == "gamma":
        gamma, e = params
        w_up, w_down = w + gamma * wp, w + gamma * wn
        b_up = None if b is None else b + gamma * _pos(b)
        b_down = None if b is None else b + gamma * _neg(b)
        zpos = product(xp, w_up, b_up) + product(xn, w_down)
        zneg = product(xp, w_down, b_down) + product(xn, w_up)
        sp = (z > 0) * _div(relevance, zpos, e)
        sn = (z < 0) * _div(relevance, zneg, e)
        r_in = xp * (transposed(w_up, sp) + transposed(w_down, sn)) + xn * (
            transposed(w_down, sp) + transposed(w_up, sn)
        )
        return [z, zpos, zneg], r_in
    assert rule == "zbox"
    low, high, e = params
    lo, hi = torch.full_like(x, low), torch.full_like(x, high)
    zb = product(x, w) - product(lo, wp) - product(hi, wn)
    s = _div(relevance, zb, e)
    return [z, zb], x * transposed(w, s) - lo * transposed(wp, s) - hi * transposed(wn, s)


def assert_flash_close(kernel, torch_low, truth, ulps: float = 4.0) -> None:
    """|kernel − truth| ≤ 2·|torch_low − truth| + a few ulps of the scale (max norms).

    Where the plain-torch computation in the low precision is not finite (γ in float16: a
    product of an overflowed share with a zero gives NaN) it has no error to compare with there:
    its error is taken over its finite entries, and the kernel must be finite wherever the truth
    fits the dtype.
    """
    dtype = torch_low.dtype
    representable = truth.abs() <= torch.finfo(dtype).max
    kernel = kernel.double()
    assert torch.isfinite(kernel[representable]).all(), "kernel not finite where the truth is"
    kernel_error = (kernel - truth)[representable].abs().max().item()
    torch_finite = torch.isfinite(torch_low) & representable
    torch_deviation = (torch_low.double() - truth)[torch_finite].abs()
    torch_error = torch_deviation.max().item() if torch_deviation.numel() else 0.0
    scale = max(truth[representable].abs().max().item(), 1.0)
    atol = ulps * torch.finfo(dtype).eps * scale
    assert kernel_error <= 2 * torch_error + atol, (kernel_error, torch_error, atol)
