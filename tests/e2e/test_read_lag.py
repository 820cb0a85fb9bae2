"""Back-pressure (issue 12): a read side that falls behind makes appends to its partition fail RATE_LIMITED
instead of letting its lag (and read-your-writes waits) grow without bound; once it catches up, appends
go through again. The read side here is a Python projection that dead-letters every `Explode` event after
a retry with backoff: slow, but it gets there."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import pytest
from kpg import GatewayClient, error_details
from kpg.v1 import event_store_pb2 as es
from kpg.v1 import read_models_pb2 as rm

from tests.conftest import Backends
from tests.support import SERVING, GatewayProcess, eventually, wait_for_health

pytestmark = pytest.mark.e2e


async def test_a_lagging_projection_holds_appends_back_until_it_catches_up(
    backends: Backends, tmp_path: Path, repo_root: Path
) -> None:
    category = f"lag{uuid.uuid4().hex[:8]}"
    definitions = tmp_path / "definitions.yaml"
    definitions.write_text(
        f"categories:\n  {category}: {{partitions: 1}}\n"
        f"read_models:\n  slow:\n    category: {category}\n    python: tests.e2e.projections:tally\n"
    )
    gateway = GatewayProcess(
        tmp_path,
        env={
            "KPG_KAFKA__BOOTSTRAP_SERVERS": backends.bootstrap_servers,
            "KPG_REDIS__URL": backends.redis_url,
            "PYTHONPATH": str(repo_root),
            "KPG_EVENTS__MAX_READ_LAG": "100",
            "KPG_READ_MODELS__HANDLER_MAX_ATTEMPTS": "2",
            "KPG_READ_MODELS__HANDLER_BACKOFF_MS": "100",  # ~0.1 s per Explode event
        },
        args=["--definitions", str(definitions)],
    ).start()
    try:
        await wait_for_health(gateway.target, SERVING, process=gateway)
        async with GatewayClient(gateway.target) as client:

            async def append(kind: str) -> es.AppendEventsResponse:
                return await client.events.AppendEvents(
                    es.AppendEventsRequest(
                        category=category, stream_id="s-1", events=[es.EventData(type=kind, data=b"{}")]
                    )
                )

            # The projection is caught up (so it counts), then gets far more than it can fold in time.
            first = await append("Counted")
            await client.read_models.Get(
                rm.GetDocumentRequest(read_model="slow", key="s-1", min_position=first.position)
            )
            refused: grpc.aio.AioRpcError | None = None
            accepted = 0
            deadline = time.monotonic() + 30
            while refused is None and time.monotonic() < deadline:
                try:
                    await append("Explode")
                    accepted += 1
                except grpc.aio.AioRpcError as error:
                    refused = error
            assert refused is not None, f"{accepted} appends, none refused"
            details = error_details(refused)
            assert (refused.code(), details.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
            assert details.metadata["read_side"] == "read model 'slow'"
            assert int(details.metadata["lag"]) > 100
            assert accepted < 300  # bounded: refused within about one refresh of passing the bound

            # The projection works through what it has (each Explode dead-lettered); then appends flow again.
            async def accepted_again() -> bool:
                try:
                    await append("Counted")
                    return True
                except grpc.aio.AioRpcError as error:
                    assert error_details(error).reason == "RATE_LIMITED"
                    return False

            await eventually(accepted_again, timeout_s=90, interval_s=0.5)
            status = await client.read_models.GetStatus(rm.GetStatusRequest(read_model="slow"))
            assert status.lag <= 100 + 2
    finally:
        gateway.kill()
