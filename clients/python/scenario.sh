#!/usr/bin/env bash
# The cross-language scenario (clients/SCENARIO.md) with the typed Python client, from any directory:
#   KPG_TARGET=127.0.0.1:50051 KPG_RUN_ID=$(date +%s) KPG_DLT_ERROR="..." clients/python/scenario.sh
set -euo pipefail
here="$(dirname "$0")"
exec "$here/../../.venv/bin/python" "$here/examples/scenario.py" "$@"
