#!/usr/bin/env bash
# Code models trained for a fixed budget, then what they can do (docs/export_eval.md,
# docs/grpo.md): held-out loss, bits per byte and the compile rate of sampled
# continuations (`sparsetrain eval`), and training-free GRPO's held-out success
# with and without its experience library (`sparsetrain grpo --task compile`).
#
#   bash bench/code_models.sh OUT_DIR [PHASE ...]
#
# Phases (default: all), each skipped when its output exists, so the same command
# run again continues where a killed one stopped:
#   train  each of PRESETS trained from scratch for TRAIN_SECONDS of training
#          after start-up (the lr decayed on that clock) on the Python sources of
#          SITE capped at 120 MB (fresh data; the compile-rate prompts come from
#          its held-out files), into RUNS/<preset>
#   eval   OUT_DIR/eval_<preset>.json: SAMPLES continuations each
#   grpo   OUT_DIR/grpo_<preset>.json for GRPO_PRESETS, GRPO_SEEDS seeds
#
# Settings from the environment: PRESETS ("nano-125m d20"), GRPO_PRESETS
# (nano-125m), TRAIN_SECONDS (120), SAMPLES (64), EVAL_BATCH (32: windows per
# forward and prompts decoded together; another size gives the same samples up
# to the rounding of batched products), GRPO_SEEDS (3), GRPO_ARGS (the
# loop's size), RUNS (OUT_DIR/runs: checkpoints are large, so point it outside a
# folder you copy back), SITE.
set -euo pipefail
OUT=${1:?usage: bash bench/code_models.sh OUT_DIR [PHASE ...]}
shift
phases=${*:-train eval grpo}
source "$(dirname "$0")/script_env.sh"  # ST, SITE
PRESETS=${PRESETS:-nano-125m d20}
GRPO_PRESETS=${GRPO_PRESETS:-nano-125m}
TRAIN_SECONDS=${TRAIN_SECONDS:-120}
SAMPLES=${SAMPLES:-64}
EVAL_BATCH=${EVAL_BATCH:-32}
GRPO_SEEDS=${GRPO_SEEDS:-3}
GRPO_ARGS=${GRPO_ARGS:---rounds 2 --train-prompts 16 --group-size 4 --test-prompts 64}
RUNS=${RUNS:-$OUT/runs}
mkdir -p "$OUT" "$RUNS"
log() { echo "== $(date -u +%H:%M:%S) $*"; }
want() { [[ " $phases " == *" $1 "* ]]; }
for p in $PRESETS; do
  run="$RUNS/$p"
  if want train && [ ! -f "$run/done" ]; then
    log "train: $p, $TRAIN_SECONDS s"
    rm -rf "$run"
    # warmup in steps: a d20 step is a few hundred ms, so the presets' 500 would outlast the budget
    $ST train --preset "$p" --data "$SITE" --data-include '*.py' --data-exclude '*/tests/*,*/test_*' \
      --data-max-bytes 120000000 --compile --max-steps 0 --max-seconds "$TRAIN_SECONDS" --schedule-by time \
      --warmup-steps 30 --eval-every 0 --eval-batches 8 --log-every 50 --seed 0 --out-dir "$run"
    touch "$run/done"
  fi
  if want eval && [ -f "$run/done" ] && [ ! -f "$OUT/eval_$p.json" ]; then
    log "eval: $p, $SAMPLES samples"
    # 32 prompts decoded together: d20's 64 samples 8 at a time outlasted a 10-minute device call
    $ST eval --ckpt "$run" --samples "$SAMPLES" --max-tokens 1000000 --seed 0 --batch-size "$EVAL_BATCH" \
      --json "$OUT/eval_$p.json"
  fi
done
for p in $GRPO_PRESETS; do
  run="$RUNS/$p"
  # a report marked partial (a run stopped between seeds) is measured again whole
  if want grpo && [ -f "$run/done" ] && ! ${PYTHON:-python} -c 'import json, sys; sys.exit("partial" in json.load(open(sys.argv[1])))' "$OUT/grpo_$p.json" 2>/dev/null; then
    log "grpo: $p, $GRPO_SEEDS seeds"
    $ST grpo --ckpt "$run" --task compile --seeds "$GRPO_SEEDS" $GRPO_ARGS --json "$OUT/grpo_$p.json"
  fi
done
log "done: $phases"
