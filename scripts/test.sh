#!/usr/bin/env bash
# Set up .venv and run the test suite (CPU; GPU-only tests skip without CUDA).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k resume`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
venv=${SPARSETRAIN_VENV:-.venv}  # the one env.sh set up
"$venv/bin/python" -m pytest -q "$@"
