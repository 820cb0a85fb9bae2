#!/usr/bin/env bash
# Runs the cross-language scenario (../SCENARIO.md) against a live gateway:
#   KPG_TARGET=host:port KPG_RUN_ID=<unique> KPG_DLT_ERROR=<seeded error> clients/typescript/scenario.sh
# Installs the locked dependencies when needed and builds first (their output goes to stderr), so that
# stdout carries only the scenario's `ok <step>` lines. Exit code 0 when every step passed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# node_modules/.package-lock.json is what npm ci installed; older than package-lock.json means stale.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund >&2
fi
npm run build >&2
exec node dist/examples/scenario.js
