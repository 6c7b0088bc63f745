#!/usr/bin/env bash
# The d20-e3-full preset against plain d20 at equal wall-clock (issue: the full E3
# preset): the same shape with MTP, Collider top-k drop 0.5, the async loader and
# Muon on at once, against none of them. From scratch on fresh data (the Python
# sources of SITE capped at 120 MB, as regime 1 of docs/time_to_quality.md), the
# lr decayed on each arm's own clock; the race reports throughput (ms per step,
# tokens forwarded and back-propagated) and held-out loss against seconds. Warmup
# is 30 steps, not the presets' 500: a d20 step takes a few hundred ms, so 100 s
# is a few hundred steps.
#
#   bash bench/race_e3.sh OUT_DIR [extra race flags]
#
# Settings from the environment: SEED (1337), ARM_SECONDS (100 per arm), SITE,
# ARMS (an arm is an override list: a race keeps one preset, so d20-e3-full's
# additions to d20 are spelled out; tests/test_presets.py holds them equal).
# Which addition costs the loss: each of E3 less one, in the same folder (a race
# run again with more arms is refused, so use a new OUT_DIR with d20 first), e.g.
#   ARMS="d20: no_mtp:optimizer=muon,use_collider=true,collider_sparsity=0.5,collider_method=topk,use_async_loader=true
#         no_collider:optimizer=muon,use_mtp=true,use_async_loader=true
#         no_muon:use_mtp=true,use_collider=true,collider_sparsity=0.5,collider_method=topk,use_async_loader=true"
set -euo pipefail
OUT=${1:?usage: bash bench/race_e3.sh OUT_DIR [extra race flags]}
shift
source "$(dirname "$0")/script_env.sh"  # ST, SITE
SEED=${SEED:-1337}
SECONDS_PER_ARM=${ARM_SECONDS:-100}
E3="optimizer=muon,use_mtp=true,use_collider=true,collider_sparsity=0.5,collider_method=topk,use_async_loader=true"
ARMS=${ARMS:-"d20: d20-e3-full:$E3"}
arm_flags=()
for a in $ARMS; do arm_flags+=(--arm "$a"); done
$ST race --preset d20 --data "$SITE" --data-include '*.py' --data-exclude '*/tests/*,*/test_*' --data-max-bytes 120000000 \
  --compile --no-save-checkpoints --warmup-steps 30 --eval-batches 8 --log-every 20 \
  --seconds "$SECONDS_PER_ARM" --seeds 1 --seed "$SEED" --out-dir "$OUT" "${arm_flags[@]}" "$@"
