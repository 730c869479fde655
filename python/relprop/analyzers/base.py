"""What every analyzer shares: input checks, neuron selection, and leaving the model as it was."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Union

import numpy as np
import torch
from torch import Tensor, nn

from relprop.errors import AnalyzerInputError
from relprop.graph.trace import OneWalk

NeuronSelection = Union[int, Sequence[int], Tensor, None]
SELECTION_MODES = ("max_activation", "index", "all")


class Analyzer:
    """Base of all analyzers: ``analyze(x, neuron_selection)`` → relevance shaped like ``x``.

    Parameters
    ----------
    model : nn.Module
        The model to explain. It ends in logits (no softmax) and is never modified: parameters,
        hooks and train/eval mode are as they were after ``analyze`` returns or raises. It is run
        in eval mode during the analysis. Calls from several threads are safe: the analyses of
        one model run one at a time (:func:`model_lock`), those of different models (a copy
        per GPU, say) side by side.
    neuron_selection_mode : {"max_activation", "index", "all"}
        Which output to explain: the largest per sample, the one given to ``analyze``, or all.
    """

    def __init__(self, model: nn.Module, neuron_selection_mode: str = "max_activation") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if neuron_selection_mode not in SELECTION_MODES:
            raise AnalyzerInputError(
                f"neuron_selection_mode={neuron_selection_mode!r} is not one of "
                f"{', '.join(SELECTION_MODES)}"
            )
        self.model = model
        self.neuron_selection_mode = neuron_selection_mode

    # -- public ---------------------------------------------------------------------------

    def analyze(self, x: Tensor, neuron_selection: NeuronSelection = None) -> Tensor:
        """Relevance of every input element for the selected output neuron(s).

        Parameters
        ----------
        x : Tensor
            A batch of inputs, on the model's device and of its dtype.
        neuron_selection : int, sequence of int or Tensor, optional
            With ``neuron_selection_mode="index"``: one output index for all samples or one per
            sample. Given with ``"max_activation"`` it is used as an index too.

        Returns
        -------
        Tensor
            Same shape, dtype and device as ``x``.
        """
        self._check_input(x)
        if self.neuron_selection_mode == "index" and neuron_selection is None:
            raise AnalyzerInputError(
                "neuron_selection_mode='index' needs neuron_selection: analyze(x, "
                "neuron_selection=3) or one index per sample"
            )
        if self.neuron_selection_mode == "all" and neuron_selection is not None:
            raise AnalyzerInputError(
                "neuron_selection_mode='all' explains all outputs; drop neuron_selection or "
                "create the analyzer with neuron_selection_mode='index'"
            )
        with preserved_state(self.model), deterministic_cudnn(x.is_cuda):
            # Relevance is data, not part of the caller's graph: x ⊙ ∇ and (x − x̄) ⊙ ∫∇ would
            # otherwise come back attached to x (requires_grad, .numpy() refused, graph kept).
            return self._analyze(x.detach(), neuron_selection)

    def _analyze(self, x: Tensor, neuron_selection: NeuronSelection) -> Tensor:
        raise NotImplementedError

    # -- shared helpers ----------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise AnalyzerInputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise AnalyzerInputError(
                f"x has shape {tuple(x.shape)}; it needs a batch dimension first, e.g. "
                "x.unsqueeze(0) for a single sample"
            )
        if x.shape[0] == 0:
            raise AnalyzerInputError("x is an empty batch (shape[0] == 0)")
        if not x.is_floating_point():
            raise AnalyzerInputError(
                f"x has dtype {x.dtype}; analyzers need a floating-point input, e.g. x.float()"
            )
        param = next(iter(self.model.parameters()), None)
        if param is not None:
            if param.device != x.device:
                raise AnalyzerInputError(
                    f"x is on {x.device} but the model's parameters are on {param.device}; move "
                    f"one of them, e.g. x.to({str(param.device)!r})"
                )
            if param.dtype != x.dtype:
                raise AnalyzerInputError(
                    f"x has dtype {x.dtype} but the model's parameters are {param.dtype}; "
                    f"convert one of them, e.g. x.to({param.dtype})"
                )
        if not bool(torch.isfinite(x).all()):
            bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
            raise AnalyzerInputError(
                f"x contains {bad} values; relevance of a non-finite input is undefined. Clean "
                "the input (e.g. torch.nan_to_num) before analyzing"
            )

    def _run_model(self, fn, x: Tensor):
        """Run ``fn(x)`` and turn a shape error of the model into an :class:`AnalyzerInputError`."""
        try:
            return fn(x)
        except RuntimeError as err:
            message = str(err).split("\n")[0]
            raise AnalyzerInputError(
                f"the model failed on an input of shape {tuple(x.shape)}: {message}"
            ) from err

    def _selection_mask(
        self, output: Tensor, neuron_selection: NeuronSelection, batch_size: int
    ) -> Tensor:
        """A 0/1 mask shaped like ``output`` marking the selected neurons of each sample."""
        if output.dim() == 0 or output.shape[0] != batch_size:
            # A scalar (loss-like .sum() or .mean()) or an output reduced over the batch: no
            # output belongs to one sample, so there is nothing per sample to explain.
            raise AnalyzerInputError(
                f"the model returns a tensor of shape {tuple(output.shape)} for a batch of "
                f"{batch_size}; an attribution target needs one output row per sample (the "
                "batch dimension first, e.g. logits of shape (N, classes)). Return the "
                "per-sample outputs, e.g. .sum(dim=1) instead of .sum(), or wrap the model so "
                "that forward keeps the batch dimension"
            )
        flat = output.reshape(output.shape[0], -1)
        n, k = flat.shape
        if self.neuron_selection_mode == "all":
            return torch.ones_like(output)
        if neuron_selection is None:
            index = flat.argmax(dim=1)
        else:
            index = _to_device_async(_selection_index(neuron_selection, n, k), output.device)
        # A scatter, not `mask[arange(n), index] = 1`: on CUDA that index_put checks its indices
        # on the host and so waits for the forward to finish, leaving the GPU idle while the
        # host launches the relevance pass (ResNet50's ε call was host-bound that way).
        mask = torch.zeros_like(flat)
        mask.scatter_(1, index.view(n, 1), 1)
        return mask.reshape(output.shape)


def _is_integer(value: object) -> bool:
    """A Python or NumPy integer, not a bool (``True`` is an int to Python, not an index)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _selection_index(selection: NeuronSelection, n: int, k: int) -> Tensor:
    """The selected output of each sample, checked against ``n`` samples and ``k`` outputs, as
    a CPU int64 tensor."""
    expected = (
        "neuron_selection must be an int, a sequence of ints or an integer tensor/array (one "
        "index per sample)"
    )
    if isinstance(selection, np.ndarray):
        if selection.dtype.kind not in "iu" or selection.ndim > 1:
            raise AnalyzerInputError(
                f"{expected}; got an array of dtype {selection.dtype} and shape {selection.shape}"
            )
        selection = int(selection) if selection.ndim == 0 else selection.tolist()
    if _is_integer(selection):
        values = [int(selection)] * n
    elif isinstance(selection, Tensor):
        if selection.is_floating_point() or selection.is_complex() or selection.dtype == torch.bool:
            raise AnalyzerInputError(f"{expected}; got a tensor of dtype {selection.dtype}")
        if selection.dim() > 1:
            raise AnalyzerInputError(
                f"{expected}; got a tensor of shape {tuple(selection.shape)}, expected ({n},)"
            )
        values = [int(selection)] * n if selection.dim() == 0 else selection.tolist()
    elif (
        isinstance(selection, Sequence)
        and not isinstance(selection, (str, bytes))
        and all(_is_integer(v) for v in selection)
    ):
        values = [int(v) for v in selection]
    else:
        # Floats (2.7 would be truncated), bools, strings ('2' would be read as digits).
        raise AnalyzerInputError(f"{expected}; got {selection!r}")
    if len(values) != n:
        raise AnalyzerInputError(
            f"neuron_selection has {len(values)} indices but the batch has {n} samples; give one "
            "index per sample or a single int for all"
        )
    bad = [v for v in values if not -k <= v < k]
    if bad:
        raise AnalyzerInputError(
            f"neuron_selection index {bad[0]} is out of range: the model has {k} outputs "
            f"(valid 0..{k - 1})"
        )
    return torch.tensor([v % k for v in values], dtype=torch.int64)


def _to_device_async(index: Tensor, device: torch.device) -> Tensor:
    """``index`` on ``device`` without waiting for the work queued there: from pinned memory a
    host-to-GPU copy is queued like a kernel, where a pageable one waits for the stream."""
    if device.type != "cuda":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)


@contextmanager
def deterministic_cudnn(active: bool):
    """Let cuDNN choose only deterministic algorithms for the duration, then restore the flag.

    Two analyses of the same input must give bitwise-equal relevance; some of cuDNN's
    backward-data algorithms (taken for the transposed products of the native CUDA path, e.g.
    for ResNet's 3-channel 7×7 stem) accumulate with atomics in varying order.
    ``RELPROP_DETERMINISTIC=0`` leaves cuDNN's flag as the caller set it: the fastest algorithms,
    at the price of run-to-run differences in the last bits.

    The flag is global to the process, while analyses of different models may overlap in
    threads: the first to enter saves the caller's value and the last to leave restores it
    (each restoring what it found would leave the flag set by whichever thread entered second).
    """
    if not active or not deterministic_requested():
        yield
        return
    global _cudnn_users, _cudnn_caller_flag
    with _cudnn_guard:
        if _cudnn_users == 0:
            _cudnn_caller_flag = torch.backends.cudnn.deterministic
        _cudnn_users += 1
        torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        with _cudnn_guard:
            _cudnn_users -= 1
            if _cudnn_users == 0:
                torch.backends.cudnn.deterministic = _cudnn_caller_flag


_cudnn_guard = threading.Lock()
_cudnn_users = 0
_cudnn_caller_flag = False


def deterministic_requested() -> bool:
    """False when ``RELPROP_DETERMINISTIC`` is ``0``/``false``/``no``/``off``; True otherwise."""
    value = os.environ.get("RELPROP_DETERMINISTIC", "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("", "1", "true", "yes", "on"):
        return True
    raise ValueError(
        f"RELPROP_DETERMINISTIC={value!r} is not a switch; set it to 0 (cuDNN's fastest "
        "algorithms) or 1 (bitwise-reproducible analyses, the default), or unset it"
    )


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that lets one relprop call at a time work on ``model``, shared by every analyzer
    of it and held for as long as :func:`preserved_state`.

    An analysis switches the model's train/eval flags and an LRP analyzer keeps its pass's
    state (the folded weights it writes into again on the next pass) on its program: two
    threads analysing with one analyzer mixed each other's folds (wrong numbers, or a fold
    found empty), and two restoring the flags could leave the model in eval mode. Re-entrant, so
    an analysis that runs another of the same model in its thread does not wait on itself; kept
    as long as the model lives (a weak key).
    """
    with _model_locks_guard:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = threading.RLock()
        return lock


_model_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_model_locks_guard = threading.Lock()


@contextmanager
def preserved_state(model: nn.Module):
    """Hold the model's lock (:func:`model_lock`), run the model in eval mode and restore every
    module's train/eval flag afterwards."""
    with model_lock(model), OneWalk(model) as walk:
        modes = [(m, m.training) for _, m in walk]
        if not any(training for _, training in modes):
            # Already in eval mode (the usual case): nothing to switch or restore, which spares
            # two passes of nn.Module.__setattr__ over every module per analysis.
            yield
            return
        model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training
