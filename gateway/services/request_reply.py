"""request-reply over Kafka: sync and async, with the correlation state in Redis.

Reply topic design (see the README): one reply topic per deployment (the gateways sharing one Redis), consumed
by one consumer group that every instance of the deployment joins. Whichever instance consumes a reply stores
it in Redis (if its request is still waiting) and publishes the correlation id; the instance holding the
caller is woken by that notification (and re-checks Redis every second, should a notification be lost). Within
an instance it is quicker: a call waiting in the worker that consumed its reply is woken at once, and a reply
is handed to the sibling workers over their unix sockets (adapters/peers.py) as it is stored, so a call
waiting in another worker of the instance does not wait for the Redis round trip and its notification either
(BENCHMARKS.md). A rebalance only moves which instance stores replies: offsets are
committed after the store, so a reply is never lost, and since the store is shared nothing can be stolen. The
topic and group are named after the deployment id kept in Redis (unless configured), so two deployments on one
Kafka cluster never consume each other's replies (a reply stored in the other deployment's Redis would be
lost). Per-instance reply topics would save the Redis hop but leave orphaned topics behind every instance that
goes away, and still need Redis for async GetReply from another instance.

Invariants: a request is sent only once its pending record is in Redis, and a request whose send fails (or
is cancelled) has that record removed again, so the caller may retry with the same correlation id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from prometheus_client import Counter, Histogram

from gateway.adapters.kafka import (
    LOW_LATENCY_CONSUMER,
    AsyncProducer,
    ConsumerRunner,
    FailurePolicy,
    KafkaAdmin,
    Record,
    TopicSpec,
)
from gateway.adapters.peers import Peers, PeerUnreachable
from gateway.adapters.redis import CorrelationStore, ReplyState
from gateway.definitions import Definitions
from gateway.domain.dead_letters import dlt_topic
from gateway.domain.request_reply import (
    ProtectedTopics,
    Reply,
    ReplyStatus,
    Request,
    RequestLimits,
    correlation_of,
    reply_headers,
    reply_names,
    request_headers,
    validate_request,
)
from gateway.errors import BackendUnavailable, InvalidArgument, NotFound, ReplyTimeout, TopicNotAllowed
from gateway.services.dead_letter_writer import DeadLetterWriter
from gateway.services.idempotency import Idempotency
from gateway.settings import KafkaSettings, RequestReplySettings
from gateway.tasks import bounded, raise_if_cancelling, spawn, stop_task

log = logging.getLogger(__name__)

LEGS = Histogram(
    "kpg_request_reply_leg_seconds",
    "A sync Request's round trip leg by leg, measured where the call waits: record (the pending record in "
    "Redis), send (producing the request until Kafka acknowledged it), service (acknowledged until the "
    "service wrote its reply record), fetch (reply record written until a gateway consumed it), deliver "
    "(consumed until the waiting call woke: the Redis store, the publish, the notification). service, "
    "fetch and deliver compare wall clocks of different processes (on other hosts: their skew too)",
    ["leg"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
REPLIES = Counter(
    "kpg_request_reply_replies_total",
    "Records consumed from the reply topic, by outcome (stored, late, unknown, duplicate, uncorrelated)",
    ["outcome"],
)
RECHECK_S = 1.0
HANDED_OVER = Counter(
    "kpg_request_reply_handed_over_total",
    "Replies a sibling worker consumed and handed over, by whether a call here was waiting for it",
    ["waiting"],
)
PEER_REPLY = "request-reply.reply"  # the peer call that hands a reply to a sibling worker
PEER_REPLY_TIMEOUT_S = 1.0


@dataclass
class _Waiter:
    """A caller on this instance waiting for a reply; `reply` is filled in by the notification."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    reply: bytes | None = None


class RequestReply:
    def __init__(
        self,
        *,
        settings: RequestReplySettings,
        kafka: KafkaSettings,
        definitions: Definitions,
        admin: KafkaAdmin,
        store: CorrelationStore,
        idempotency: Idempotency,
        peers: Peers | None = None,
    ) -> None:
        """`peers`: the sibling workers under `kpg serve --workers`: each reply this one consumes for a call
        not waiting here is handed to them."""
        self._settings = settings
        self._peers = peers
        self._kafka = kafka
        self._definitions = definitions
        self._admin = admin
        self._store = store
        self._idempotency = idempotency
        self._limits = RequestLimits(settings.max_payload_bytes, settings.max_timeout_ms)
        # This path only: no linger, no Nagle, short fetch waits (latency over batching).
        self._producer = AsyncProducer(kafka, **{"linger.ms": 0, "socket.nagle.disable": True})
        # Known once start() has asked Redis for the deployment id; until then requests are refused.
        self._reply_topic = ""
        self._protected = ProtectedTopics(
            frozenset(definitions.category_topic(c) for c in definitions.categories),
            any_events=definitions.allow_undeclared_categories,
        )
        self._consumer: ConsumerRunner | None = None
        self._started = False
        self._starting = asyncio.Lock()
        self._waiters: dict[str, _Waiter] = {}
        self._listener: asyncio.Task[None] | None = None
        self._topics: dict[str, bool] = {}

    async def start(self) -> None:
        """Name the deployment's reply topic and group, create the topic, consume replies. Needs Kafka and
        Redis. Idempotent: once it has succeeded a second call does nothing; after a failure (a backend
        went away half-way) the next call resumes where it stopped."""
        async with self._starting:
            if self._started:
                return
            topic, group = await self._resolve_reply_names()
            partitions = self._settings.reply_topic_partitions
            created = await self._admin.ensure_topics(
                [TopicSpec(topic, partitions), TopicSpec(dlt_topic(topic), partitions)]
            )
            if created:
                log.info("created reply topic %s", topic)
            if self._consumer is None:
                self._consumer = ConsumerRunner(
                    self._kafka,
                    group_id=group,
                    topics=[topic],
                    handler=self._on_replies,
                    policy=FailurePolicy(dead_letter=DeadLetterWriter(self._producer)),
                    synchronous_commit=False,  # a redelivered reply is only a 'duplicate'
                    poll_timeout_s=0.1,
                    **LOW_LATENCY_CONSUMER,
                )
            await self._consumer.start()
            if self._listener is None:
                self._listener = asyncio.create_task(self._listen(), name="request-reply-notifications")
            self._reply_topic = topic
            self._protected = replace(self._protected, reply_topic=topic)
            self._started = True
            log.info("request-reply: replies on topic %s, consumer group %s", topic, group)

    async def _resolve_reply_names(self) -> tuple[str, str]:
        """The configured reply topic and group, each derived from the deployment id when left empty."""
        topic, group = self._settings.reply_topic, self._settings.reply_group
        if topic and group:
            return topic, group
        derived_topic, derived_group = reply_names(await self._store.deployment_id())
        return topic or derived_topic, group or derived_group

    async def stop(self, timeout_s: float = 10.0) -> None:
        await stop_task(self._listener, 2.0)
        if self._consumer is not None:
            await self._consumer.stop(timeout_s)
        await bounded(self._producer.close(timeout_s), timeout_s + 1.0, what="closing the request producer")

    # --- the API ---------------------------------------------------------------------------------------

    async def request(self, request: Request) -> Reply:
        """Send the request and wait for its reply (REPLY_TIMEOUT past its timeout)."""
        request = replace(request, correlation_id=request.correlation_id or uuid.uuid4().hex)
        await self._validate(request)
        reply, duplicate = await self._idempotency.run(
            "request",
            request.idempotency_key,
            fingerprint=request.fingerprint(),
            action=lambda: self._request(request),
            encode=Reply.encode,
            decode=Reply.decode,
        )
        return replace(reply, duplicate=duplicate)

    async def submit(self, request: Request) -> str:
        """Send the request and return its correlation id at once; GetReply fetches the answer later."""
        request = replace(request, correlation_id=request.correlation_id or uuid.uuid4().hex)
        await self._validate(request)
        correlation_id, _ = await self._idempotency.run(
            "submit-request",
            request.idempotency_key,
            fingerprint=request.fingerprint(),
            action=lambda: self._send(request),
            encode=str.encode,
            decode=bytes.decode,
        )
        return correlation_id

    async def get_reply(self, correlation_id: str, wait_timeout_ms: int = 0) -> Reply:
        """The reply if there is one (waiting up to `wait_timeout_ms` for it), else PENDING or TIMED_OUT."""
        if not correlation_id:
            raise InvalidArgument.field("correlation_id", "is required")
        if wait_timeout_ms > self._settings.max_timeout_ms:
            raise InvalidArgument.field("wait_timeout_ms", f"must be at most {self._settings.max_timeout_ms}")
        deadline = time.monotonic() + wait_timeout_ms / 1000
        return await self._await_reply(correlation_id, deadline, timeout_is_error=False)

    # --- sending and waiting -----------------------------------------------------------------------------

    async def _validate(self, request: Request) -> None:
        if request.topic:
            # Event, dead-letter, reply and internal topics are refused even when the allowlist matches.
            self._protected.check(request.topic)
            if not self._definitions.request_reply.allows(request.topic):
                raise TopicNotAllowed(
                    f"topic {request.topic!r} is not in request_reply.topics",
                    metadata={"topic": request.topic},
                )
        validate_request(request, self._limits)
        if not await self._topic_exists(request.topic):
            raise NotFound(f"topic {request.topic!r} does not exist", metadata={"topic": request.topic})

    async def _topic_exists(self, topic: str) -> bool:
        if topic not in self._topics:
            exists = await self._admin.partitions(topic) is not None
            if not exists:
                return False  # not cached: it may be created later
            self._topics[topic] = True
        return True

    def _timeout_ms(self, request: Request) -> int:
        return request.timeout_ms or self._settings.default_timeout_ms

    async def _send(self, request: Request, legs: dict[str, float] | None = None) -> str:
        """Record the request in Redis, then produce it. If producing fails in any way (cancellation
        included) the record is removed before the error goes on, so the correlation id is free again.
        `legs` gets how long each took and when the request was acknowledged (`acked_at`, epoch s)."""
        started = time.perf_counter()
        if not self._started:
            raise BackendUnavailable("request-reply is starting: its reply topic is not known yet")
        reply_topic = self._reply_topic
        owner = uuid.uuid4().hex
        deadline_ms = await self._store.expect(
            request.correlation_id,
            owner=owner,
            timeout_ms=self._timeout_ms(request),
            reply_ttl_ms=self._settings.reply_ttl_ms,
            reply_topic=reply_topic,
        )
        if deadline_ms == 0:
            raise InvalidArgument.field("correlation_id", "is already in use by another request")
        recorded = time.perf_counter()
        try:
            await self._producer.produce(
                request.topic,
                request.payload,
                key=request.key or None,
                headers=request_headers(request, reply_topic=reply_topic, deadline_ms=deadline_ms),
            )
        except BaseException:
            await self._forget(request.correlation_id, owner)
            raise
        if legs is not None:
            legs.update(record=recorded - started, send=time.perf_counter() - recorded, acked_at=time.time())
        return request.correlation_id

    async def _forget(self, correlation_id: str, owner: str) -> None:
        """Remove the pending record `_send` made. Shielded, so a second cancellation cannot cut it short;
        a Redis failure is logged, not raised (the record then expires on its own), so the caller sees
        the send's own error; cancellation still propagates."""
        cleanup = spawn(self._store.forget(correlation_id, owner=owner), name=f"withdraw:{correlation_id}")
        with contextlib.suppress(Exception):  # spawn logs it; a cancellation still propagates
            await asyncio.shield(cleanup)

    async def _request(self, request: Request) -> Reply:
        waiter = self._waiters.setdefault(request.correlation_id, _Waiter())
        legs: dict[str, float] = {}
        try:
            await self._send(request, legs)
            deadline = time.monotonic() + self._timeout_ms(request) / 1000
            # Registered before sending, so the notification cannot be missed: no first look in Redis.
            reply = await self._await_reply(
                request.correlation_id, deadline, timeout_is_error=True, waiter=waiter, look_first=False
            )
        finally:
            self._waiters.pop(request.correlation_id, None)
        _observe_legs(legs, reply, woke_at=time.time())
        return reply

    async def _await_reply(
        self,
        correlation_id: str,
        deadline: float,
        *,
        timeout_is_error: bool,
        waiter: _Waiter | None = None,
        look_first: bool = True,
    ) -> Reply:
        own = waiter is None
        if waiter is None:
            waiter = self._waiters.setdefault(correlation_id, _Waiter())
        try:
            while True:
                if waiter.reply is not None:
                    return Reply.decode(waiter.reply)  # the notification carried it
                remaining = deadline - time.monotonic()
                if look_first or remaining <= 0:
                    found = await self._store.lookup(correlation_id)
                    if found.state is ReplyState.REPLIED:
                        return Reply.decode(found.reply)
                    if found.state is ReplyState.UNKNOWN:
                        raise NotFound(
                            f"no request {correlation_id!r} (unknown, or its reply expired)",
                            metadata={"correlation_id": correlation_id},
                        )
                    if found.state is ReplyState.TIMED_OUT or remaining <= 0:
                        if timeout_is_error:
                            raise ReplyTimeout(
                                f"no reply to {correlation_id!r} in time",
                                metadata={"correlation_id": correlation_id},
                            )
                        timed_out = found.state is ReplyState.TIMED_OUT
                        return Reply(
                            correlation_id, ReplyStatus.TIMED_OUT if timed_out else ReplyStatus.PENDING
                        )
                look_first = True  # from now on, each wake-up (or recheck) looks in Redis
                waiter.event.clear()
                if waiter.reply is None:
                    try:
                        await asyncio.wait_for(waiter.event.wait(), max(0.0, min(remaining, RECHECK_S)))
                    except TimeoutError:
                        pass
        finally:
            if own:
                self._waiters.pop(correlation_id, None)

    async def _listen(self) -> None:
        while True:
            try:
                async for correlation_id, reply in self._store.notifications():
                    waiter = self._waiters.get(correlation_id)
                    if waiter is not None:
                        waiter.reply = reply
                        waiter.event.set()
            except BackendUnavailable as exc:
                raise_if_cancelling()
                log.warning("request-reply notifications: %s; resubscribing", exc)
                await asyncio.sleep(1.0)

    async def _on_replies(self, records: Sequence[Record]) -> None:
        """Store a batch's replies in Redis side by side, not one after another: one after another, the
        last reply of a batch waited for every store before it (the `fetch` and `deliver` legs' tails).
        The batch fails (and is redelivered; a stored reply then counts as a duplicate) if any store did,
        once all of them ended."""
        replies = []
        for record in records:
            correlation_id = correlation_of(record.headers)
            if correlation_id is None:
                REPLIES.labels("uncorrelated").inc()
                continue
            replies.append(
                Reply(
                    correlation_id=correlation_id,
                    status=ReplyStatus.REPLIED,
                    payload=record.value or b"",
                    headers=reply_headers(record.headers),
                    reply_topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    replied_at_ms=record.timestamp_ms or 0,
                    consumed_at_ms=int(time.time() * 1000),
                )
            )
        stored = await asyncio.gather(
            *(self._store_reply(reply) for reply in replies), return_exceptions=True
        )
        for outcome in stored:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _store_reply(self, reply: Reply) -> None:
        """Wake the call waiting here for it, if any, at once, or hand it to the sibling workers; then store
        it (for GetReply, the caller's other instances, and the notification to them), before the batch's
        offsets are committed."""
        encoded = reply.encode()
        if not self._wake(reply.correlation_id, encoded) and self._peers is not None:
            for sibling in range(self._peers.count):
                if sibling != self._peers.index:
                    spawn(self._hand_over(sibling, reply.correlation_id, encoded), name="hand-over-reply")
        outcome = await self._store.store(
            reply.correlation_id, encoded, reply_ttl_ms=self._settings.reply_ttl_ms
        )
        REPLIES.labels(outcome).inc()
        if outcome == "late":
            log.info("late reply to %s dropped", reply.correlation_id)

    def _wake(self, correlation_id: str, encoded: bytes) -> bool:
        """Hand a reply to the call waiting here for it, if any; whether there was one."""
        waiter = self._waiters.get(correlation_id)
        if waiter is None:
            return False
        if waiter.reply is None:
            waiter.reply = encoded
            waiter.event.set()
        return True

    async def _hand_over(self, sibling: int, correlation_id: str, encoded: bytes) -> None:
        """Best effort: a sibling that cannot be reached (restarting) is woken by Redis as before."""
        assert self._peers is not None
        with contextlib.suppress(PeerUnreachable, BackendUnavailable):
            await self._peers.call(sibling, PEER_REPLY, (correlation_id, encoded), PEER_REPLY_TIMEOUT_S)

    async def reply_from_sibling(self, handed: tuple[str, bytes]) -> None:
        """The peer call PEER_REPLY: a reply a sibling consumed, for a call that may be waiting here."""
        correlation_id, encoded = handed
        HANDED_OVER.labels(str(self._wake(correlation_id, encoded)).lower()).inc()


def _observe_legs(legs: dict[str, float], reply: Reply, *, woke_at: float) -> None:
    """Record a round trip's legs in LEGS (those not known, as in an older gateway's reply, are left out)."""
    for leg in ("record", "send"):
        LEGS.labels(leg).observe(legs[leg])
    if reply.replied_at_ms and reply.consumed_at_ms:
        replied, consumed = reply.replied_at_ms / 1000, reply.consumed_at_ms / 1000
        LEGS.labels("service").observe(max(0.0, replied - legs["acked_at"]))
        LEGS.labels("fetch").observe(max(0.0, consumed - replied))
        LEGS.labels("deliver").observe(max(0.0, woke_at - consumed))
