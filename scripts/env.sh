#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv by default). Idempotent:
# a second run only reinstalls when pyproject.toml changed.
#   PYTHON=python3.12 bash scripts/env.sh     # pick the interpreter (>= 3.10)
#   SPARSETRAIN_TORCH=torch bash scripts/env.sh   # which torch to install into a new venv
# The default torch==2.13.0 is the CPU wheel on the CI machine; on a GPU box set
# SPARSETRAIN_TORCH to the CUDA build you want (or an existing venv's torch is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
venv=${SPARSETRAIN_VENV:-.venv}
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "sparsetrain needs Python >= 3.10 ($py is older)" >&2; exit 2; }
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "installing ${SPARSETRAIN_TORCH:-torch==2.13.0} into $venv ..." >&2
  "$venv/bin/python" -m pip install -q "${SPARSETRAIN_TORCH:-torch==2.13.0}"
fi
stamp="$venv/.sparsetrain-stamp"
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing sparsetrain (editable) and its dependencies into $venv ..." >&2
  "$venv/bin/python" -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
