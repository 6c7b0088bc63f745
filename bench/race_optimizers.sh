#!/usr/bin/env bash
# AdamW, Muon and Lion on nano-125m at equal wall-clock, two learning rates each
# (docs/optimizers.md): held-out loss against seconds and against steps. The race
# reports each arm's time and steps to AdamW's final loss (`steps_to_target`:
# Muon's goal is <= 0.8x AdamW's steps). From scratch on fresh data: the Python
# sources of SITE (site-packages) capped at 120 MB, none read twice in the budget
# (on a GPU the standard library alone is read several times, and every arm's
# held-out loss then rises before the end); DATA_ARGS="" races on the default corpus.
#
#   bash bench/race_optimizers.sh OUT_DIR [extra race flags]
#
# Settings from the environment: SEED (1337), ARM_SECONDS (60 per arm), ARMS, SITE, DATA_ARGS
# (not SECONDS: bash sets that itself, to the seconds since the shell started).
# STEPS=N races at equal steps instead (Muon's goal is counted in steps): every arm
# runs N steps with its lr decayed over them, evaluated every N/20 (steps to the target
# are interpolated between evaluations); ARM_SECONDS
# (default 3600) is then only a cap.
set -euo pipefail
OUT=${1:?usage: bash bench/race_optimizers.sh OUT_DIR [extra race flags]}
shift
source "$(dirname "$0")/script_env.sh"  # ST, SITE
SEED=${SEED:-1337}
SECONDS_PER_ARM=${ARM_SECONDS:-60}
DATA_ARGS=${DATA_ARGS-"--data $SITE --data-include *.py --data-exclude */tests/*,*/test_* --data-max-bytes 120000000"}
# the first arm (AdamW at the preset's lr) is the target; each optimizer at two
# lrs, around the best of a first race on repeated data (docs/optimizers.md:
# AdamW 6e-4 over 1.2e-3, Muon's matrices 0.02 over 0.05, Lion 2e-4 over 6e-5)
ARMS=${ARMS:-"adamw: adamw_lr1.2e-3:lr=1.2e-3 muon:optimizer=muon muon_lr0.01:optimizer=muon,muon_lr=0.01 lion_lr2e-4:optimizer=lion,lr=2e-4 lion_lr4e-4:optimizer=lion,lr=4e-4"}
arm_flags=()
for a in $ARMS; do arm_flags+=(--arm "$a"); done
budget=(--seconds "$SECONDS_PER_ARM")
if [ -n "${STEPS:-}" ]; then
  budget=(--max-steps "$STEPS" --schedule-by steps --eval-every $(( STEPS >= 20 ? STEPS / 20 : 1 ))
          --seconds "${ARM_SECONDS:-3600}")
fi
set -f  # DATA_ARGS' globs go to sparsetrain as they are
$ST race --preset nano-125m $DATA_ARGS --compile --no-save-checkpoints --warmup-steps 50 --log-every 20 \
  "${budget[@]}" --seeds 1 --seed "$SEED" --out-dir "$OUT" "${arm_flags[@]}" "$@"
