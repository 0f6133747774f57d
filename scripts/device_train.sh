#!/usr/bin/env bash
# One prepared GPU training round in one device call of at most 10 minutes. Carry .whl
# (bash ../shared/device/wheels.sh accelerate==1.15.0 psutil: app.train needs accelerate, which needs psutil)
# and .data (python -m app.train --pack-to .data/train ...; the validation photos copied to .data/val).
# Use: bash scripts/device_train.sh MINUTES [extra app.train args...], e.g. 9 --resume checkpoints/cdc
#  1. times the training step in each configuration of CONFIGS, one JSON line each (about 20 s each);
#  2. trains with the λ set LAMBDAS for MINUTES, cut to what fits before DEADLINE (about 4.5 minutes
#     with tuning, 7 without), in the fastest configuration that ran, with the learning rate scaled by
#     √(batch/32) and a 9,600-crop warm-up; if that run fails (a CUDA-only feature, divergence), the SAFE
#     configuration trains the time left, from the failed run's last complete save if it made one;
#  3. with TUNE=1 re-tunes the decode defaults on .data/val (about 2.5 minutes of the round; by default the
#     CPU does it afterwards, where minutes are cheap: python -m app.tune ... --apply), times the codec, and
#     returns everything as one file, $OUT/cdc.tar (written after training, rewritten after tuning):
#     tar -xf cdc.tar -C runs/ gives runs/cdc with log.jsonl (and tune.json with TUNE=1); everything the
#     round prints (the throughput lines first) also comes back whole as $OUT/round.log.
# Environment, with defaults:
#   LAMBDAS=""  λ per level in compressai's convention (λ·255²·MSE + bpp); empty: the resumed checkpoint's set
#       (training_state.json; a set stored in the first checkpoints' convention is converted)
#   STAGE=joint  app.train's --stage (compressor, denoiser or joint)
#   CONFIGS="32; 32 --fused-adam --channels-last; 128 --fused-adam --channels-last"  "BATCH [FLAGS]; ...";
#       with --compile the compile time shows in train_warmup_s, and training pays it again
#   SAFE="32"  BATCH [FLAGS] of the fallback      DEADLINE=570  seconds after the start, for a 600 s call
#   TUNE=0  TUNE_ARGS=""  extra app.tune arguments      DEVICE=cuda      BENCH_TIMEOUT=60  seconds per bench
set -uo pipefail
minutes=$1; shift
exec > >(tee "${OUT:?the device call sets OUT}/round.log") 2>&1  # the call's reply keeps only the tail
t0=$SECONDS
lambdas=${LAMBDAS:-}
configs=${CONFIGS:-32; 32 --fused-adam --channels-last; 128 --fused-adam --channels-last}
safe=${SAFE:-32}
deadline=${DEADLINE:-570} device=${DEVICE:-cuda} tune=${TUNE:-0} bench_timeout=${BENCH_TIMEOUT:-60}
source scripts/device_site.sh
export PYTHONUNBUFFERED=1
python3 -c "import app.train, app.bench" || {
  echo "error: app.train does not import; build .whl with: bash ../shared/device/wheels.sh accelerate==1.15.0 psutil"; exit 1; }
work=runs/device
rm -rf "$work" && mkdir -p "$work"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

bench() {  # SECONDS ARGS...: app.bench's JSON line, or why there is none (and a failure status)
  local limit=$1 status; shift
  timeout "$limit" python3 -m app.bench --device "$device" --json "$@" >"$work/bench.out" 2>"$work/bench.err"
  status=$?
  if [ "$status" = 0 ]; then tail -1 "$work/bench.out"; return 0; fi
  echo "app.bench $* failed: exit $status$([ "$status" = 124 ] && echo ", over $limit s")"
  grep -v -i warn "$work/bench.err" | tail -3
  return 1
}

# 1. the training step in each configuration; the fastest one that ran trains
best="" best_rate=0
IFS=';' read -ra candidates <<<"$configs"
for config in "${candidates[@]}"; do
  read -r batch flags <<<"$config"
  if line=$(bench "$bench_timeout" --train --train-batch "$batch" --train-warmup 5 --train-steps 10 $flags); then
    rate=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["train_crops_per_s"])' "$line")
    if awk -v a="$rate" -v b="$best_rate" 'BEGIN { exit !(a > b) }'; then best="$batch${flags:+ $flags}" best_rate=$rate; fi
  fi
  echo "$line"
done
best=${best:-$safe}

# 2. train; on failure the safe configuration trains the time left
train() {  # SECONDS BATCH [FLAGS...] [app.train args...]
  local seconds=$1 batch=$2; shift 2
  timeout $((seconds + 120)) python3 -m app.train --data .data/train --val .data/val --val-count 2 --out "$work/cdc" \
    --device "$device" --stage "${STAGE:-joint}" --crop 256 --val-every-minutes 4 --save-every-minutes 3 ${lambdas:+--lambdas $lambdas} \
    --max-minutes "$(awk -v s="$seconds" 'BEGIN { print s / 60 }')" --batch-size "$batch" \
    --lr-scaling sqrt --warmup-crops 9600 "$@" 2>&1 | grep -v -i warn
  return "${PIPESTATUS[0]}"
}
reserve=$(( (tune == 1 ? 150 : 0) + 40 + 10 ))  # tuning, timing the codec, packing
seconds=$(( deadline - (SECONDS - t0) - reserve ))
wanted=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 }')
seconds=$(( seconds < wanted ? seconds : wanted ))
if [ "$seconds" -lt 60 ]; then echo "error: $seconds s left to train before the ${deadline} s deadline"; exit 1; fi
echo "training $seconds s with: batch $best (λ = ${lambdas:-from the checkpoint}); $(( SECONDS - t0 )) s since the start"
start=$SECONDS
train "$seconds" $best "$@"
status=$?
left=$(( seconds - (SECONDS - start) ))
if [ "$status" -ne 0 ] && [ "$best" != "$safe" ] && [ "$left" -ge 60 ]; then
  resume=""  # the failed run's last complete save, if it made one (runs/device/cdc: no spaces)
  [ -f "$work/cdc/training_state.json" ] && resume="--resume $work/cdc"
  echo "fallback: batch $best failed (exit $status) after $(( SECONDS - start )) s; batch $safe trains $left s ${resume:-from the given checkpoint}"
  train "$left" $safe "$@" $resume
fi
[ -d "$work/cdc" ] && tar -cf "$OUT/cdc.tar" -C "$work" cdc

# 3. re-tune, time the codec, return the round
left=$(( deadline - (SECONDS - t0) ))
if [ "$tune" = 1 ] && [ -f "$work/cdc/model_index.json" ] && [ "$left" -gt 90 ]; then
  timeout $((left - 50 < 150 ? left - 50 : 150)) python3 -m app.tune --device "$device" --checkpoint "$work/cdc" \
    --data .data/val --apply --out "$work/cdc/tune.json" ${TUNE_ARGS:-} 2>&1 | grep -v -i warn | tail -3
  tar -cf "$OUT/cdc.tar" -C "$work" cdc
fi
left=$(( deadline - (SECONDS - t0) ))
[ -f "$work/cdc/model_index.json" ] && [ "$left" -gt 20 ] && bench $((left - 10 < 40 ? left - 10 : 40)) --checkpoint "$work/cdc"
echo "round done in $(( SECONDS - t0 )) s"
ls -la "$OUT"
