# Sourced by test.sh and demo.sh: a virtual environment with the pinned torch, made once.
VENV="${RELPROP_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch 2.14.1 / torchvision 0.29.1 come from this machine's local wheel store; any other
# version is a multi-GB download.
"$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q scikit-build-core pybind11
