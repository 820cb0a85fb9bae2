from __future__ import annotations

from pathlib import Path

import pytest

from gateway.adapters.redis import RedisClient, redis_answers
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
