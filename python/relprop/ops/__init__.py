"""Numeric ops of relprop, declared with ``torch.library`` (namespace ``relprop``).

Each op has a plain-PyTorch reference (the truth), a fast CPU path and a GPU kernel; see
docs/ops.md for the contract and ``_backend.py`` for how one is chosen.
"""

from relprop.ops import conv, elementwise, linear, paired_shares, pool  # noqa: F401  (registers the ops)
