#!/usr/bin/env bash
# Regimes 1 and 2 of docs/time_to_quality.md's protocol: M320, 100 s of training
# per arm after start-up, one seed per call (regime 3 is bench/race_noisy_domain.sh).
#   1  from scratch on fresh data: the site-packages Python sources capped at
#      120 MB (no token read twice in the budget; until 2026-12-06 the
#      interpreter's standard library, which on the GPU image is read ~7 times)
#   2  repeated data: the site-packages Python sources capped at 24 MB (read
#      about three times in the budget)
#
#   bash bench/race_protocol.sh REGIME OUT_DIR [extra race flags]
#
# Settings from the environment (defaults are the protocol's): SEED, LR, SITE
# (the source folder), ARMS (space-separated --arm values), CUDA_GRAPH (1: every
# arm's step captured in a CUDA graph, the protocol since 2026-12-06; 0: not). A second run
# of the same command resumes the race (finished arms are skipped).
set -euo pipefail
REGIME=${1:?usage: bash bench/race_protocol.sh REGIME OUT_DIR [extra race flags]}
OUT=${2:?usage: bash bench/race_protocol.sh REGIME OUT_DIR [extra race flags]}
shift 2
source "$(dirname "$0")/script_env.sh"  # ST, SITE
case "$REGIME" in
  1) data=(--data "$SITE" --data-include '*.py' --data-exclude '*/tests/*,*/test_*' --data-max-bytes 120000000) ;;
  2) data=(--data "$SITE" --data-include '*.py' --data-exclude '*/tests/*,*/test_*' --data-max-bytes 24000000) ;;
  *) echo "regime must be 1 or 2 (regime 3: bench/race_noisy_domain.sh), got $REGIME" >&2; exit 2 ;;
esac
SEED=${SEED:-1337}
LR=${LR:-6e-4}
ARMS=${ARMS:-"dense: collider50:drop_ratio=0.5,collider_method=topk,collider_score=collider,selection_warmup_steps=200 random50:drop_ratio=0.5,collider_method=random"}
graph=(); [ "${CUDA_GRAPH:-1}" = 1 ] && graph=(--cuda-graph)
arm_flags=()
for a in $ARMS; do arm_flags+=(--arm "$a"); done
$ST race --preset nano-125m --n-layer 24 --d-model 1024 --n-head 16 --seq-len 2048 --batch-size 8 --compile "${graph[@]}" \
  --no-save-checkpoints "${data[@]}" --lr "$LR" --warmup-steps 50 --eval-batches 8 --log-every 20 --seconds 100 \
  --seeds 1 --seed "$SEED" --out-dir "$OUT" "${arm_flags[@]}" "$@"
