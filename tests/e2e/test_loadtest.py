"""`make loadtest`, briefly: loadtest/run_locust.py for a few seconds per scenario tag, against one gateway
(with the example participants, the inventory responder and a dead-letter topic) started once for all of
them. Locust must report requests for the tag's pattern over gRPC and over REST, and no failure at all."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from loadtest.run_locust import Stack, read_stats
from tests.conftest import Backends

pytestmark = pytest.mark.e2e

RUNNER = Path(__file__).resolve().parents[2] / "loadtest" / "run_locust.py"

# Per tag, rows that must have requests: (type, name) of each transport's main call.
EXPECTED: dict[str, set[tuple[str, str]]] = {
    "append": {
        ("grpc", "EventStore.AppendEvents"),
        ("POST", "/v1/streams/{category}/{stream_id}/events"),
        ("grpc", "EventStore.ReadStream"),
        ("GET", "/v1/streams/{category}/{stream_id}/events"),
    },
    "read-models": {
        ("grpc", "ReadModels.Get (min_position)"),
        ("GET", "/v1/read-models/{read_model}/documents/{key} (min_position)"),
    },
    "request-reply": {
        ("grpc", "RequestReply.Request"),
        ("POST", "/v1/requests/{topic}"),
    },
    "sagas": {
        ("grpc", "Sagas.StartSaga"),
        ("grpc", "Sagas.WatchSaga"),
        ("POST", "/v1/sagas"),
        ("GET", "/v1/sagas/{saga_id}"),
    },
    "dead-letters": {
        ("grpc", "DeadLetters.ListDeadLetters"),
        ("GET", "/v1/dead-letters/{dlt_topic}"),
    },
}


@pytest.mark.timeout(240)
async def test_locust_loads_every_pattern_over_grpc_and_rest_without_failures(
    backends: Backends, tmp_path: Path
) -> None:
    stack = Stack(
        bootstrap_servers=backends.bootstrap_servers,
        redis_url=backends.redis_url,
        prefix=f"lt-{uuid.uuid4().hex[:8]}.",
        workdir=tmp_path / "stack",
    )
    env = {**os.environ}
    try:
        await asyncio.to_thread(stack.start)  # blocking: it waits for the processes it starts
        env |= {"KPG_TARGET": stack.gateway.target, "KPG_REST_URL": stack.gateway.rest_url}
        for tag, expected in EXPECTED.items():
            command = [
                *(sys.executable, str(RUNNER), "--tags", tag, "--duration", "4"),
                *("--users", "10", "--spawn-rate", "10", "--topic-prefix", stack.prefix),
                *("--out-dir", str(tmp_path / "reports"), "--name", tag),
            ]
            run = await asyncio.to_thread(
                subprocess.run, command, env=env, capture_output=True, text=True, timeout=90, check=False
            )
            print(run.stdout)
            assert run.returncode == 0, f"{tag}:\n{run.stdout}\n{run.stderr}"
            rows, total = read_stats(tmp_path / "reports" / tag)
            assert total is not None and total.requests > 0 and total.failures == 0, run.stdout
            seen = {(row.type, row.name) for row in rows if row.requests}
            assert expected <= seen, f"{tag}: no requests for {expected - seen}\n{run.stdout}"
            patterns = {row.pattern for row in rows}
            # The read-model users append the events they read back; nothing else strays.
            assert patterns <= {tag, "append"}, f"{tag}: {patterns}\n{run.stdout}"
            assert "req/s" in run.stdout and "\ntotal " in run.stdout  # the printed summary
    finally:
        await asyncio.to_thread(stack.stop)
