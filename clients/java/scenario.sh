#!/usr/bin/env bash
# Builds the Java client and runs the cross-language scenario (../SCENARIO.md) against a live gateway.
# Needs Java 17+ and Maven; dependencies come from Maven Central into ~/.m2.
#   KPG_TARGET=127.0.0.1:50051 KPG_RUN_ID=run-1 KPG_DLT_ERROR="..." clients/java/scenario.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
mvn -B -q -DskipTests package >&2   # build output to stderr: stdout is the scenario's
exec java -cp "target/classes:$(cat target/classpath.txt)" io.kpg.examples.Scenario
