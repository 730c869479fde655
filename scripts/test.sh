#!/usr/bin/env bash
# The whole test suite on a fresh clone: makes .venv, installs torch, relprop (with its compiled
# module) and the oracles (Zennit, Captum), then runs pytest. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
"$PY" -m pip install -q ".[test]" mlxtend
# Tests import the installed package (python/ is not on sys.path), so a broken build fails here.
exec "$PY" -m pytest -q --strict-markers -p no:cacheprovider tests "$@"
