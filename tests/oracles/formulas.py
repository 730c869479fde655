"""The LRP rules in float64, written from the papers' formulas on explicit contributions.

Every layer with weights (and every average pooling) is an affine map ``z = Mx + b`` over the
flattened sample. :func:`dense_layer` builds ``M`` as an explicit matrix by pushing the unit basis
through the layer, so stride, padding, dilation and groups are nothing but entries of ``M``; zero
padding is simply absent (no column of ``M`` belongs to it). Each rule is then the textbook sum over
the contributions ``z_ij = x_i·m_ji`` of input ``i`` to output ``j``:

``R_i = Σ_j (q_ij / Σ_i' q_i'j) · R_j``

with the rule's own ``q_ij``. Deliberately nothing here shares code or shortcuts with relprop (no
transposed convolutions, no ``W⁺x⁺ + W⁻x⁻`` splits: the positive part of a contribution is taken
per contribution, as the papers write it).

Papers: ε and α-β: Bach et al. 2015, "On pixel-wise explanations ...", PLoS ONE. z⁺, w², zB:
Montavon et al. 2017, "Explaining nonlinear classification decisions with deep Taylor
decomposition", Pattern Recognition. γ: Montavon et al. 2019, "Layer-wise relevance propagation: an
overview" (generalised to signed inputs as in Andéol et al. 2021). Flat: Lapuschkin et al. 2019,
"Unmasking Clever Hans predictors ...", Nature Communications.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_STABILIZER = 1e-6


def stab(d: Tensor, e: float) -> Tensor:
    """``d + e·sign(d)`` with zero counted as positive (docs/ops.md, Zennit's convention)."""
    return d + e * (torch.sign(d) + (d == 0).to(d.dtype))


@dataclass
class DenseLayer:
    """A layer as the affine map ``z = matrix @ x + bias`` over flattened samples.

    ``connected[j, i]`` says whether input ``i`` is in the receptive field of output ``j`` (also
    where the weight happens to be zero); the flat rule counts exactly these.
    """

    matrix: Tensor
    bias: Tensor
    connected: Tensor
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def forward(self, x: Tensor) -> Tensor:
        """``z`` of a batch of flattened samples ``x`` of shape ``(N, in_numel)``."""
        return x @ self.matrix.T + self.bias


def _basis(in_shape: tuple[int, ...]) -> Tensor:
    n = math.prod(in_shape)
    return torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)


def _map_matrix(fn, in_shape: tuple[int, ...]) -> tuple[Tensor, tuple[int, ...]]:
    """Matrix of the linear map ``fn`` (no bias) by applying it to every unit vector."""
    basis = _basis(in_shape)
    with torch.no_grad():
        images = fn(basis)
    out_shape = tuple(images.shape[1:])
    return images.reshape(basis.shape[0], -1).T.contiguous(), out_shape


def dense_layer(module: nn.Module, in_shape: tuple[int, ...]) -> DenseLayer:
    """The :class:`DenseLayer` of a Linear, Conv1d/2d, AvgPool1d/2d or AdaptiveAvgPool1d/2d."""
    in_shape = tuple(in_shape)
    if isinstance(module, nn.Linear):
        weight = module.weight.detach().double()
        bias = (
            module.bias.detach().double()
            if module.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64)
        )
        return DenseLayer(
            weight.clone(), bias, torch.ones_like(weight, dtype=torch.bool), in_shape, bias.shape
        )
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
        weight = module.weight.detach().double()

        def apply(w: Tensor):
            return lambda t: conv(
                t,
                w,
                None,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
            )

        matrix, out_shape = _map_matrix(apply(weight), in_shape)
        connected, _ = _map_matrix(apply(torch.ones_like(weight)), in_shape)
        positions = math.prod(out_shape[1:])
        if module.bias is None:
            bias = torch.zeros(matrix.shape[0], dtype=torch.float64)
        else:
            bias = module.bias.detach().double().repeat_interleave(positions)
        return DenseLayer(matrix, bias, connected != 0, in_shape, out_shape)
    pools = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
    if isinstance(module, pools):
        matrix, out_shape = _map_matrix(module, in_shape)
        bias = torch.zeros(matrix.shape[0], dtype=torch.float64)
        return DenseLayer(matrix, bias, matrix != 0, in_shape, out_shape)
    raise TypeError(f"no dense form for {type(module).__name__}")


def contributions(layer: DenseLayer, x: Tensor) -> Tensor:
    """``z_ij = x_i·m_ji`` laid out as ``(N, out, in)``."""
    return layer.matrix.unsqueeze(0) * x.unsqueeze(1)


def _redistribute(q: Tensor, denominator: Tensor, relevance: Tensor, e: float) -> Tensor:
    """``R_i = Σ_j q_ij / stab(d_j, e) · R_j`` (``q``: ``(N, out, in)``)."""
    share = relevance / stab(denominator, e)
    return (q * share.unsqueeze(-1)).sum(dim=1)


def epsilon_rule(layer: DenseLayer, x: Tensor, relevance: Tensor, epsilon: float) -> Tensor:
    """LRP-ε (LRP-0 at ε = 0): ``q_ij = z_ij``, ``d_j = z_j = Σ_i z_ij + b_j``."""
    z_ij = contributions(layer, x)
    z = z_ij.sum(-1) + layer.bias
    return _redistribute(z_ij, z, relevance, epsilon)


def zplus_rule(
    layer: DenseLayer,
    x: Tensor,
    relevance: Tensor,
    stabilizer: float = DEFAULT_STABILIZER,
    use_bias: bool = True,
) -> Tensor:
    """z⁺: ``q_ij = (z_ij)⁺``, ``d_j = Σ_i (z_ij)⁺ (+ b_j⁺)``."""
    positive = contributions(layer, x).clamp(min=0)
    denominator = positive.sum(-1) + (layer.bias.clamp(min=0) if use_bias else 0.0)
    return _redistribute(positive, denominator, relevance, stabilizer)


def alphabeta_rule(
    layer: DenseLayer,
    x: Tensor,
    relevance: Tensor,
    alpha: float,
    beta: float,
    stabilizer: float = DEFAULT_STABILIZER,
    use_bias: bool = True,
) -> Tensor:
    """α-β: ``R_i = Σ_j (α (z_ij)⁺ / z_j⁺ − β (z_ij)⁻ / z_j⁻) R_j`` with ``b⁺`` in ``z_j⁺``, ``b⁻``
    in ``z_j⁻``."""
    z_ij = contributions(layer, x)
    positive, negative = z_ij.clamp(min=0), z_ij.clamp(max=0)
    bias_p = layer.bias.clamp(min=0) if use_bias else 0.0
    bias_n = layer.bias.clamp(max=0) if use_bias else 0.0
    activator = _redistribute(positive, positive.sum(-1) + bias_p, relevance, stabilizer)
    inhibitor = _redistribute(negative, negative.sum(-1) + bias_n, relevance, stabilizer)
    return alpha * activator - beta * inhibitor


def gamma_rule(
    layer: DenseLayer,
    x: Tensor,
    relevance: Tensor,
    gamma: float,
    stabilizer: float = DEFAULT_STABILIZER,
) -> Tensor:
    """γ: outputs with ``z_j > 0`` use ``q_ij = z_ij + γ(z_ij)⁺`` (bias ``b + γb⁺``), outputs with
    ``z_j < 0`` use ``q_ij = z_ij + γ(z_ij)⁻`` (bias ``b + γb⁻``)."""
    z_ij = contributions(layer, x)
    b = layer.bias
    z = z_ij.sum(-1) + b
    q_up = z_ij + gamma * z_ij.clamp(min=0)
    q_down = z_ij + gamma * z_ij.clamp(max=0)
    up = _redistribute(
        q_up, q_up.sum(-1) + b + gamma * b.clamp(min=0), relevance * (z > 0), stabilizer
    )
    down = _redistribute(
        q_down, q_down.sum(-1) + b + gamma * b.clamp(max=0), relevance * (z < 0), stabilizer
    )
    return up + down


def flat_rule(
    layer: DenseLayer, x: Tensor, relevance: Tensor, stabilizer: float = DEFAULT_STABILIZER
) -> Tensor:
    """Flat: every connected input gets an equal share, ``q_ij = 1`` on the receptive field."""
    q = layer.connected.to(torch.float64).unsqueeze(0).expand(x.shape[0], -1, -1)
    return _redistribute(q, q.sum(-1), relevance, stabilizer)


def wsquare_rule(
    layer: DenseLayer, x: Tensor, relevance: Tensor, stabilizer: float = DEFAULT_STABILIZER
) -> Tensor:
    """w²: ``q_ij = w_ij²``, ``d_j = Σ_i w_ij² + b_j²`` (Zennit squares the bias as well)."""
    q = (layer.matrix**2).unsqueeze(0).expand(x.shape[0], -1, -1)
    return _redistribute(q, q.sum(-1) + layer.bias**2, relevance, stabilizer)


def zbox_rule(
    layer: DenseLayer,
    x: Tensor,
    relevance: Tensor,
    low: float,
    high: float,
    stabilizer: float = DEFAULT_STABILIZER,
) -> Tensor:
    """zB: ``q_ij = x_i w_ij − l_i w_ij⁺ − h_i w_ij⁻`` with ``l_i = low``, ``h_i = high``."""
    m = layer.matrix.unsqueeze(0)
    q = x.unsqueeze(1) * m - low * m.clamp(min=0) - high * m.clamp(max=0)
    return _redistribute(q, q.sum(-1), relevance, stabilizer)


def max_pool_windows(module: nn.Module, in_shape: tuple[int, ...]) -> list[list[int]]:
    """For each output of a MaxPool1d/2d or AdaptiveMaxPool1d/2d (flattened), the flat input
    indices inside its window (padding excluded)."""
    channels, *spatial = in_shape
    one_d = len(spatial) == 1
    size = (1, spatial[0]) if one_d else tuple(spatial)

    def pair(v, fill_for_1d):
        if one_d:
            return (fill_for_1d, v if isinstance(v, int) else v[0])
        return (v, v) if isinstance(v, int) else tuple(v)

    plane = torch.arange(size[0] * size[1]).reshape(size)
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
        out = pair(module.output_size, 1)
        rows = [
            list(range(math.floor(i * size[0] / out[0]), math.ceil((i + 1) * size[0] / out[0])))
            for i in range(out[0])
        ]
        cols = [
            list(range(math.floor(i * size[1] / out[1]), math.ceil((i + 1) * size[1] / out[1])))
            for i in range(out[1])
        ]
        plane_windows = [[int(plane[r, c]) for r in rs for c in cs] for rs in rows for cs in cols]
    else:
        if module.ceil_mode:
            raise ValueError("the oracle covers ceil_mode=False only")
        kernel = pair(module.kernel_size, 1)
        stride = pair(module.stride if module.stride is not None else module.kernel_size, 1)
        padding = pair(module.padding, 0)
        dilation = pair(module.dilation, 1)
        padded = F.pad(plane.double(), (padding[1], padding[1], padding[0], padding[0]), value=-1.0)
        rows_out = (padded.shape[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        cols_out = (padded.shape[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        plane_windows = []
        for r in range(rows_out):
            for c in range(cols_out):
                members = [
                    int(padded[r * stride[0] + a * dilation[0], c * stride[1] + b * dilation[1]])
                    for a in range(kernel[0])
                    for b in range(kernel[1])
                ]
                plane_windows.append([m for m in members if m >= 0])
    numel = size[0] * size[1]
    return [[ch * numel + i for i in window] for ch in range(channels) for window in plane_windows]


def max_pool_forward(windows: list[list[int]], x: Tensor) -> Tensor:
    """The max of every window, ``(N, out)``."""
    return torch.stack([x[:, w].amax(dim=1) for w in windows], dim=1)


def max_pool_rule(windows: list[list[int]], x: Tensor, relevance: Tensor) -> Tensor:
    """Winner takes all: each output's relevance goes to the largest input of its window."""
    result = torch.zeros_like(x)
    for j, window in enumerate(windows):
        members = torch.tensor(window)
        winners = members[x[:, members].argmax(dim=1)]
        result[torch.arange(x.shape[0]), winners] += relevance[:, j]
    return result


def apply_rule(
    name: str, params: dict[str, float], layer: DenseLayer, x: Tensor, relevance: Tensor
) -> Tensor:
    """Dispatch by rule name: epsilon, zplus, alphabeta, gamma, flat, wsquare, zbox."""
    rules = {
        "epsilon": epsilon_rule,
        "zplus": zplus_rule,
        "alphabeta": alphabeta_rule,
        "gamma": gamma_rule,
        "flat": flat_rule,
        "wsquare": wsquare_rule,
        "zbox": zbox_rule,
    }
    return rules[name](layer, x, relevance, **params)
