#!/usr/bin/env bash
# Regenerates the gRPC stubs in dlm/_proto from ../../proto (committed, so that installing the
# client needs no protoc). Needs grpcio-tools==1.76.0 (protoc 31: runs on protobuf >= 6.31):
#   python -m venv /tmp/gt && /tmp/gt/bin/pip install grpcio-tools==1.76.0 && PYTHON=/tmp/gt/bin/python ./generate.sh
set -euo pipefail
cd "$(dirname "$0")"
out=dlm/_proto
rm -rf "$out" && mkdir -p "$out"
"${PYTHON:-python3}" -m grpc_tools.protoc -I ../../proto --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" dlm/v1/generator.proto dlm/v1/guide.proto
# The stubs import each other as top-level `dlm.v1…`; make them relative to this package.
find "$out" -name '*.py' -exec sed -i 's/^from dlm\.v1 import/from dlm._proto.dlm.v1 import/' {} +
touch "$out/__init__.py" "$out/dlm/__init__.py" "$out/dlm/v1/__init__.py"
