#!/usr/bin/env bash
# One prepared GPU training round (device tool): carry .whl (bash ../shared/device/wheels.sh) and .data
# (python -m app.train --pack-to .data/train ...; the validation photos copied to .data/val).
# Use: bash scripts/device_train.sh MINUTES [extra app.train args...]
# Prints the training throughput first, trains, re-tunes the decode defaults on .data/val (about
# 2 minutes: leave them out of MINUTES), benchmarks, and returns everything as one file, $OUT/cdc.tar
# (the device returns at most 8 files): tar -xf cdc.tar -C runs/ gives runs/cdc with log.jsonl and tune.json.
set -uo pipefail
minutes=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site PYTHONUNBUFFERED=1
work=runs/device
rm -rf "$work" && mkdir -p "$work"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 90 python3 -m app.bench --train --device cuda --json 2>&1 | grep -v -i warn | tail -1
python3 -m app.train --data .data/train --val .data/val --val-count 2 --out "$work/cdc" --max-minutes "$minutes" \
  --batch-size 32 --crop 256 --val-every-minutes 2.5 --save-every-minutes 3 "$@" 2>&1 | grep -v -i warn
timeout 180 python3 -m app.tune --device cuda --checkpoint "$work/cdc" --data .data/val --apply \
  --out "$work/cdc/tune.json" 2>&1 | grep -v -i warn | tail -3
timeout 60 python3 -m app.bench --device cuda --json --checkpoint "$work/cdc" 2>&1 | grep -v -i warn | tail -1
tar -cf "$OUT/cdc.tar" -C "$work" cdc && ls -la "$OUT"
