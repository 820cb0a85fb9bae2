"""Redis-backed stores the services build on: idempotency records and writer leases."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gateway.adapters.redis.client import RedisClient


class BeginOutcome(Enum):
    NEW = "new"
    DONE = "done"
    RUNNING = "running"
    REUSED = "reused"


@dataclass(frozen=True, slots=True)
class Begin:
    outcome: BeginOutcome
    answer: bytes = b""


class IdempotencyStore:
    """`kpg:idem:<scope>:<key>` hashes: fingerprint, state (running|done), owner, answer."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client

    @staticmethod
    def _key(scope: str, key: str) -> str:
        return f"kpg:idem:{scope}:{key}"

    async def begin(
        self, scope: str, key: str, *, fingerprint: str, owner: str, in_flight_ttl_ms: int
    ) -> Begin:
        reply = await self._client.run_script(
            "idempotency_begin", [self._key(scope, key)], [fingerprint, owner, in_flight_ttl_ms]
        )
        outcome = BeginOutcome(reply[0].decode())
        return Begin(outcome, reply[1] if len(reply) > 1 else b"")

    async def finish(self, scope: str, key: str, *, owner: str, ttl_ms: int, answer: bytes) -> None:
        await self._client.run_script("idempotency_finish", [self._key(scope, key)], [owner, ttl_ms, answer])

    async def abandon(self, scope: str, key: str, *, owner: str) -> None:
        await self._client.run_script("idempotency_finish", [self._key(scope, key)], [owner, 1, b""])


class LeaseStore:
    """Exclusive, expiring leases (`kpg:lease:<name>`) with a "wanted" flag for fair hand-over."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client

    async def acquire(self, name: str, token: str, ttl_ms: int) -> bool:
        reply = await self._client.run_script(
            "lease_acquire", [f"kpg:lease:{name}", f"kpg:lease-wanted:{name}"], [token, ttl_ms]
        )
        return bool(reply)

    async def renew(self, name: str, token: str, ttl_ms: int) -> tuple[bool, bool]:
        """(still held, wanted by another instance)."""
        reply = int(
            await self._client.run_script(
                "lease_renew", [f"kpg:lease:{name}", f"kpg:lease-wanted:{name}"], [token, ttl_ms]
            )
        )
        return reply >= 0, reply == 1

    async def want(self, name: str, ttl_ms: int) -> None:
        redis = self._client.redis
        await self._client.call(redis.set, f"kpg:lease-wanted:{name}", b"1", px=ttl_ms)

    async def release(self, name: str, token: str) -> None:
        await self._client.run_script("lease_release", [f"kpg:lease:{name}"], [token])
