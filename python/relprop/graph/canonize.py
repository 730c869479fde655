"""Canonizers: rewrite parameters into the form LRP rules expect, on copies.

The only one relprop needs on torchvision models is folding a BatchNorm into the dense or
convolution layer right before it: ``W' = W·γ/√(σ² + ε)``, ``b' = (b − μ)·γ/√(σ² + ε) + β``.
(iNNvestigate divides by the variance rather than the standard deviation; that is wrong.)
The user's parameters are read, never written.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from relprop.ops._layer_rules import DerivedWeights, keep_derived_weights


class FoldedParameters:
    """Weight and bias of a dense/conv layer, with the BatchNorms that follow it folded in.

    Read afresh in every pass (:meth:`forget`, called as an analysis starts), then kept for the
    rest of it: a model changed between two calls is never explained with stale weights, also
    where the change leaves no trace on the parameters. A tensor's version counter moves on
    in-place writes through autograd, but not on writes through ``.data`` or a NumPy view, nor
    under fused optimizer kernels (``Adam(fused=True)``), so it cannot tell. The same holds for
    what the rules derive from the weight (``ops._layer_rules.DERIVED_WEIGHTS_MARK``), kept on
    the tensors this returns. Within a pass, a source changed in place (its version moved) is
    folded again.

    A new pass writes its folded weight and derived weights into the memory of the previous
    pass's (:class:`~relprop.ops._layer_rules.DerivedWeights` says why): nothing reads them once
    a pass is over, and the folded weight is relprop's own copy (a layer without a BatchNorm
    gets a detached alias of its weight, which is never written).
    """

    def __init__(self, layer: nn.Module, batch_norms: list[nn.Module] | None = None) -> None:
        self.layer = layer
        self.batch_norms = list(batch_norms or [])
        self._key: tuple | None = None
        self._value: tuple[Tensor, Tensor | None] | None = None
        # The previous pass's derived weights and folded weight (None for an alias): memory the
        # next pass reuses.
        self._store: DerivedWeights | None = None
        self._folded_weight: Tensor | None = None
        # The source tensors, looked up on the modules once per pass (:meth:`forget`): every
        # layer asks for its weights twice a pass, and the module attribute lookups were a
        # third of the host time the check took.
        self._source_list: list[Tensor] | None = None

    def _sources(self) -> list[Tensor]:
        if self._source_list is None:
            tensors = [self.layer.weight]
            if self.layer.bias is not None:
                tensors.append(self.layer.bias)
            for bn in self.batch_norms:
                tensors += [
                    t
                    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)
                    if t is not None
                ]
            self._source_list = tensors
        return self._source_list

    def forget(self) -> None:
        """Drop the folded tensors: the next :meth:`get` reads the parameters again (and looks
        them up on the modules again: a parameter may have been replaced between passes)."""
        self._key = None
        self._value = None
        self._source_list = None

    def _key_now(self) -> tuple:
        return tuple(
            (t.data_ptr(), None if t.is_inference() else t._version) for t in self._sources()
        )

    def _keep(self, value: tuple[Tensor, Tensor | None], folded: bool, new_pass: bool) -> None:
        self._value = value
        self._key = self._key_now()
        self._folded_weight = value[0] if folded else None
        # The rules' derived weights (W⁺, W + γW⁺, ...) are kept on these tensors, which are
        # the analyzer's own (detached aliases or folded copies, never the user's parameters),
        # until the next fold. A refold within a pass leaves the pass's earlier ones alone.
        self._store = keep_derived_weights(value[0], self._store if new_pass else None)

    def weight_buffer(self, like: Tensor) -> Tensor | None:
        """The previous pass's folded weight, to fold into again, where it fits ``like``."""
        old = self._folded_weight
        if old is None or old.shape != like.shape or old.dtype != like.dtype:
            return None
        return old if old.device == like.device else None

    def get(self) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) to use, detached from autograd."""
        if self._value is None or self._key_now() != self._key:
            new_pass = self._value is None
            self._keep(self._fold(), folded=bool(self.batch_norms), new_pass=new_pass)
        return self._value

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
    """Fold every layer afresh for a new pass.

    A layer followed by one affine BatchNorm (every torchvision model's) gets its per-channel
    scale ``γ/√(σ² + ε)`` and shift ``β − μ·scale`` from a few multi-tensor launches shared by
    all such layers (``torch._foreach_*``), then one product for its weight (and one for its
    bias): on ResNet50 about 60 launches per pass instead of eight per layer. Other layers fold
    on their own when first used.
    """
    for fold in folds:
        fold.forget()
    batched = [f for f in folds if len(f.batch_norms) == 1 and _affine(f.batch_norms[0])]
    if not batched:
        return
    bns = [f.batch_norms[0] for f in batched]
    scales = torch._foreach_add([bn.running_var.detach() for bn in bns], [bn.eps for bn in bns])
    torch._foreach_sqrt_(scales)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, [bn.weight.detach() for bn in bns])
    shifts = torch._foreach_addcmul(
        [bn.bias.detach() for bn in bns], [bn.running_mean.detach() for bn in bns], scales, -1
    )
    for fold, scale, shift in zip(batched, scales, shifts):
        source = fold.layer.weight.detach()
        scale_view = scale.view(-1, *([1] * (source.dim() - 1)))
        weight = torch.mul(source, scale_view, out=fold.weight_buffer(source))
        bias = fold.layer.bias
        bias = shift if bias is None else torch.addcmul(shift, bias.detach(), scale)
        fold._keep((weight, bias), folded=True, new_pass=True)


def _affine(bn: nn.Module) -> bool:
    return can_fold(bn) and bn.affine


def can_fold(bn: nn.Module) -> bool:
    """True when ``bn`` is an eval-mode-usable BatchNorm (it tracks running statistics)."""
    return (
        isinstance(bn, nn.modules.batchnorm._BatchNorm)
        and bn.track_running_stats
        and bn.running_mean is not None
    )
