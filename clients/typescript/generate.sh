#!/usr/bin/env bash
# Regenerates src/gen from proto/kpg/v1 (and google/rpc's Status and ErrorInfo) with the pinned ts-proto,
# as buf.gen.yaml says. Deterministic: running it twice changes nothing. Generated code is never edited.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
BUF="${BUF:-../../.tools/bin/buf}"
if [ ! -x "$BUF" ]; then
  echo "buf not found at $BUF: run 'make .tools/bin/buf' at the repository root (or set BUF)" >&2
  exit 1
fi
# node_modules/.package-lock.json is what npm ci installed; older than package-lock.json means stale.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
"$BUF" generate
