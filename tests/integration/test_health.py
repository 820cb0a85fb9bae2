"""Readiness follows the backends: NOT_SERVING until Kafka and Redis answer, and again when Redis stops."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.devstack.processes import free_port
from gateway.devstack.redis import RedisNode, find_redis_server
from tests.conftest import Backends
from tests.support import NOT_SERVING, SERVING, GatewayProcess, wait_for_health

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
            assert (await http.get("/readyz")).status_code == 200

            redis.process.stop()
            await wait_for_health(gateway.target, NOT_SERVING, process=gateway)
            await wait_for_health(gateway.target, NOT_SERVING, service="kpg.v1.Sagas", process=gateway)
            assert (await http.get("/readyz")).status_code == 503
        assert gateway.process is not None and gateway.process.poll() is None, "the gateway must not crash"
    finally:
        gateway.kill()
        redis.process.stop()
