"""Small seeded networks for the analyzer tests.

Every builder seeds its own generator, so a test's numbers depend on nothing but its arguments.
Submodules have names (``conv1``, ``fc2``, ...) so that plans, name maps and error messages can be
checked by name, and each module is used once (Captum's LRP requires it).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn


def seeded_normal(shape: tuple[int, ...], seed: int, dtype=torch.float64) -> Tensor:
    """Standard normal values from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def seeded_uniform(
    shape: tuple[int, ...], seed: int, low: float, high: float, dtype=torch.float64
) -> Tensor:
    """Uniform values in ``[low, high)`` from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)).to(
        dtype
    )


class SmallCNN(nn.Module):
    """conv → ReLU → max-pool → conv → ReLU → (avg-pool) → flatten → linear → ReLU → linear.

    Input ``(N, 3, 8, 8)``, 5 classes.
    """

    def __init__(self, bias: bool = True, avg_pool: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=bias)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(2) if avg_pool else nn.MaxPool2d(2)
        self.fc1 = nn.Linear(12 * 2 * 2, 16, bias=bias)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(16, 5, bias=bias)
        if bias:
            # Default init gives tiny biases; larger ones make "bias on" really matter.
            with torch.no_grad():
                for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
                    layer.bias.normal_(0.0, 0.3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu3(self.fc1(x)))


class SmallCNN1d(nn.Module):
    """Conv1d net with stride, padding, dilation and groups; input ``(N, 5, 123)``, 4 classes."""

    def __init__(self, bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv1d(5, 6, 5, stride=2, padding=1, dilation=2, bias=bias)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool1d(3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(6, 8, 3, groups=2, bias=bias)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AvgPool1d(2)
        self.fc = nn.Linear(8 * 14, 4, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def pooled_vgg(dtype=torch.float32) -> nn.Sequential:
    """A small VGG: three max pools, each over a convolution's ReLU output (the second
    convolution's input is a ReLU's too), the last pool's relevance reaching it formed through a
    flattening and a dense layer; input ``(N, 3, 16, 16)``, 5 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 2 * 2, 5),
    ).eval().to(dtype)  # fmt: skip


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    """conv → ReLU → max-pool → strided conv → ReLU → adaptive avg-pool → flatten → linear: one
    layer of each kind a backend implements; input ``(N, 3, 8..9, 7..8)``, 7 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(5, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 7),
    ).eval()


def bn_sequential(seed: int = 0) -> nn.Sequential:
    """VGG-style ``Sequential`` with BatchNorm after each conv/linear (random statistics);
    input ``(N, 3, 8, 8)``, 5 classes."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )
    randomize_batchnorm(model, seed)
    return model.eval()


def small_resnet(seed: int = 0) -> nn.Module:
    """torchvision's ResNet with one BasicBlock per stage (random BatchNorm statistics), so that
    Zennit's ``ResNetCanonizer`` applies; input ``(N, 3, 32, 32)``, 5 classes."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5
    )
    randomize_batchnorm(model, seed)
    return model.eval()


def randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding is tested
    (torchvision initialises them to the identity map).

    ``eps`` is set to 1e-12 (the variances stay ≥ 0.5): Zennit's canonizer folds a BatchNorm and
    leaves it in place as "identity" with variance 1, which still divides by ``√(1 + eps)`` — a
    Zennit artefact of 5e-6 per BatchNorm at the default eps that would swamp the comparison, and
    5e-13 at this one. Not 0: torch 2.11's ``F.batch_norm`` refuses eps = 0 even in eval mode.
    """
    generator = torch.Generator().manual_seed(seed + 1000)

    def draw(n: int, low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.eps = 1e-12
                module.running_mean.copy_(draw(n, -0.3, 0.3))
                module.running_var.copy_(draw(n, 0.5, 2.0))
                module.weight.copy_(draw(n, 0.5, 1.5))
                module.bias.copy_(draw(n, -0.2, 0.2))


class DenseReLU(nn.Module):
    """Three dense layers with ReLUs and wide fan-in, so every neuron of the bias-free variant has
    positive and negative contributions (α-β and z⁺ conserve exactly); input ``(N, 24)``."""

    def __init__(self, bias: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(24, 32, bias=bias)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(32, 16, bias=bias)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(16, 6, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


class SplitShuffleCNN(nn.Module):
    """Every way to split a tensor into parts, with the parts recombined: ``chunk`` (ShuffleNet's
    two branches), a channel shuffle (view, transpose, view), ``torch.split`` with sizes,
    ``torch.tensor_split`` along the height (halves swapped), ``unbind`` (two channels stacked
    back in reverse). Parts and indices are all taken by constant index. ReLU convs with biases;
    input ``(N, 3, 6, 6)``, 4 classes."""

    def __init__(self, bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.conv3 = nn.Conv2d(5, 5, 1, bias=bias)
        self.fc1 = nn.Linear(10 * 6 * 6, 12, bias=bias)
        self.fc2 = nn.Linear(12, 4, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        kept, branch = x.chunk(2, dim=1)
        x = torch.cat((kept, torch.relu(self.conv2(branch))), dim=1)
        n, c, h, w = x.size()
        x = torch.transpose(x.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, c, h, w)
        first, rest = torch.split(x, [3, 5], dim=1)
        x = torch.cat([first, torch.relu(self.conv3(rest))], dim=1)
        top, bottom = torch.tensor_split(x, 2, dim=2)
        x = torch.cat([bottom, top], dim=2)
        one, two = x[:, :2].unbind(1)
        x = torch.cat([x, torch.stack([two, one], dim=1)], dim=1)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def layer_norm_sigma_fixed(
    x: Tensor, dims: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """LayerNorm over the last ``dims`` dims with ``σ`` detached from autograd: its gradient is
    the LN-rule's Jacobian (the oracle side of ``LayerNormNet(sigma_fixed=True)``)."""
    axes = tuple(range(-dims, 0))
    centred = x - x.mean(dim=axes, keepdim=True)
    sigma = torch.sqrt(x.var(dim=axes, unbiased=False, keepdim=True) + eps).detach()
    out = centred / sigma
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


class LayerNormNet(nn.Module):
    """ConvNeXt's two LayerNorms in a ReLU net: a functional one over the channels of an NHWC
    view (torchvision's ``LayerNorm2d``: permute, ``F.layer_norm``, permute) and an
    ``nn.LayerNorm`` over a dense layer's features. With ``sigma_fixed`` both are computed by
    :func:`layer_norm_sigma_fixed` instead (same values, σ detached). Input ``(N, 3, 5, 5)``,
    4 classes."""

    def __init__(self, bias: bool = True, sigma_fixed: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.sigma_fixed = sigma_fixed
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.norm2d_weight = nn.Parameter(1.0 + 0.5 * torch.randn(6))
        self.norm2d_bias = nn.Parameter(0.3 * torch.randn(6)) if bias else None
        self.fc1 = nn.Linear(6 * 5 * 5, 10, bias=bias)
        self.norm = nn.LayerNorm(10, bias=bias)
        with torch.no_grad():
            self.norm.weight.normal_(1.0, 0.5)
            if bias:
                self.norm.bias.normal_(0.0, 0.3)
        self.fc2 = nn.Linear(10, 4, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)
        if self.sigma_fixed:
            x = layer_norm_sigma_fixed(x, 1, self.norm2d_weight, self.norm2d_bias, 1e-6)
        else:
            x = F.layer_norm(x, (6,), self.norm2d_weight, self.norm2d_bias, 1e-6)
        x = torch.relu(x.permute(0, 3, 1, 2))
        x = self.fc1(torch.flatten(x, 1))
        if self.sigma_fixed:
            x = layer_norm_sigma_fixed(x, 1, self.norm.weight, self.norm.bias, self.norm.eps)
        else:
            x = self.norm(x)
        return self.fc2(torch.relu(x))


def group_norm_sigma_fixed(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """GroupNorm with each group's ``σ`` detached from autograd (the oracle side of
    ``GroupNormNet(sigma_fixed=True)``)."""
    rows = x.reshape(x.shape[0], groups, -1)
    centred = rows - rows.mean(dim=-1, keepdim=True)
    sigma = torch.sqrt(rows.var(dim=-1, unbiased=False, keepdim=True) + eps).detach()
    out = (centred / sigma).reshape(x.shape)
    shape = (1, -1, *([1] * (x.dim() - 2)))
    if weight is not None:
        out = out * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


class GroupNormNet(nn.Module):
    """An ``nn.GroupNorm`` (3 groups of 2 channels) after a conv, a functional
    ``F.group_norm`` with one channel per group after another and (``instance_norm``) an affine
    ``nn.InstanceNorm2d`` after a third, in a ReLU net. With ``sigma_fixed`` all three are
    :func:`group_norm_sigma_fixed` (same values, σ detached). Input ``(N, 3, 5, 5)``, 4
    classes."""

    def __init__(
        self,
        bias: bool = True,
        sigma_fixed: bool = False,
        instance_norm: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.sigma_fixed, self.instance_norm = sigma_fixed, instance_norm
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.norm1 = nn.GroupNorm(3, 6, affine=True)
        with torch.no_grad():
            self.norm1.weight.normal_(1.0, 0.5)
            self.norm1.bias.normal_(0.0, 0.3) if bias else self.norm1.bias.zero_()
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, bias=bias)
        self.norm2_weight = nn.Parameter(1.0 + 0.5 * torch.randn(4))
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.norm3 = nn.InstanceNorm2d(4, affine=True)
        with torch.no_grad():
            self.norm3.weight.normal_(1.0, 0.5)
            self.norm3.bias.normal_(0.0, 0.3) if bias else self.norm3.bias.zero_()
        self.fc = nn.Linear(4 * 5 * 5, 4, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if self.sigma_fixed:
            x = group_norm_sigma_fixed(x, 3, self.norm1.weight, self.norm1.bias, self.norm1.eps)
        else:
            x = self.norm1(x)
        x = self.conv2(torch.relu(x))
        if self.sigma_fixed:
            x = group_norm_sigma_fixed(x, 4, self.norm2_weight, None, 1e-5)
        else:
            x = F.group_norm(x, 4, self.norm2_weight, None, 1e-5)
        if not self.instance_norm:
            return self.fc(torch.flatten(torch.relu(x), 1))
        x = self.conv3(torch.relu(x))
        if self.sigma_fixed:
            x = group_norm_sigma_fixed(x, 4, self.norm3.weight, self.norm3.bias, self.norm3.eps)
        else:
            x = self.norm3(x)
        return self.fc(torch.flatten(torch.relu(x), 1))


class _IdentityRuleGradient(torch.autograd.Function):
    """``fn(x)`` whose gradient is ``fn(x) / x``: gradient × input then hands an element-wise
    activation's output relevance to its input unchanged (the identity rule, as ``Pass``)."""

    @staticmethod
    def forward(ctx, x: Tensor, fn) -> Tensor:
        out = fn(x)
        ctx.save_for_backward(out / x)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


class TinyViT(nn.Module):
    """A one-block vision transformer: 2×2 patches of a ``(N, 3, 6, 6)`` image as 9 tokens of
    width 8 after a class token, pre-norm attention (``nn.MultiheadAttention``, or q/k/v
    projections into ``F.scaled_dot_product_attention`` with ``sdpa``) and a GELU MLP with
    residuals, a final LayerNorm and a head on the class token; 4 classes.

    ``oracle`` builds the same net for gradient × input under the rules relprop applies: each
    LayerNorm's σ detached, the attention weights held fixed (query and key detached), and the
    GELU's gradient the identity rule's.
    """

    def __init__(self, sdpa: bool = False, oracle: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.sdpa, self.oracle = sdpa, oracle
        self.patches = nn.Conv2d(3, 8, 2, stride=2)
        self.class_token = nn.Parameter(torch.randn(1, 1, 8))
        self.ln_1, self.ln_2, self.ln = nn.LayerNorm(8), nn.LayerNorm(8), nn.LayerNorm(8)
        if sdpa:
            self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        else:
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp_1, self.gelu, self.mlp_2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            for norm in (self.ln_1, self.ln_2, self.ln):
                norm.weight.normal_(1.0, 0.3)
                norm.bias.normal_(0.0, 0.2)

    def _norm(self, norm: nn.LayerNorm, x: Tensor) -> Tensor:
        if self.oracle:
            return layer_norm_sigma_fixed(x, 1, norm.weight, norm.bias, norm.eps)
        return norm(x)

    def _attend(self, h: Tensor) -> Tensor:
        if self.sdpa:
            n, t, _ = h.shape
            q, k, v = (p(h).view(n, t, 2, 4).transpose(1, 2) for p in (self.query, self.key,
                                                                       self.value))  # fmt: skip
            if self.oracle:
                q, k = q.detach(), k.detach()
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, 8)
        if self.oracle:
            return self.attention(h.detach(), h.detach(), h, need_weights=False)[0]
        out, _ = self.attention(h, h, h, need_weights=False)
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = self.patches(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self._attend(self._norm(self.ln_1, x))
        h = self.mlp_1(self._norm(self.ln_2, x))
        h = _IdentityRuleGradient.apply(h, F.gelu) if self.oracle else self.gelu(h)
        x = x + self.mlp_2(h)
        return self.head(self._norm(self.ln, x)[:, 0])


class FunctionalCNN(nn.Module):
    """A CNN written with ``F.conv2d``, ``F.conv1d`` and ``F.linear`` on its own parameters (a
    BatchNorm module after the first convolution, a strided grouped second one, a 1-D one over
    the rows), and :meth:`as_modules`, the same network built of ``nn`` modules. Input
    ``(N, 4, 8, 8)``, 5 classes."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.w1, self.b1 = nn.Parameter(0.3 * torch.randn(6, 4, 3, 3)), nn.Parameter(torch.randn(6))
        self.bn = nn.BatchNorm2d(6)
        self.w2 = nn.Parameter(0.3 * torch.randn(8, 3, 3, 3))
        self.w3, self.b3 = (
            nn.Parameter(0.3 * torch.randn(4, 8 * 4, 3)),
            nn.Parameter(torch.randn(4)),
        )
        self.w4, self.b4 = nn.Parameter(0.3 * torch.randn(5, 4 * 4)), nn.Parameter(torch.randn(5))
        randomize_batchnorm(self, seed)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(F.conv2d(x, self.w1, self.b1, padding=1)))
        x = torch.relu(F.conv2d(x, self.w2, None, stride=2, padding=1, groups=2))
        x = torch.relu(F.conv1d(x.flatten(1, 2), self.w3, self.b3, padding=1))
        return F.linear(x.flatten(1), self.w4, self.b4)

    def as_modules(self) -> nn.Sequential:
        """The same network of ``nn`` modules, sharing nothing (its own parameter copies)."""
        dtype = self.w1.dtype  # built in it, so that the copies below are exact
        conv1 = nn.Conv2d(4, 6, 3, padding=1, dtype=dtype)
        conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2, bias=False, dtype=dtype)
        conv3 = nn.Conv1d(32, 4, 3, padding=1, dtype=dtype)
        fc = nn.Linear(16, 5, dtype=dtype)
        with torch.no_grad():
            for layer, weight, bias in ((conv1, self.w1, self.b1), (conv2, self.w2, None),
                                        (conv3, self.w3, self.b3), (fc, self.w4, self.b4)):  # fmt: skip
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
        bn = copy.deepcopy(self.bn)
        return nn.Sequential(
            conv1, bn, nn.ReLU(), conv2, nn.ReLU(), nn.Flatten(1, 2), conv3, nn.ReLU(),
            nn.Flatten(), fc,
        )  # fmt: skip
