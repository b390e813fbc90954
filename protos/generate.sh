#!/usr/bin/env bash
# Regenerates the Python stubs of protos/ into client/minicache_client/proto/ (the SDK
# ships them; the server imports them from there). Run after editing a .proto file;
# tests/service/test_protocol_stubs.py fails when the committed stubs drift.
# Usage: bash protos/generate.sh [output root, default: client]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-client}"
python="${PYTHON:-.venv/bin/python}"
mkdir -p "$out/minicache_client/proto"
"$python" -m grpc_tools.protoc \
  -I minicache_client/proto=protos/minicache/v1 \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  minicache_client/proto/cache_service.proto minicache_client/proto/worker_service.proto
