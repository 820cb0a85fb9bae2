#!/usr/bin/env bash
# Regenerates every client from proto/ (the one source of truth). Generated code is never edited.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=clients/python/src
rm -rf "$OUT/kpg/v1"
mkdir -p "$OUT/kpg/v1"
"$PY" -m grpc_tools.protoc -Iproto \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  --plugin=protoc-gen-mypy=.venv/bin/protoc-gen-mypy --mypy_out="$OUT" \
  --plugin=protoc-gen-mypy_grpc=.venv/bin/protoc-gen-mypy_grpc --mypy_grpc_out="$OUT" \
  proto/kpg/v1/*.proto
printf '"""Generated from proto/kpg/v1 by scripts/gen.sh (make gen). Do not edit."""\n' > "$OUT/kpg/v1/__init__.py"
touch "$OUT/kpg/py.typed"
# The blocking client is the asyncio one, unasynced.
"$PY" scripts/unasync_client.py
# Go and TypeScript commit their generated code too (pinned plugins, run through buf); Java generates it in
# its Maven build (the protobuf Maven plugin), so there is nothing to commit there.
bash clients/go/generate.sh
bash clients/typescript/generate.sh
