"""Readiness follows the backends: NOT_SERVING until Kafka and Redis answer, and again when Redis stops.

Each worker probes the backends itself, so the gRPC health (one connection: one worker) and /readyz (any
worker) agree within a probe interval, not at every instant: /readyz is polled until it follows."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.devstack.processes import free_port
from gateway.devstack.redis import RedisNode, find_redis_server
from tests.conftest import Backends
from tests.support import (
    NOT_SERVING,
    SERVING,
    GatewayProcess,
    eventually,
    ready_everywhere_is,
    wait_for_health,
)

pytestmark = pytest.mark.integration


async def test_health_follows_redis(backends: Backends, tmp_path: Path) -> None:
    # A Redis of this test's own, so stopping it disturbs no other test.
    redis = RedisNode(tmp_path, free_port())
    gateway = GatewayProcess(
        tmp_path,
        env={"KPG_KAFKA__BOOTSTRAP_SERVERS": backends.bootstrap_servers, "KPG_REDIS__URL": redis.url},
    ).start()
    try:
        # Redis is not running yet: the gateway serves, says NOT_SERVING, and keeps retrying.
        await wait_for_health(gateway.target, NOT_SERVING, process=gateway)
        async with httpx.AsyncClient(base_url=gateway.rest_url) as http:
            not_ready = await http.get("/readyz")
            assert not_ready.status_code == 503
            assert not_ready.json()["backends"] == {"kafka": True, "redis": False, "database": True}
            assert (await http.get("/healthz")).status_code == 200

            redis.start(find_redis_server())
            await wait_for_health(gateway.target, SERVING, process=gateway)
            await wait_for_health(gateway.target, SERVING, service="kpg.v1.EventStore", process=gateway)
            await eventually(lambda: ready_everywhere_is(gateway.rest_url, 200), timeout_s=15)

            redis.process.stop()
            await wait_for_health(gateway.target, NOT_SERVING, process=gateway)
            await wait_for_health(gateway.target, NOT_SERVING, service="kpg.v1.Sagas", process=gateway)
            await eventually(lambda: ready_everywhere_is(gateway.rest_url, 503), timeout_s=15)
        assert gateway.process is not None and gateway.process.poll() is None, "the gateway must not crash"
    finally:
        gateway.kill()
        redis.process.stop()
