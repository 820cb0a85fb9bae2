"""Idempotency keys, reusable by every mutating RPC.

The first request under a key runs and stores its answer (TTL `ttl_ms`, default 24 h). A retry with the
same key and the same request gets that answer back (`duplicate = True`) and runs nothing; the same key
with a different request is IDEMPOTENCY_KEY_REUSED; a retry while the first still runs is
IDEMPOTENCY_KEY_IN_FLIGHT. A request that fails releases its key, so the client may retry it.

A caller that goes away (cancelled, timed out) does not abandon the key while its request may still
take effect: the request runs on, shielded, and its outcome settles the key when it ends. What Redis
cannot guarantee (a crash or a Redis failure between the action and `finish`, an action longer than the
in-flight TTL) the actions guard against themselves: appends derive their generated event ids from the
key and the event store finds a retry's events in the log.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from gateway.adapters.redis import BeginOutcome, IdempotencyStore
from gateway.errors import BackendUnavailable, IdempotencyKeyInFlight, IdempotencyKeyReused, InvalidArgument
from gateway.tasks import spawn

T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_KEY_LENGTH = 256


@dataclass(frozen=True)
class IdempotencySettings:
    ttl_ms: int = 24 * 3600 * 1000
    # How long a running request holds its key; a gateway that dies mid-request frees it after this.
    in_flight_ttl_ms: int = 60_000


class Idempotency:
    def __init__(self, store: IdempotencyStore, settings: IdempotencySettings) -> None:
        self._store = store
        self._settings = settings

    async def run(
        self,
        scope: str,
        key: str,
        *,
        fingerprint: str,
        action: Callable[[], Awaitable[T]],
        encode: Callable[[T], bytes],
        decode: Callable[[bytes], T],
    ) -> tuple[T, bool]:
        """Run `action` once per key; returns (answer, duplicate)."""
        if not key:
            return await action(), False
        if len(key) > MAX_KEY_LENGTH or not key.isprintable():
            raise InvalidArgument.field(
                "idempotency_key", f"must be at most {MAX_KEY_LENGTH} printable characters"
            )
        owner = uuid.uuid4().hex
        begun = await self._store.begin(
            scope, key, fingerprint=fingerprint, owner=owner, in_flight_ttl_ms=self._settings.in_flight_ttl_ms
        )
        match begun.outcome:
            case BeginOutcome.DONE:
                return decode(begun.answer), True
            case BeginOutcome.REUSED:
                raise IdempotencyKeyReused(
                    "this idempotency key was used for a different request", metadata={"idempotency_key": key}
                )
            case BeginOutcome.RUNNING:
                raise IdempotencyKeyInFlight(
                    "a request with this idempotency key is still running; retry shortly",
                    metadata={"idempotency_key": key},
                )
        task = asyncio.ensure_future(action())
        try:
            answer = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller left; the action may still commit. Its own outcome settles the key.
            task.add_done_callback(
                lambda done: spawn(self._settle(scope, key, owner, done, encode), name=f"idempotency:{key}")
            )
            raise
        except BaseException:
            await self._abandon(scope, key, owner)
            raise
        await self._finish(scope, key, owner, encode(answer))
        return answer, False

    async def _settle(
        self, scope: str, key: str, owner: str, done: asyncio.Future[T], encode: Callable[[T], bytes]
    ) -> None:
        if done.cancelled() or done.exception() is not None:
            await self._abandon(scope, key, owner)
        else:
            await self._finish(scope, key, owner, encode(done.result()))

    async def _finish(self, scope: str, key: str, owner: str, answer: bytes) -> None:
        try:
            await self._store.finish(scope, key, owner=owner, ttl_ms=self._settings.ttl_ms, answer=answer)
        except BackendUnavailable:
            # The action succeeded: say so. The key stays "running" until its in-flight TTL ends; a retry
            # after that is recognised by the action itself (derived event ids, for appends).
            log.warning("could not store the answer for idempotency key %r", key, exc_info=True)

    async def _abandon(self, scope: str, key: str, owner: str) -> None:
        try:
            await self._store.abandon(scope, key, owner=owner)
        except BackendUnavailable:
            log.warning("could not release idempotency key %r; it expires by itself", key)
