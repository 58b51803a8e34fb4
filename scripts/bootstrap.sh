#!/usr/bin/env bash
# Create or reuse .venv, install vlpeft with its extras, and reuse an installed torch.
# Never pulls CUDA wheels on a CPU machine: torch is pinned to the 2.13.0 build when it must be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv
stamp="$VENV/.vlpeft-installed"

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "bootstrap: reusing the torch installed for $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing torch==2.13.0"
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install -q -e ".[metrics,plots,logging,dev,trl,quant]"
touch "$stamp"
