#!/usr/bin/env bash
# One row of the training-efficiency table in models/README.md: train a variant of the shipped
# set-up for a fixed number of steps on one thread, sample 256 sentences (200 steps, seed 1) and
# score their fluency. Runs two at a time on the 2-core machines (one thread each).
#
#   models/efficiency.sh NAME STEPS [extra train flags...]
#   models/efficiency.sh base 3000 --self-condition
#
# Writes runs/efficiency/NAME/{train.log, samples.txt, fluency.txt}.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 steps=$2
shift 2
bin=${DLM_BIN:-target/release/dlm-generator}
out=runs/efficiency/$name
mkdir -p "$out"
start=$(date +%s)
"$bin" --threads 1 train --out "$out" --steps "$steps" --warmup 500 --lr 1e-3 --ema-decay 0.9995 \
    --seq-len 40 --log-every 100 --checkpoint-every 1000 --no-progress "$@" > "$out/train.log" 2>&1
end=$(date +%s)
"$bin" --threads 1 sample --model "$out" --n 256 --steps 200 --seed 1 > "$out/samples.txt" 2> "$out/sample.log"
"$bin" eval-fluency --input "$out/samples.txt" > "$out/fluency.txt" 2>&1
echo "$name steps=$steps train_s=$((end - start)) flags=$*" >> "$out/fluency.txt"
cat "$out/fluency.txt"
