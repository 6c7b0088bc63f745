#!/usr/bin/env bash
# The main job: set up .venv, train (default: preset tiny on the Python stdlib
# sources, on CPU when there is no GPU), then print a sample from the trained model.
# Extra arguments go to `sparsetrain train`, e.g. `bash scripts/train.sh --preset nano-125m`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
run="runs/$(date +%Y%m%d-%H%M%S)"
venv=${SPARSETRAIN_VENV:-.venv}  # the one env.sh set up
"$venv/bin/sparsetrain" train --out-dir "$run" "$@"
if [ -f "$run/ckpt.pt" ]; then
  echo "--- sample from $run ---"
  "$venv/bin/sparsetrain" generate --ckpt "$run" --max-new-tokens 120
fi
