#!/usr/bin/env bash
# The main job on one machine: build, start a guide and the generator with the default models on
# loopback, wait until both are ready, send a demo request, print the texts, stop both cleanly.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/setup.sh
cargo build --release --quiet
guide_port=${DLM_GUIDE_PORT:-18101}
gen_port=${DLM_PORT:-18100}
http_port=${DLM_HTTP_PORT:-18102}
wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
target/release/dlm-guide serve --model-repository models/guides --port "$guide_port" --metrics-port 0 &
guide=$!
gen=""
trap 'kill -TERM $gen $guide 2>/dev/null || true; wait 2>/dev/null || true' EXIT
wait_port "$guide_port"
target/release/dlm-generator serve --model models/e2e-deep --port "$gen_port" --http-port "$http_port" --metrics-port 0 \
    --guide "e2e-semantic=http://127.0.0.1:$guide_port" --guide "e2e-names=http://127.0.0.1:$guide_port/e2e-names" \
    --guide "e2e-pos=http://127.0.0.1:$guide_port/e2e-pos" --guide "e2e-spans=http://127.0.0.1:$guide_port/e2e-spans" &
gen=$!
# The guided requests run the control preset (estimate space, the satisfaction gate, best of 4);
# the last of them shows the default guidance, four candidates cheaper, on the same two fields.
preset=(--guidance-space estimate --satisfied-prob 0.9 --best-of 4)
echo "--- 3 texts steered to food=Italian, area=riverside, the control preset (seed 1):"
target/release/dlm-generator generate --endpoint "http://127.0.0.1:$gen_port" --wait-s 120 \
    --control food=Italian --control area=riverside --n 3 --seed 1 "${preset[@]}"
echo "--- 3 texts steered to eatType=pub (guide e2e-semantic), near=The Sorrento (guide e2e-names), the control preset (seed 1):"
target/release/dlm-generator generate --endpoint "http://127.0.0.1:$gen_port" \
    --control eatType=pub --control "near=The Sorrento" --n 3 --seed 1 "${preset[@]}"
echo "--- the same under the default guidance (latent space, one candidate) (seed 1):"
target/release/dlm-generator generate --endpoint "http://127.0.0.1:$gen_port" \
    --control eatType=pub --control "near=The Sorrento" --n 3 --seed 1
echo "--- 3 texts of exactly 10 words, no control (seed 1):"
target/release/dlm-generator generate --endpoint "http://127.0.0.1:$gen_port" --n 3 --seed 1 --length 10
# Tags are a whole-sequence constraint: the tag setting pulls harder towards the model's own
# proposal and leaves the last 40 steps to it (README, POS control that reads).
echo "--- 3 texts steered to the tags DT NN VBZ DT JJ NN IN DT NN NN . (guide e2e-pos), the tag setting (seed 1):"
target/release/dlm-generator generate --endpoint "http://127.0.0.1:$gen_port" --n 3 --seed 1 \
    --pos "DT NN VBZ DT JJ NN IN DT NN NN ." --fluency-weight 0.2 --best-of 4 --guide-until 40
