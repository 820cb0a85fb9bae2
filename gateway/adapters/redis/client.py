"""`RedisClient`: the async redis client, its Lua scripts, and the edge where redis errors become
`BackendUnavailable`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from gateway.errors import BackendUnavailable
from gateway.settings import RedisSettings
from gateway.tasks import raise_if_cancelling

SCRIPTS_DIR = Path(__file__).parent / "scripts"

P = ParamSpec("P")
T = TypeVar("T")


def redis_answers(url: str, timeout_s: float) -> bool:
    """True when a Redis-compatible server at `url` answers PING within the timeout."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class RedisClient:
    def __init__(self, settings: RedisSettings, *, scripts_dir: Path = SCRIPTS_DIR) -> None:
        # A blocking pool: a burst of calls beyond max_connections waits for a free connection (up to the
        # socket timeout) instead of failing with "Too many connections".
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.url,
            max_connections=settings.max_connections,
            timeout=settings.socket_timeout_s,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.socket_timeout_s,
            health_check_interval=10,
            # A pooled connection the server closed (it restarted) fails on its next use before the
            # command is sent: retry once on a new connection. Every command and script here may run
            # twice (they are idempotent, or keyed by a caller's token).
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[redis.ConnectionError],
        )
        self.redis: redis.asyncio.Redis = redis.asyncio.Redis(connection_pool=pool)
        # Scripts are registered by file name and run with EVALSHA (falling back to EVAL once after a
        # server restart flushed the script cache).
        self.scripts: dict[str, AsyncScript] = {
            path.stem: self.redis.register_script(path.read_text())
            for path in sorted(scripts_dir.glob("*.lua"))
        }

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (redis.RedisError, OSError):
            return False

    async def run_script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self.scripts[name]
        return await self.call(script, keys=keys, args=args)

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run one redis coroutine, translating driver errors at this edge."""
        try:
            return await fn(*args, **kwargs)
        except redis.ResponseError:
            raise  # a bug in a script or a command: let it surface as an internal error
        except (redis.RedisError, OSError) as exc:
            raise_if_cancelling()  # redis-py can report an interrupted call as a connection error
            raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc

    async def close(self) -> None:
        await self.redis.aclose()
