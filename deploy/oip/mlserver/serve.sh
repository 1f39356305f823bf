#!/usr/bin/env bash
# Serves a dlm guide on Seldon MLServer (OIP gRPC on GRPC_PORT): serve.sh MODEL.onnx NAME GRPC_PORT HTTP_PORT
# The model folder is made in a temporary directory: model-settings.json pointing at MODEL.onnx.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model="$(realpath "$1")"; name="$2"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
mkdir -p "$work/$name"
cp "$here/runtime.py" "$work/$name/"
cat > "$work/$name/model-settings.json" <<JSON
{"name": "$name", "implementation": "runtime.OnnxGuide", "parameters": {"uri": "$model"}}
JSON
export MLSERVER_GRPC_PORT="$3" MLSERVER_HTTP_PORT="$4" MLSERVER_METRICS_ENDPOINT="" MLSERVER_PARALLEL_WORKERS=0
cd "$work/$name"
exec "${MLSERVER:-mlserver}" start "$work"
