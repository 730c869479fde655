"""A dispatch mode that also sees the aten ops inside relprop's custom ops.

A custom op's kernel runs with the dispatch modes above it switched off, so a mode that counts or
records ops would see ``relprop::conv2d_relevance`` as one op and nothing of what it does. This
mode runs such an op's CPU kernel again with itself switched on: the ops inside are seen too.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class InsideCustomOps(TorchDispatchMode):
    """Calls :meth:`record` with every op run under it and its result, the ops inside relprop's
    custom ops included (and the custom op itself after them)."""

    def record(self, func, args, kwargs, out) -> None:
        """What to do with one op; nothing here."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "relprop" and torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(), "CPU"
        ):
            with self:
                out = func.redispatch(_CPU, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out
