"""Redis-backed stores the services build on: idempotency records and writer leases."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
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


class ReplyState(Enum):
    REPLIED = "replied"
    PENDING = "pending"
    TIMED_OUT = "timed_out"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ReplyLookup:
    state: ReplyState
    reply: bytes = b""


class CorrelationStore:
    """Request-reply correlation shared by every instance: `kpg:rr:pending:<id>` (deadline, reply topic,
    owner) and `kpg:rr:reply:<id>` (the reply), both expiring; a stored reply is announced on `CHANNEL`.
    `kpg:deployment-id` names the deployment (every gateway sharing this Redis): created once, never
    expiring, so every instance and every restart agrees on it."""

    CHANNEL = "kpg:rr:replied"
    DEPLOYMENT_KEY = "kpg:deployment-id"

    def __init__(self, client: RedisClient) -> None:
        self._client = client

    @staticmethod
    def _keys(correlation_id: str) -> list[str]:
        return [f"kpg:rr:pending:{correlation_id}", f"kpg:rr:reply:{correlation_id}"]

    async def deployment_id(self) -> str:
        """This deployment's id: the first instance to ask creates it (random hex), the others read it."""
        redis = self._client.redis
        while True:
            await self._client.call(redis.set, self.DEPLOYMENT_KEY, secrets.token_hex(8), nx=True)
            value = await self._client.call(redis.get, self.DEPLOYMENT_KEY)
            if value is not None:  # else deleted between the two calls: create it again
                return value.decode() if isinstance(value, bytes) else str(value)

    async def expect(
        self, correlation_id: str, *, owner: str, timeout_ms: int, reply_ttl_ms: int, reply_topic: str
    ) -> int:
        """Record the request; its deadline (epoch ms, the server's clock), or 0 if the id is in use.
        `owner` is a token of this request: only `forget` with the same token removes the record."""
        keys = self._keys(correlation_id)[:1]
        return int(
            await self._client.run_script(
                "reply_expect", keys, [timeout_ms, reply_ttl_ms, reply_topic, owner]
            )
        )

    async def forget(self, correlation_id: str, *, owner: str) -> bool:
        """Remove the request `owner` recorded (and any reply kept for it), so its id is free again; a
        record another request made under the same id is left alone. True when it was removed."""
        removed = await self._client.run_script("reply_forget", self._keys(correlation_id), [owner])
        return bool(removed)

    async def store(self, correlation_id: str, reply: bytes, *, reply_ttl_ms: int) -> str:
        """'stored', 'late', 'unknown' or 'duplicate' (see reply_store.lua)."""
        outcome = await self._client.run_script(
            "reply_store",
            self._keys(correlation_id),
            [reply, reply_ttl_ms, self.CHANNEL, correlation_id.encode() + b"\n" + reply],
        )
        return outcome.decode() if isinstance(outcome, bytes) else str(outcome)

    async def lookup(self, correlation_id: str) -> ReplyLookup:
        answer = await self._client.run_script("reply_state", self._keys(correlation_id), [])
        state = ReplyState(answer[0].decode())
        return ReplyLookup(state, answer[1] if state is ReplyState.REPLIED else b"")

    async def notifications(self) -> AsyncIterator[tuple[str, bytes]]:
        """(correlation id, reply) of replies stored by any instance, as they are announced."""
        pubsub = self._client.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._client.call(pubsub.subscribe, self.CHANNEL)
            while True:
                message = await self._client.call(pubsub.get_message, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    correlation_id, _, reply = bytes(message["data"]).partition(b"\n")
                    yield correlation_id.decode(), reply
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]


class ChangeFeed:
    """Best-effort announcements that something changed (entries such as `<id>:<version>`), for watchers
    on every instance. Redis only tells: the state lives elsewhere, and watchers also look on their own
    now and then, since a notification can be lost (pub/sub keeps nothing for a subscriber that was away)."""

    def __init__(self, client: RedisClient, channel: str) -> None:
        self._client = client
        self.channel = channel

    async def publish(self, ids: Sequence[str]) -> None:
        if ids:
            await self._client.call(self._client.redis.publish, self.channel, "\n".join(ids))

    async def notifications(self) -> AsyncIterator[list[str]]:
        """What any instance announced, one publish at a time (the entries it published)."""
        pubsub = self._client.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._client.call(pubsub.subscribe, self.channel)
            while True:
                message = await self._client.call(pubsub.get_message, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    yield bytes(message["data"]).decode().split("\n")
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
