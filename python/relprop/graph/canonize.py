"""Canonizers: rewrite parameters into the form LRP rules expect, on copies.

The only one relprop needs on torchvision models is folding a BatchNorm into the dense or
convolution layer right before it: ``W' = W·γ/√(σ² + ε)``, ``b' = (b − μ)·γ/√(σ² + ε) + β``.
(iNNvestigate divides by the variance rather than the standard deviation; that is wrong.)
The user's parameters are read, never written.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from relprop.ops._layer_rules import DerivedWeights, derive_biases_together, keep_derived_weights


class FoldedParameters:
    """Weight and bias of a dense/conv layer, with the BatchNorms that follow it folded in.

    Read afresh in every pass (:meth:`forget`, called as a pass starts), then kept for the rest
    of it: a model changed between two calls is never explained with stale weights, also where
    the change leaves no trace on the parameters. A tensor's version counter moves on in-place
    writes through autograd, but not on writes through ``.data`` or a NumPy view, nor under fused
    optimizer kernels (``Adam(fused=True)``), so it cannot tell. The same holds for what the
    rules derive from the weight (``ops._layer_rules.DERIVED_WEIGHTS_MARK``), kept on the tensors
    this returns. Within a pass nothing writes a parameter (relprop runs the model's modules in
    eval mode and under ``no_grad``, and writes only tensors of its own), so the fold of the
    pass's start holds to its end without a check per use.

    A new pass writes its folded weight and derived weights into the memory of the previous
    pass's (:class:`~relprop.ops._layer_rules.DerivedWeights` says why): nothing reads them once
    a pass is over, and the folded weight is relprop's own copy (a layer without a BatchNorm
    gets a detached alias of its weight, which is never written).
    """

    def __init__(self, layer: nn.Module, batch_norms: list[nn.Module] | None = None) -> None:
        self.layer = layer
        self.batch_norms = list(batch_norms or [])
        self._value: tuple[Tensor, Tensor | None] | None = None
        # The BatchNorm's scale and shift for this pass (fold_all), until the weight is folded.
        self._pending: tuple[Tensor, Tensor] | None = None
        # The previous pass's derived weights and folded weight (None for an alias): memory the
        # next pass reuses.
        self._store: DerivedWeights | None = None
        self._folded_weight: Tensor | None = None

    def forget(self) -> None:
        """Drop the folded tensors: the next :meth:`get` reads the parameters again (and looks
        them up on the modules again: a parameter may have been replaced between passes)."""
        self._value = None
        self._pending = None

    def fold_later(self, scale: Tensor, shift: Tensor) -> None:
        """Fold the one BatchNorm's per-channel ``scale`` and ``shift`` (computed for all layers
        at once, :func:`fold_all`) into the weight when :meth:`get` first asks for it."""
        self._pending = (scale, shift)

    def keep(self, weight: Tensor, bias: Tensor | None, folded: bool) -> None:
        """Hold ``(weight, bias)`` for the rest of the pass; ``folded``: ``weight`` is relprop's
        own copy (its memory is written again by the next pass's fold)."""
        self._value = (weight, bias)
        self._folded_weight = weight if folded else None
        # The rules' derived weights (W⁺, W + γW⁺, ...) are kept on these tensors, which are
        # the analyzer's own (detached aliases or folded copies, never the user's parameters),
        # until the next pass.
        self._store = keep_derived_weights(weight, self._store)

    def weight_buffer(self, like: Tensor) -> Tensor | None:
        """The previous pass's folded weight, to fold into again, where it fits ``like``."""
        old = self._folded_weight
        if old is None or old.shape != like.shape or old.dtype != like.dtype:
            return None
        return old if old.device == like.device else None

    def get(self) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) to use, detached from autograd."""
        if self._value is None:
            if self._pending is not None:
                self._fold_pending()
            else:
                self.keep(*self._fold(), folded=bool(self.batch_norms))
        return self._value

    def _fold_pending(self) -> None:
        scale, shift = self._pending
        self._pending = None
        source = _tensor_of(self.layer, "weight")
        scale_view = scale.view((-1,) + (1,) * (source.dim() - 1))
        weight = torch.mul(source, scale_view, out=self.weight_buffer(source))
        bias = _tensor_of(self.layer, "bias")
        self.keep(weight, shift if bias is None else torch.addcmul(shift, bias, scale), True)

    def _fold(self) -> tuple[Tensor, Tensor | None]:
        weight = self.layer.weight.detach()
        bias = None if self.layer.bias is None else self.layer.bias.detach()
        for bn in self.batch_norms:
            scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
            shift = -bn.running_mean.detach() * scale
            if bn.weight is not None:
                scale = scale * bn.weight.detach()
                shift = shift * bn.weight.detach()
            if bn.bias is not None:
                shift = shift + bn.bias.detach()
            weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
            bias = shift if bias is None else bias * scale + shift
        return weight, bias


def fold_all(folds: list[FoldedParameters]) -> None:
    """Fold every layer afresh for a new pass (under ``torch.no_grad``: the pass's).

    A layer followed by one affine BatchNorm (every torchvision model's) gets its per-channel
    scale ``γ/√(σ² + ε)`` and shift ``β − μ·scale`` from a few launches shared by all such
    layers (:func:`_scales_and_shifts`), then one product for its weight (and one for its bias)
    when its step first asks for them (:meth:`FoldedParameters.get`): on a GPU that product is
    launched between the layers before it, while the device works on them, not before the first
    layer while it waits (53 products on ResNet50). Other layers fold on their own when first
    used.

    Host time counts here (on a GPU the device waits for it at the start of every analysis):
    the modules' tensors are read without ``nn.Module.__getattr__`` where they are plain
    parameters and buffers (:func:`_tensor_of`), and not detached (nothing records a graph
    under ``no_grad``).
    """
    batched: list[FoldedParameters] = []
    for fold in folds:
        fold.forget()
        if len(fold.batch_norms) == 1 and _affine(fold.batch_norms[0]):
            batched.append(fold)
    if not batched:
        return
    scales, shifts = _scales_and_shifts([f.batch_norms[0] for f in batched])
    for fold, scale, shift in zip(batched, scales, shifts):
        fold.fold_later(scale, shift)


def _scales_and_shifts(bns: list[nn.Module]) -> tuple[list[Tensor], list[Tensor]]:
    """Each affine BatchNorm's ``γ/√(σ² + ε)`` and ``β − μ·scale``, computed for all at once.

    Where they share a dtype, a device and ε (every torchvision model), the statistics are
    concatenated and each formula is one element-wise pass over all channels, then split into
    views: on the CPU a multi-tensor (``torch._foreach_*``) op runs one kernel per tensor, 0.33 ms
    per ResNet50 pass for the five, against 0.19 for this (one thread). Otherwise the
    multi-tensor ops (one launch each on CUDA). Both compute ``1/√(σ² + ε)`` as a root and a reciprocal, and the
    same roundings in the same order: bitwise the same scales.
    """
    names = ("running_var", "weight", "bias", "running_mean")
    var, gamma, beta, mean = ([_tensor_of(bn, name) for bn in bns] for name in names)
    dtype, device = var[0].dtype, var[0].get_device()  # get_device: an int, no torch.device
    uniform = len({bn.eps for bn in bns}) == 1 and all(
        t.dtype == dtype and t.get_device() == device and t.dim() == 1
        for tensors in (var, gamma, beta, mean)
        for t in tensors
    )
    if uniform:
        return _concatenated_scales_and_shifts(var, gamma, beta, mean, bns[0].eps)
    return _multi_tensor_scales_and_shifts(var, gamma, beta, mean, [bn.eps for bn in bns])


def _concatenated_scales_and_shifts(
    var: list[Tensor], gamma: list[Tensor], beta: list[Tensor], mean: list[Tensor], eps: float
) -> tuple[list[Tensor], list[Tensor]]:
    sizes = [t.shape[0] for t in var]
    scale = torch.cat(var).add_(eps).sqrt_().reciprocal_().mul_(torch.cat(gamma))
    shift = torch.addcmul(torch.cat(beta), torch.cat(mean), scale, value=-1)
    shifts = list(shift.split(sizes))
    # A shift is the folded bias of a layer without one of its own (every torchvision model's):
    # what the rules derive from the biases (b⁺, b + γb⁺, …) is then one launch for all layers.
    derive_biases_together(shift, shifts)
    return list(scale.split(sizes)), shifts


def _multi_tensor_scales_and_shifts(
    var: list[Tensor], gamma: list[Tensor], beta: list[Tensor], mean: list[Tensor], eps: list
) -> tuple[list[Tensor], list[Tensor]]:
    scales = torch._foreach_add(var, eps)
    torch._foreach_sqrt_(scales)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, gamma)
    return scales, torch._foreach_addcmul(beta, mean, scales, -1)


def _tensor_of(owner: object, name: str) -> Tensor | None:
    """``getattr(owner, name)`` for a tensor attribute, without ``nn.Module.__getattr__`` (a
    Python-level fallback that costs about a microsecond) where ``owner`` is a module and the
    tensor a plain parameter or buffer of it; a parametrized tensor
    (``torch.nn.utils.parametrize``, a property computed on access) and the weights of a
    functional layer (``plan.FunctionalParameters``) are read as attributes."""
    parameters = getattr(owner, "_parameters", None)
    if isinstance(parameters, dict):
        found = parameters.get(name, _ABSENT)
        if found is _ABSENT:
            found = owner._buffers.get(name, _ABSENT)
        if found is not _ABSENT:
            return found
    return getattr(owner, name)


_ABSENT = object()


def _affine(bn: nn.Module) -> bool:
    return can_fold(bn) and bn.affine


def can_fold(bn: nn.Module) -> bool:
    """True when ``bn`` is an eval-mode-usable BatchNorm (it tracks running statistics)."""
    return (
        isinstance(bn, nn.modules.batchnorm._BatchNorm)
        and bn.track_running_stats
        and _tensor_of(bn, "running_mean") is not None
    )
