#!/usr/bin/env bash
# Regime 1 of docs/time_to_quality.md: from scratch on the default corpus (the
# running interpreter's standard library, about one epoch in the budget), M320, 100 s of
# training per arm after start-up, one seed per call.
#
#   bash bench/race_from_scratch.sh OUT_DIR [extra race flags]
#
# Settings from the environment (defaults are the protocol's): SEED, LR,
# ARMS (space-separated --arm values). A second run of the same command resumes
# the race (finished arms are skipped).
set -euo pipefail
OUT=${1:?usage: bash bench/race_from_scratch.sh OUT_DIR [extra race flags]}
shift
ST=${SPARSETRAIN:-sparsetrain}
SEED=${SEED:-1337}
LR=${LR:-6e-4}
ARMS=${ARMS:-"dense: collider50:drop_ratio=0.5,collider_method=topk,collider_score=collider,selection_warmup_steps=200 random50:drop_ratio=0.5,collider_method=random"}
arm_flags=()
for a in $ARMS; do arm_flags+=(--arm "$a"); done
$ST race --preset nano-125m --n-layer 24 --d-model 1024 --n-head 16 --seq-len 2048 --batch-size 8 --compile \
  --no-save-checkpoints --lr "$LR" --warmup-steps 50 --eval-batches 8 --log-every 20 --seconds 100 \
  --seeds 1 --seed "$SEED" --out-dir "$OUT" "${arm_flags[@]}" "$@"
