"""``python -m relprop …`` runs the ``relprop`` command line."""

from __future__ import annotations

import sys

from relprop.cli import main

if __name__ == "__main__":
    sys.exit(main())
