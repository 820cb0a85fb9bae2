from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.adapters.redis import CorrelationStore, RedisClient, ReplyState, redis_answers
from gateway.devstack.processes import free_port
from gateway.errors import BackendUnavailable
from gateway.settings import RedisSettings
from tests.conftest import Backends

pytestmark = pytest.mark.integration


async def test_lua_scripts_are_loaded_by_file_name_and_run(
    backends: Backends, unique: str, tmp_path: Path
) -> None:
    (tmp_path / "set_if_absent.lua").write_text(
        "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end\n"
        "return redis.call('GET', KEYS[1])\n"
    )
    client = RedisClient(backends.redis(), scripts_dir=tmp_path)
    try:
        assert set(client.scripts) == {"set_if_absent"}
        key = f"it:script:{unique}"
        assert await client.run_script("set_if_absent", [key], ["first", 60_000]) == 1
        assert await client.run_script("set_if_absent", [key], ["second", 60_000]) == b"first"
        # A flushed script cache (as after a server restart) is refilled transparently.
        await client.redis.script_flush()
        assert await client.run_script("set_if_absent", [key], ["third", 60_000]) == b"first"
    finally:
        await client.close()


async def test_unreachable_redis_is_backend_unavailable() -> None:
    client = RedisClient(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5))
    try:
        assert await client.ping() is False
        with pytest.raises(BackendUnavailable, match="Redis is unavailable"):
            await client.call(client.redis.get, "anything")
    finally:
        await client.close()
    assert redis_answers(f"redis://127.0.0.1:{free_port()}/0", 0.5) is False


async def test_forget_withdraws_only_the_pending_record_it_made(backends: Backends, unique: str) -> None:
    client = RedisClient(backends.redis())
    store = CorrelationStore(client)
    correlation_id = f"it-forget-{unique}"
    pending, reply = f"kpg:rr:pending:{correlation_id}", f"kpg:rr:reply:{correlation_id}"

    async def expect(owner: str) -> int:
        return await store.expect(
            correlation_id, owner=owner, timeout_ms=60_000, reply_ttl_ms=300_000, reply_topic="it.replies"
        )

    try:
        assert await expect("first") > 0
        assert await expect("second") == 0  # in use
        assert await store.forget(correlation_id, owner="second") is False  # not second's record
        assert await client.redis.exists(pending)
        assert await store.forget(correlation_id, owner="first") is True
        assert not await client.redis.exists(pending)
        assert (await store.lookup(correlation_id)).state is ReplyState.UNKNOWN
        # The id is free again at once; a reply kept for a withdrawn request goes with it.
        assert await expect("retry") > 0
        assert await store.store(correlation_id, b"answer", reply_ttl_ms=300_000) == "stored"
        assert await store.forget(correlation_id, owner="first") is False  # a stale owner removes nothing
        assert (await store.lookup(correlation_id)).state is ReplyState.REPLIED
        assert await store.forget(correlation_id, owner="retry") is True
        assert not await client.redis.exists(pending, reply)
        assert await store.forget(correlation_id, owner="retry") is False  # already gone
    finally:
        await client.redis.delete(pending, reply)
        await client.close()


async def test_the_deployment_id_is_made_once_and_shared_by_every_instance(backends: Backends) -> None:
    # Database 3 of the test server: the id is per Redis database, and this test must own it.
    url = backends.redis_url.rsplit("/", 1)[0] + "/3"
    clients = [RedisClient(RedisSettings(url=url)) for _ in range(3)]
    try:
        await clients[0].redis.delete(CorrelationStore.DEPLOYMENT_KEY)
        ids = await asyncio.gather(*(CorrelationStore(c).deployment_id() for c in clients))
        assert len(set(ids)) == 1 and len(ids[0]) == 16 and int(ids[0], 16) >= 0
        assert await CorrelationStore(clients[1]).deployment_id() == ids[0]  # stable
        assert await clients[0].redis.pttl(CorrelationStore.DEPLOYMENT_KEY) == -1  # never expires
        await clients[0].redis.delete(CorrelationStore.DEPLOYMENT_KEY)
        assert await CorrelationStore(clients[2]).deployment_id() != ids[0]  # a new Redis, a new deployment
    finally:
        await clients[0].redis.delete(CorrelationStore.DEPLOYMENT_KEY)
        for client in clients:
            await client.close()
