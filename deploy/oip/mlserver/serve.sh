#!/usr/bin/env bash
# Serves a dlm guide on Seldon MLServer (OIP gRPC on GRPC_PORT): serve.sh MODEL.onnx NAME GRPC_PORT HTTP_PORT
# The model folder is made in a temporary directory: model-settings.json pointing at MODEL.onnx.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model="$(realpath "$1")"; name="$2"
work="$(mktemp -d)"
mkdir -p "$work/$name"
cp "$here/runtime.py" "$work/$name/"
cat > "$work/$name/model-settings.json" <<JSON
{"name": "$name", "implementation": "runtime.OnnxGuide", "parameters": {"uri": "$model"}}
JSON
export MLSERVER_GRPC_PORT="$3" MLSERVER_HTTP_PORT="$4" MLSERVER_METRICS_ENDPOINT="" MLSERVER_PARALLEL_WORKERS=0
cd "$work/$name"
# Not exec: this shell stays to stop the server and remove the model folder when it is stopped
# (TERM, INT) or the server ends.
"${MLSERVER:-mlserver}" start "$work" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" || true; rm -rf "$work"' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
wait "$server"
