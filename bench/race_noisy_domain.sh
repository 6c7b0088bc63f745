#!/usr/bin/env bash
# Regime 3 of docs/time_to_quality.md: continued pretraining on a noisy domain
# corpus, with the excess (Rho-1) score read from a reference-loss sidecar.
#
#   bash bench/race_noisy_domain.sh WORK_DIR [PHASE ...]
#
# Phases, in order (default: all); each is skipped when its output exists, so
# the same command run again continues where a killed one stopped:
#   base       the model trained from scratch on the default corpus (the Python
#              standard library), BASE_STEPS steps; its tokenizer is used by
#              every later phase
#   corpora    WORK_DIR/domain: DOMAIN_INCLUDE from SITE, capped at
#              DOMAIN_BYTES, with NOISE of its train bytes noise documents;
#              WORK_DIR/clean_ref: REF_INCLUDE from SITE without any file of
#              the domain (--disjoint-from), capped at REF_BYTES (REF_INCLUDE=""
#              builds none: for the base's own scorer, or a domain that takes
#              every file REF_INCLUDE matches)
#   reference  the base continued on clean_ref for REF_STEPS steps (Rho-1's
#              reference: a model trained on a small clean set)
#   sidecar    the reference's loss of every train token of the domain
#   filter     WORK_DIR/domain_filtered: the domain without the train documents
#              whose mean reference loss is highest, FILTER_DROP of its train
#              tokens (the static control of the excess score: an arm
#              dense_filtered:data=WORK_DIR/domain_filtered trains dense on it)
#   filtered_sidecar
#              the reference's loss of every train token of domain_filtered
#              (WORK_DIR/ref_losses_filtered.f16), for the span arm on the
#              filtered corpus; not in the default phases
#   base_sidecar, base_filter
#              the cheap scorer: the base's own loss of every domain train token
#              (no overlapping context, --context 0) and the filter by it
#              (WORK_DIR/domain_filtered_base); not in the default phases
#   small_reference, small_sidecar, small_filter
#              the small scorer: a model of SMALL_REF_ARGS trained from scratch
#              on the reference set for SMALL_REF_STEPS steps, its loss of every
#              domain train token (--context 0) and the filter by it
#              (WORK_DIR/domain_filtered_small); not in the default phases
#   random_filter
#              the filters' control: WORK_DIR/domain_filtered_random_seed<S>,
#              the domain without whole train documents taken at random (seed
#              S = RANDOM_FILTER_SEED; give each race seed its own draw),
#              FILTER_DROP of its tokens; not in the default phases
#   race       arms started from the base's weights on the domain, each
#              RACE_SECONDS of training after start-up (the arms: ARMS), into
#              RACE_DIR (default WORK_DIR/race-seed<SEED>): run it again with
#              another SEED for the next seed (another RACE_DIR for another LR
#              of the same seed), then `sparsetrain race-merge` their race.json
#
# Settings come from the environment (defaults are the protocol's; CUDA_GRAPH=0
# races without capturing the steps, as before 2026-12-06); MODEL_ARGS
# must give the same shape to every phase, since the arms start from the
# base's weights. For a CPU dry run:
#   CUDA_GRAPH=0 MODEL_ARGS="--preset tiny --device cpu" BASE_DATA_ARGS="--data-max-bytes 2000000" \
#   BASE_STEPS=20 REF_STEPS=10 RACE_SECONDS=5 DOMAIN_BYTES=4000000 REF_BYTES=4000000 \
#   bash bench/race_noisy_domain.sh /tmp/r3
# (with the small scorer's phases also SMALL_REF_ARGS="--preset tiny --device cpu --n-layer 1" SMALL_REF_STEPS=10)
set -euo pipefail
W=${1:?usage: bash bench/race_noisy_domain.sh WORK_DIR [PHASE ...]}
shift
phases=${*:-base corpora reference sidecar filter race}
source "$(dirname "$0")/script_env.sh"  # ST, SITE
PY=${PYTHON:-python}
MODEL_ARGS=${MODEL_ARGS:---preset nano-125m --n-layer 24 --d-model 1024 --n-head 16 --seq-len 2048 --batch-size 8 --compile}
BASE_DATA_ARGS=${BASE_DATA_ARGS:-}
BASE_STEPS=${BASE_STEPS:-900}
BASE_LR=${BASE_LR:-6e-4}
DOMAIN_INCLUDE=${DOMAIN_INCLUDE:-torch/*.py}
DOMAIN_BYTES=${DOMAIN_BYTES:-24000000}
NOISE=${NOISE:-0.3}
NOISE_PLACEMENT=${NOISE_PLACEMENT:-files}  # inside: regime 3b, the noise spliced into clean files
REF_INCLUDE=${REF_INCLUDE-torch/*.py}  # empty: no reference set (phases without a reference)
REF_BYTES=${REF_BYTES:-6000000}
REF_STEPS=${REF_STEPS:-300}
REF_LR=${REF_LR:-3e-4}
SEED=${SEED:-1337}
LR=${LR:-3e-4}
RACE_SECONDS=${RACE_SECONDS:-100}
FILTER_DROP=${FILTER_DROP:-0.4}
RANDOM_FILTER_SEED=${RANDOM_FILTER_SEED:-0}
SMALL_REF_ARGS=${SMALL_REF_ARGS:---preset nano-125m --n-layer 8 --d-model 512 --n-head 8 --seq-len 2048 --batch-size 8 --compile}
SMALL_REF_STEPS=${SMALL_REF_STEPS:-400}
SMALL_REF_LR=${SMALL_REF_LR:-1e-3}
RACE_DIR=${RACE_DIR:-$W/race-seed$SEED}
EXCLUDE='*/tests/*,*/test_*'
ARMS=${ARMS:-"dense: excess50:drop_ratio=0.5,collider_method=topk,collider_score=excess,reference_losses=$W/ref_losses.f16 random50:drop_ratio=0.5,collider_method=random collider50:drop_ratio=0.5,collider_method=topk,collider_score=collider"}
mkdir -p "$W"
tok="$W/base/tokenizer.json"
log() { echo "== $(date -u +%H:%M:%S) $*"; }
want() { [[ " $phases " == *" $1 "* ]]; }

if want base && [ ! -f "$W/base/done" ]; then
  log "base: $BASE_STEPS steps on the default corpus"
  # Fixed steps, not seconds: the base is the same starting point for every seed.
  $ST train $MODEL_ARGS $BASE_DATA_ARGS --out-dir "$W/base" --max-steps "$BASE_STEPS" --lr "$BASE_LR" \
    --warmup-steps 50 --eval-every "$BASE_STEPS" --eval-batches 8 --log-every 100 --seed 0
  touch "$W/base/done"
fi
if want corpora || want race; then  # a domain built with another placement is not this regime's: stop
  if [ -f "$W/domain/.corpus_manifest.json" ]; then
    built=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1])).get("noise_placement", "files"))' "$W/domain/.corpus_manifest.json")
    if [ "$built" != "$NOISE_PLACEMENT" ]; then
      echo "race_noisy_domain.sh: $W/domain was built with noise placement $built, not NOISE_PLACEMENT=$NOISE_PLACEMENT: use another WORK_DIR" >&2
      exit 2
    fi
  fi
fi
if want corpora; then
  if [ ! -f "$W/domain/.corpus_manifest.json" ]; then
    log "corpora: domain $DOMAIN_INCLUDE, noise $NOISE ($NOISE_PLACEMENT)"
    rm -rf "$W/domain"
    $ST corpus build --src "$SITE" --include "$DOMAIN_INCLUDE" --exclude "$EXCLUDE" \
      --max-bytes "$DOMAIN_BYTES" --noise-fraction "$NOISE" --noise-placement "$NOISE_PLACEMENT" --seed 0 --out "$W/domain"
  fi
  if [ -n "$REF_INCLUDE" ] && [ ! -f "$W/clean_ref/.corpus_manifest.json" ]; then
    log "corpora: reference set $REF_INCLUDE, no file of the domain"
    rm -rf "$W/clean_ref"
    $ST corpus build --src "$SITE" --include "$REF_INCLUDE" --exclude "$EXCLUDE" \
      --max-bytes "$REF_BYTES" --disjoint-from "$W/domain" --seed 0 --out "$W/clean_ref"
  fi
fi
if want reference && [ ! -f "$W/ref/done" ]; then
  log "reference: the base continued $REF_STEPS steps on the reference set"
  $ST train $MODEL_ARGS --out-dir "$W/ref" --init-from "$W/base" --data "$W/clean_ref" --tokenizer "$tok" \
    --max-steps "$REF_STEPS" --lr "$REF_LR" --warmup-steps 20 --eval-every "$REF_STEPS" --eval-batches 8 --log-every 100 --seed 0
  touch "$W/ref/done"
fi
# sidecar PHASE CKPT OUT [reference-losses flags]: a scorer's loss of every domain train token
sidecar() {
  if want "$1" && [ ! -f "$3.json" ]; then
    log "$1: $(basename "$2")'s loss of every domain train token"
    $ST reference-losses --ckpt "$2" --out "$3" $MODEL_ARGS --data "$W/domain" --tokenizer "$tok" "${@:4}"
  fi
}
# filter PHASE SIDECAR OUT: the domain without the train documents of highest mean scorer loss, FILTER_DROP of its tokens
filter() {
  if want "$1" && [ ! -f "$3/.corpus_manifest.json" ]; then
    log "$1: the domain without its hardest train documents for $(basename "$2"), $FILTER_DROP of its tokens"
    $ST corpus filter --corpus "$W/domain" --tokenizer "$tok" --reference-losses "$2" --drop "$FILTER_DROP" --out "$3"
  fi
}
sidecar sidecar "$W/ref" "$W/ref_losses.f16"
filter filter "$W/ref_losses.f16" "$W/domain_filtered"
sidecar base_sidecar "$W/base" "$W/ref_losses_base.f16" --context 0
filter base_filter "$W/ref_losses_base.f16" "$W/domain_filtered_base"
if want small_reference && [ ! -f "$W/ref_small/done" ]; then
  log "small_reference: $SMALL_REF_ARGS from scratch on the reference set, $SMALL_REF_STEPS steps"
  $ST train $SMALL_REF_ARGS --out-dir "$W/ref_small" --data "$W/clean_ref" --tokenizer "$tok" \
    --max-steps "$SMALL_REF_STEPS" --lr "$SMALL_REF_LR" --warmup-steps 50 --eval-every "$SMALL_REF_STEPS" --eval-batches 8 \
    --log-every 100 --seed 0
  touch "$W/ref_small/done"
fi
sidecar small_sidecar "$W/ref_small" "$W/ref_losses_small.f16" --context 0
filter small_filter "$W/ref_losses_small.f16" "$W/domain_filtered_small"
RANDOM_OUT="$W/domain_filtered_random_seed$RANDOM_FILTER_SEED"
if want random_filter && [ ! -f "$RANDOM_OUT/.corpus_manifest.json" ]; then
  log "random_filter: the domain without train documents taken at random (seed $RANDOM_FILTER_SEED), $FILTER_DROP of its tokens"
  $ST corpus filter --corpus "$W/domain" --tokenizer "$tok" --random-seed "$RANDOM_FILTER_SEED" --drop "$FILTER_DROP" \
    --out "$RANDOM_OUT"
fi
if want filtered_sidecar && [ ! -f "$W/ref_losses_filtered.f16.json" ]; then
  log "filtered_sidecar: the reference's loss of every train token of the filtered domain"
  $ST reference-losses --ckpt "$W/ref" --out "$W/ref_losses_filtered.f16" $MODEL_ARGS --data "$W/domain_filtered" --tokenizer "$tok"
fi
if want race; then
  log "race: seed $SEED, lr $LR, $RACE_SECONDS s per arm"
  arm_flags=()
  for a in $ARMS; do arm_flags+=(--arm "$a"); done
  graph=(); [ "${CUDA_GRAPH:-1}" = 1 ] && graph=(--cuda-graph)  # the protocol since 2026-12-06
  $ST race $MODEL_ARGS "${graph[@]}" --no-save-checkpoints --data "$W/domain" --tokenizer "$tok" --init-from "$W/base" \
    --lr "$LR" --warmup-steps 50 --eval-batches 8 --log-every 20 --seconds "$RACE_SECONDS" --seeds 1 --seed "$SEED" \
    --out-dir "$RACE_DIR" "${arm_flags[@]}"
fi
log "done: $phases"
