#!/usr/bin/env bash
# Runs the cross-language scenario (clients/SCENARIO.md) with the Go client; needs KPG_TARGET,
# KPG_RUN_ID and KPG_DLT_ERROR. Works from any directory.
set -euo pipefail
cd "$(dirname "$0")"
exec go run ./cmd/scenario
