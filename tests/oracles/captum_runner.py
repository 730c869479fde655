"""Captum attributions as oracles for relprop's gradient family and LRP-ε."""

from __future__ import annotations

import copy
from unittest import mock

import torch
from captum.attr import LRP, NoiseTunnel, Saliency
from captum.attr._utils.lrp_rules import EpsilonRule
from torch import Tensor, nn


def captum_lrp_epsilon(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    epsilon: float,
    avg_pool_epsilon: float = 1e-6,
    max_pool_epsilon: float = 1e-15,
) -> Tensor:
    """Captum's LRP with the ε-rule on every conv/linear layer.

    Captum applies its ε-rule to pooling layers too. On an average pool that is relprop's z-rule
    with the stabiliser ``avg_pool_epsilon``; on a max pool after a ReLU it is winner-takes-all up
    to a relative ``max_pool_epsilon / x``, negligible at the default.
    """
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.rule = EpsilonRule(epsilon=epsilon)
        elif isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            module.rule = EpsilonRule(epsilon=avg_pool_epsilon)
        elif isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)):
            module.rule = EpsilonRule(epsilon=max_pool_epsilon)
    return LRP(model).attribute(x.detach().clone(), target=target).detach()


def captum_smoothgrad(model: nn.Module, x: Tensor, target: Tensor, noise: Tensor) -> Tensor:
    """Captum's NoiseTunnel(Saliency, "smoothgrad", abs=False) with the given ``noise``.

    ``noise`` has shape ``(n, *x.shape)``: ``noise[k, b]`` perturbs sample ``b`` in draw ``k``.
    Captum draws its noise with one ``torch.normal`` call of shape ``(N·n, ...)`` laid out sample
    by sample (``repeat_interleave``); that call is replaced by this noise in that layout.
    """
    n = noise.shape[0]
    captum_layout = noise.transpose(0, 1).reshape(x.shape[0] * n, *x.shape[1:])

    def given_noise(mean, std, *args, **kwargs):
        assert std.shape == captum_layout.shape, "Captum's noise layout changed"
        return captum_layout.to(std.dtype)

    tunnel = NoiseTunnel(Saliency(copy.deepcopy(model).eval()))
    with mock.patch.object(torch, "normal", given_noise):
        result = tunnel.attribute(
            x.detach().clone(),
            nt_type="smoothgrad",
            nt_samples=n,
            stdevs=1.0,
            target=target,
            abs=False,
        )
    return result.detach()
