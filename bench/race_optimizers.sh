#!/usr/bin/env bash
# AdamW, Muon and Lion on nano-125m at equal wall-clock, two learning rates each
# (docs/optimizers.md): held-out loss against seconds and against steps. The race
# reports each arm's time and steps to AdamW's final loss (`steps_to_target`:
# Muon's goal is <= 0.8x AdamW's steps). From scratch on the default corpus.
#
#   bash bench/race_optimizers.sh OUT_DIR [extra race flags]
#
# Settings from the environment: SEED (1337), ARM_SECONDS (60 per arm), ARMS
# (not SECONDS: bash sets that itself, to the seconds since the shell started).
set -euo pipefail
OUT=${1:?usage: bash bench/race_optimizers.sh OUT_DIR [extra race flags]}
shift
ST=${SPARSETRAIN:-sparsetrain}
SEED=${SEED:-1337}
SECONDS_PER_ARM=${ARM_SECONDS:-60}
# the first arm (AdamW at the preset's lr) is the target; Lion runs at a tenth and
# a third of AdamW's lr (its sign update is larger per element), Muon's matrices at
# nanochat's 0.02 and modded-nanogpt's 0.05 with AdamW at the preset's lr elsewhere
ARMS=${ARMS:-"adamw: adamw_lr1.2e-3:lr=1.2e-3 muon:optimizer=muon muon_lr0.05:optimizer=muon,muon_lr=0.05 lion_lr6e-5:optimizer=lion,lr=6e-5 lion_lr2e-4:optimizer=lion,lr=2e-4"}
arm_flags=()
for a in $ARMS; do arm_flags+=(--arm "$a"); done
$ST race --preset nano-125m --compile --no-save-checkpoints --warmup-steps 50 --log-every 20 \
  --seconds "$SECONDS_PER_ARM" --seeds 1 --seed "$SEED" --out-dir "$OUT" "${arm_flags[@]}" "$@"
