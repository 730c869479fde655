"""The bytes of tensor storage alive at once, as an allocator without a cache would hold them.

CPU has no allocator statistics to read back, and the resident set is blurred by glibc's free
lists; this mode sees every storage an op allocates (views and in-place results allocate none)
and takes it off again when it is freed, so the peak it reports is exact and device-independent:
what a GPU's allocator would hold with its cache emptied.
"""

from __future__ import annotations

import weakref

import torch
from tests.oracles.inside_ops import InsideCustomOps
from torch.utils._pytree import tree_flatten


class StorageLedger:
    """``live``: bytes of the storages :meth:`track` saw allocated and not yet freed; ``peak``:
    their maximum since the ledger began or :meth:`reset_peak`. Shared by :class:`LiveBytes`
    and ``benchmarks/traffic.py``'s counting mode."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._keys: set[int] = set()

    def reset_peak(self) -> None:
        self.peak = self.live

    def track(self, func, args, kwargs, out) -> None:
        """Adds the storages op ``func`` allocated for ``out``: not for views, in-place and
        ``out=`` results (their storage is an argument's), nor twice for one storage (a
        decomposed op's result is its last inner op's)."""
        if func.is_view:
            return
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self._keys:
                continue
            self._keys.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            # A storage keeps its Python object while it lives: this fires when it is freed.
            weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._keys.discard(key)
        self.live -= size


class LiveBytes(InsideCustomOps):
    """A :class:`StorageLedger` of every op run under the mode (``live``, ``peak``), the buffers
    inside relprop's custom ops included."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = StorageLedger()

    @property
    def live(self) -> int:
        return self.ledger.live

    @property
    def peak(self) -> int:
        return self.ledger.peak

    def reset_peak(self) -> None:
        self.ledger.reset_peak()

    def record(self, func, args, kwargs, out) -> None:
        self.ledger.track(func, args, kwargs, out)
