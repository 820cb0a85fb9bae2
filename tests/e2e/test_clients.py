"""Every client language against a live gateway (issue 13): clients/SCENARIO.md, run by each language's own
program (`clients/<language>/scenario.sh`, which builds it first).

The suite starts the example gateway (examples/definitions.yaml, two workers as `kpg serve` runs by
default), the example saga participants and inventory responder, and seeds one dead letter; a program passes
only if every step of the scenario answers as the contract says (it exits non-zero otherwise), so each fails
when the gateway misbehaves. Each program's output is part of the failure message.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Producer
from kpg import GatewayClient
from kpg.v1 import read_models_pb2 as rm

from tests.conftest import Backends
from tests.support import SERVING, GatewayProcess, eventually, wait_for_health

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
LANGUAGES = ["python", "go", "typescript", "java"]
# A cold Maven or npm build downloads its dependencies first.
BUILD_AND_RUN_TIMEOUT_S = 900


@dataclass(frozen=True)
class Live:
    gateway: GatewayProcess
    dlt_error: str


def _example_process(args: list[str], backends: Backends, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
        env={
            **os.environ,
            "PYTHONPATH": str(REPO / "clients" / "python" / "src"),
            "KPG_KAFKA__BOOTSTRAP_SERVERS": backends.bootstrap_servers,
        },
    )
    return process


@pytest.fixture(scope="module")
def helpers(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The example participants and inventory responder, ready (they print a line once they have their
    partitions)."""
    workdir = tmp_path_factory.mktemp("client-helpers")
    participants = _example_process(
        [
            str(REPO / "examples" / "participants.py"),
            "all",
            "--bootstrap-servers",
            backends.bootstrap_servers,
        ],
        backends,
        workdir / "participants.log",
    )
    responder = _example_process(
        [str(REPO / "examples" / "inventory_responder.py")], backends, workdir / "responder.log"
    )
    try:
        for process in (participants, responder):
            assert process.stdout is not None
            lines = []
            while (line := process.stdout.readline()) and line.strip() != b"ready":  # or EOF if it died
                lines.append(line)
            assert line.strip() == b"ready", f"did not start: {lines!r}"
        yield
    finally:
        for process in (participants, responder):
            process.terminate()
        for process in (participants, responder):
            process.wait(30)


@pytest.fixture(scope="module")
async def live(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory, helpers: None
) -> AsyncIterator[Live]:
    run = uuid.uuid4().hex[:10]
    gateway = GatewayProcess(
        tmp_path_factory.mktemp("client-gateway"),
        env={
            "KPG_KAFKA__BOOTSTRAP_SERVERS": backends.bootstrap_servers,
            "KPG_REDIS__URL": backends.redis_url,
            # Replies of its own: the shared Redis's default reply group lists gateways other tests killed.
            "KPG_REQUEST_REPLY__REPLY_TOPIC": f"clients-{run}.replies",
            "KPG_REQUEST_REPLY__REPLY_GROUP": f"clients-{run}.replies",
        },
        args=["--definitions", str(REPO / "examples" / "definitions.yaml")],
        workers=2,
    ).start()
    try:
        await wait_for_health(gateway.target, SERVING, process=gateway)
        # A fresh database: the example read model first folds the category's history (other tests'
        # orders too), which the scenario's Get(min_position) should not have to wait for.
        async with GatewayClient(gateway.target) as client:

            async def caught_up() -> bool:
                status = await client.read_models.GetStatus(rm.GetStatusRequest(read_model="order_summary"))
                return status.lag == 0

            await eventually(caught_up, timeout_s=300, interval_s=0.5)
        dlt_error = f"seeded for the client programs {run}"
        envelope = {
            "originalTopic": "orders.events",
            "originalPartition": 0,
            "originalOffset": 1,
            "originalTimestamp": 1_764_000_000_123,
            "consumerGroup": "client-programs",
            "errorClass": "ValueError",
            "errorMessage": dlt_error,
            "payload": {"order": run},
        }
        producer = Producer({"bootstrap.servers": backends.bootstrap_servers})
        producer.produce("orders.events.DLT", json.dumps(envelope).encode(), key=run.encode())
        assert producer.flush(10) == 0
        yield Live(gateway, dlt_error)
    finally:
        gateway.kill()


@pytest.mark.parametrize("language", LANGUAGES)
async def test_the_scenario_passes_in_every_client_language(live: Live, language: str) -> None:
    script = REPO / "clients" / language / "scenario.sh"
    assert script.exists(), f"{script} is missing"
    run_id = uuid.uuid4().hex[:12]
    result = await asyncio.to_thread(
        subprocess.run,
        ["bash", str(script)],
        capture_output=True,
        text=True,
        timeout=BUILD_AND_RUN_TIMEOUT_S,
        env={
            **os.environ,
            "KPG_TARGET": live.gateway.target,
            "KPG_RUN_ID": run_id,
            "KPG_DLT_ERROR": live.dlt_error,
        },
    )
    output = f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output
    steps = ["append", "wrong-expected-version", "read-model", "request-reply", "saga", "dead-letters"]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")] == steps, output
